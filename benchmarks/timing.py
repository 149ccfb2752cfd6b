"""The timing core: warm-up then timed runs, percentiles and an alternating scheduler (phase-scoped peak RSS is
`metacanvas_deploy.runtime.memory`).

numpy-free and torch-free on purpose: `latency` on a bundle needs the runtime's dependencies only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# Pause between two alternated calls. ONNX Runtime's and OpenMP's worker threads spin for a while after a call;
# without the pause they would steal the next candidate's cores on a 2-core machine (not counted in timings).
SETTLE_S = 0.01


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between closest ranks: numpy's default
    ("linear") method. Raises ValueError on an empty sequence or q outside [0, 100]."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize(seconds: Sequence[float]) -> dict[str, float | int]:
    """A distribution of durations in seconds as {runs, p50_ms, p90_ms, mean_ms, min_ms, max_ms}."""
    ms = [s * 1000.0 for s in seconds]
    return {"runs": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "mean_ms": sum(ms) / len(ms), "min_ms": min(ms), "max_ms": max(ms)}


def alternating_order(names: Sequence[str], runs: int) -> list[str]:
    """Run by run, every candidate once in turn: A, B, C, A, B, C, ... (``runs`` rounds). Alternating spreads
    slow drifts of a shared machine (other jobs, thermal state) evenly over the candidates."""
    return [name for _ in range(runs) for name in names]


@dataclass
class Timed:
    """What `run_alternating` measured for one candidate: the first call (compilation, arena growth) apart,
    then one duration per timed run; ``last`` is the last call's return value (for accuracy checks)."""

    first_call_s: float | None = None
    seconds: list[float] = field(default_factory=list)
    last: object = None


def _call(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_alternating(candidates: Mapping[str, Callable[[], object]], runs: int, warmup: int,
                    settle_s: float = SETTLE_S) -> dict[str, Timed]:
    """Warm every candidate up (``warmup`` calls each, the first one timed apart), then time ``runs`` rounds in
    `alternating_order`. With ``warmup`` = 0 the first timed call is also reported as ``first_call_s``."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    timed = {name: Timed() for name in candidates}
    for name, fn in candidates.items():
        for _ in range(warmup):
            seconds, timed[name].last = _call(fn)
            if timed[name].first_call_s is None:
                timed[name].first_call_s = seconds
    for name in alternating_order(list(candidates), runs):
        time.sleep(settle_s)
        seconds, timed[name].last = _call(candidates[name])
        timed[name].seconds.append(seconds)
        if timed[name].first_call_s is None:
            timed[name].first_call_s = seconds
    return timed


def in_fresh_process(module: str, function: str, path, *args) -> dict:
    """``module.function(Path(path), *args)`` in a new Python process; its JSON result. Memory benchmarks measure
    each case this way: the kernel's high-water mark belongs to a process, and freed memory is rarely returned."""
    import json
    import subprocess
    import sys

    call = ", ".join([f"Path({str(path)!r})", *map(repr, args)])
    code = (f"import json; from pathlib import Path; from {module} import {function}; "
            f"print(json.dumps({function}({call})))")
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])
