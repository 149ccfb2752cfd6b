"""`latency`: one bundle through `runtime.Pipeline`, per stage and end to end, with peak memory and the runtime's
own overhead. numpy + onnxruntime only (no torch).

Per stage the figure is what the runtime reports per request (`GenerationOutput.timings` / `.calls`):
the planner per request (its graph includes canvas preparation: "planner+canvas"), the denoise step per call
(the request's step time / steps), every other stage per request (the Wan VAE streams several calls into one
figure). The runtime overhead is the request's wall time minus the time inside engines: host-side input
preparation, scheduler bookkeeping, checks and copies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.env import fingerprint
from benchmarks.errors import BenchmarkError
from benchmarks.timing import percentile, summarize
from metacanvas_deploy.runtime.media import synthetic_media
from metacanvas_deploy.runtime.memory import lifetime_peak_rss_mb, rss_phase

DEFAULT_PROMPT = "a red fox running through snow at dawn, cinematic lighting"
# Report labels of stages whose name alone would mislead.
STAGE_LABELS = {"planner": "planner+canvas", "denoise": "denoise step"}


@dataclass(frozen=True)
class LatencyConfig:
    """One `latency` run. ``steps`` / ``task``: None means the bundle's default step count / first task."""

    bundle: Path
    runs: int = 10
    warmup: int = 2
    threads: int = 2
    steps: int | None = None
    task: str | None = None
    prompt: str = DEFAULT_PROMPT

    def validate(self) -> LatencyConfig:
        if self.runs < 1 or self.warmup < 0 or self.threads < 1 or (self.steps is not None and self.steps < 1):
            raise BenchmarkError(f"need runs >= 1, warmup >= 0, threads >= 1, steps >= 1; got runs={self.runs} "
                                 f"warmup={self.warmup} threads={self.threads} steps={self.steps}")
        if not (Path(self.bundle) / "manifest.json").is_file():
            raise BenchmarkError(f"{self.bundle} is not a bundle (no manifest.json); build one with "
                                 "`python -m mc_export build ... --out DIR`")
        return self


class _LoopClock:
    """Wraps a pipeline's `denoise` (the step loop) on the instance and keeps the wall time of its last call,
    so that the overhead splits into the step loop's and the rest of the request's."""

    def __init__(self, pipe):
        self.inner, self.last_s = pipe.denoise, 0.0
        pipe.denoise = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.last_s = time.perf_counter() - start


def _one_request(pipe, call, clock: _LoopClock, seed: int) -> dict:
    """One timed request: seconds inside each engine, its call counts, the wall time ("total") and the step
    loop's wall time ("loop")."""
    out = call(seed)
    calls = dict(out.calls)  # this request's engine calls per stage
    return {"timings": dict(out.timings), "calls": calls, "loop": clock.last_s}


def _stage_rows(samples: list[dict]) -> list[dict]:
    """Rows per exercised stage in run order: denoise per call, the rest per request."""
    rows = []
    for stage in samples[0]["calls"]:
        per = "call" if stage == "denoise" else "request"
        seconds = [s["timings"][stage] / (s["calls"][stage] if per == "call" else 1) for s in samples]
        rows.append({"name": STAGE_LABELS.get(stage, stage), "stage": stage, "per": per,
                     "calls_per_request": samples[0]["calls"][stage], **summarize(seconds)})
    return rows


def _overhead(samples: list[dict], steps: int) -> tuple[dict, dict]:
    """Wall time minus engine time: its row (per request), and p50s over runs: per request, per step, as a % of
    the time inside engines (the figure the 2% target reads), and split into the step loop's share per step
    (loop wall time - denoise engine time) and the rest of the request's (input preparation, post-processing)."""
    engine = [sum(v for k, v in s["timings"].items() if k != "total") for s in samples]
    over = [s["timings"]["total"] - e for s, e in zip(samples, engine)]
    loop = [(s["loop"] - s["timings"]["denoise"]) / steps for s in samples]
    pct = [100.0 * o / e for o, e in zip(over, engine)]
    row = {"name": "runtime overhead", "stage": None, "per": "request", "calls_per_request": None,
           **summarize(over)}
    return row, {"per_request_ms": row["p50_ms"], "per_step_ms": row["p50_ms"] / steps,
                 "engine_ms": 1000.0 * percentile(engine, 50), "pct_of_engine": percentile(pct, 50),
                 "pct_of_engine_p90": percentile(pct, 90), "step_loop_per_step_ms": 1000.0 * percentile(loop, 50),
                 "outside_step_loop_ms": 1000.0 * percentile([o - x * steps for o, x in zip(over, loop)], 50)}


def run_latency(cfg: LatencyConfig, log=print) -> dict:
    """Load the bundle, warm up, time ``cfg.runs`` requests. Returns the result JSON (kind "latency")."""
    from metacanvas_deploy.runtime.pipeline import Pipeline

    cfg = cfg.validate()
    with rss_phase() as load_mem:
        pipe = Pipeline.load(cfg.bundle, threads=cfg.threads)
    m = pipe.manifest
    task = cfg.task or m.tasks[0]
    if task not in m.tasks:
        raise BenchmarkError(f"task {task!r} is not in this bundle; it serves {', '.join(m.tasks)}")
    d = m.defaults
    media = synthetic_media(task, d["height"], d["width"], d["num_frames"])

    def call(seed: int):
        return pipe(cfg.prompt, task=task, num_inference_steps=cfg.steps, seed=seed, **media)

    log(f"latency: {m.backbone} ({m.preset}) task {task}, {cfg.warmup} warm-up + {cfg.runs} runs, "
        f"{cfg.threads} threads")
    clock = _LoopClock(pipe)
    with rss_phase() as run_mem:
        for i in range(cfg.warmup):
            call(i)
        samples = [_one_request(pipe, call, clock, cfg.warmup + i) for i in range(cfg.runs)]
    steps = samples[0]["calls"]["denoise"]
    planner_calls = [s["calls"].get("planner", 0) for s in samples]
    overhead_row, overhead = _overhead(samples, steps)
    total = {"name": "end to end", "stage": None, "per": "request", "calls_per_request": None,
             **summarize([s["timings"]["total"] for s in samples])}
    return {
        "kind": "latency", "env": fingerprint(cfg.threads, {"bundle": cfg.bundle}),
        "config": {"bundle": str(cfg.bundle), "backbone": m.backbone, "preset": m.preset, "task": task,
                   "runs": cfg.runs, "warmup": cfg.warmup, "threads": cfg.threads, "steps": steps,
                   "height": d["height"], "width": d["width"], "num_frames": d["num_frames"], "prompt": cfg.prompt},
        "rows": [*_stage_rows(samples), total, overhead_row],
        "not_exercised": [s for s in pipe.engines if s not in samples[0]["calls"]],
        "overhead": overhead,
        "checks": {"planner_calls_per_request": planner_calls, "planner_once": all(c == 1 for c in planner_calls)},
        "memory": {"load": load_mem, "requests": run_mem, "lifetime_peak_mb": lifetime_peak_rss_mb()},
    }
