"""Where an ONNX Runtime engine's time goes: its per-operator profile, aggregated by op type.

ONNX Runtime's profiler (`SessionOptions.enable_profiling`) writes a Chrome-trace JSON: one "Node" event per
kernel run (name ``<node>_kernel_time``, ``dur`` in microseconds, ``args.op_name`` the op type) and one
"Session" ``model_run`` event per run. The first run is a warm-up (arena growth, first-touch pages): its
events are dropped by timestamp.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

TOP = 10


def aggregate_profile(events: list[dict]) -> dict:
    """Aggregate a profile's events by op type, ignoring the first (warm-up) ``model_run`` and every event
    before its end. Returns {"runs": measured runs, "run_ms": mean wall time per run,
    "ops": [{"op_type", "ms_per_run", "calls_per_run", "pct_of_run"}, ...] largest first}; ``pct_of_run`` is
    the share of the run's wall time (kernel times of parallel branches can add up to more than 100%)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) < 2:
        raise ValueError(f"the profile holds {len(runs)} model runs; need a warm-up run and at least one more")
    start = runs[0]["ts"] + runs[0]["dur"]
    measured = runs[1:]
    run_ms = sum(e["dur"] for e in measured) / 1000.0 / len(measured)
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            t = totals.setdefault(e["args"]["op_name"], [0.0, 0])
            t[0] += e["dur"] / 1000.0
            t[1] += 1
    ops = [{"op_type": op, "ms_per_run": ms / len(measured), "calls_per_run": calls / len(measured),
            "pct_of_run": 100.0 * ms / len(measured) / run_ms} for op, (ms, calls) in totals.items()]
    return {"runs": len(measured), "run_ms": run_ms, "ops": sorted(ops, key=lambda r: -r["ms_per_run"])}


def top_ops(profile: dict, k: int = TOP) -> list[dict]:
    """The ``k`` op types with the most time per run."""
    return profile["ops"][:k]


def profile_engine(model_path: str | Path, feeds: Mapping[str, np.ndarray], threads: int, runs: int = 3) -> dict:
    """Run ``model_path`` 1 + ``runs`` times in a profiling session set up as the runtime's engines are
    (`runtime.engine.OrtEngine`: all graph optimisations, ``threads`` intra-op, 1 inter-op thread) and return
    `aggregate_profile` of it. The trace file is written to a temporary folder and removed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="mc-profile-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        for _ in range(1 + runs):
            session.run(None, dict(feeds))
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
    return aggregate_profile(events)
