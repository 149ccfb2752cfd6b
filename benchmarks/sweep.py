"""`sweep`: denoise-step latency against the number of latent tokens, over sizes inside a bundle's ranges.

Each point's step inputs are the ones the runtime itself feeds: one 1-step request runs through
`runtime.Pipeline`, observed (`Pipeline.observe`) to keep the denoise engine's first feeds, then that engine is
timed on them alone. numpy + onnxruntime only (matplotlib for the plot, imported when plotting).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.bundles import DEFAULT_CACHE, build_config, cached_bundle
from benchmarks.env import fingerprint
from benchmarks.errors import BenchmarkError
from benchmarks.latency import DEFAULT_PROMPT
from benchmarks.timing import run_alternating, summarize
from metacanvas_deploy.runtime.media import synthetic_media


@dataclass(frozen=True)
class SweepConfig:
    """One `sweep` run over ``points`` sizes per swept axis (resolution; frames too for video bundles). The
    bundle: ``bundle``, or (None) the one built from backbone/preset/checkpoint into ``cache`` (needs torch)."""

    bundle: Path | None = None
    backbone: str | None = None
    preset: str | None = None
    checkpoint: Path | None = None
    cache: Path = DEFAULT_CACHE
    runs: int = 5
    warmup: int = 1
    threads: int = 2
    points: int = 4
    task: str | None = None

    def validate(self) -> SweepConfig:
        if self.runs < 1 or self.warmup < 0 or self.threads < 1 or self.points < 1:
            raise BenchmarkError(f"need runs >= 1, warmup >= 0, threads >= 1, points >= 1; got runs={self.runs} "
                                 f"warmup={self.warmup} threads={self.threads} points={self.points}")
        if self.bundle is not None and not (Path(self.bundle) / "manifest.json").is_file():
            raise BenchmarkError(f"{self.bundle} is not a bundle (no manifest.json)")
        return self

    def bundle_dir(self, log=print) -> Path:
        """``bundle``, or the cached build of the model (`benchmarks.bundles`)."""
        if self.bundle is not None:
            return Path(self.bundle)
        return cached_bundle(build_config(self.backbone, self.preset, self.checkpoint, self.cache), log)


def _spaced(lo: int, hi: int, count: int, multiple: int, offset: int = 0) -> list[int]:
    """``count`` values from lo to hi (both included when count > 1), each ``offset + k * multiple``."""
    raw = np.linspace(lo, hi, count) if count > 1 else [hi]
    return sorted({int(offset + (v - offset) // multiple * multiple) for v in raw})


def sweep_points(ranges, multiples, defaults, count: int) -> list[tuple[int, int, int]]:
    """(height, width, num_frames) to measure: ``count`` resolutions from the smallest to the largest the
    bundle serves (height and width moving together, at the default frame count), and for a video bundle
    ``count`` frame counts at the default resolution. Every value lands on the bundle's multiples."""
    heights = _spaced(*ranges["height"], count, multiples["height"])
    widths = _spaced(*ranges["width"], count, multiples["width"])
    points = {(h, w, defaults["num_frames"]) for h, w in zip(heights, widths)}
    lo_f, hi_f = ranges["num_frames"]
    if hi_f > lo_f:
        frames = _spaced(lo_f, hi_f, count, multiples["num_frames_minus_1"], offset=1)
        points |= {(defaults["height"], defaults["width"], f) for f in frames}
    return sorted(points, key=lambda p: (p[2], p[0] * p[1]))


def step_feeds(pipe, task: str, height: int, width: int, num_frames: int) -> dict[str, np.ndarray]:
    """The denoise engine's inputs of the first step of a request at this size, as the runtime builds them
    (seen through `Pipeline.observe`)."""
    first: list[dict[str, np.ndarray]] = []

    def keep_first(feeds, outputs) -> None:
        if not first:
            first.append({k: np.array(v, copy=True) for k, v in feeds.items()})

    with pipe.observe("denoise", keep_first):
        pipe(DEFAULT_PROMPT, task=task, height=height, width=width, num_frames=num_frames, num_inference_steps=1,
             **synthetic_media(task, height, width, num_frames))
    return first[0]


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Time the denoise step at every `sweep_points` size. Returns the result JSON (kind "sweep")."""
    from metacanvas_deploy.runtime.pipeline import Pipeline

    cfg = cfg.validate()
    bundle = cfg.bundle_dir(log)
    pipe = Pipeline.load(bundle, threads=cfg.threads)
    m = pipe.manifest
    task = cfg.task or m.tasks[0]
    if task not in m.tasks:
        raise BenchmarkError(f"task {task!r} is not in this bundle; it serves {', '.join(m.tasks)}")
    engine, rows = pipe.engines["denoise"], []
    for h, w, f in sweep_points(m.ranges, m.multiples, m.defaults, cfg.points):
        feeds = step_feeds(pipe, task, h, w, f)
        frames, h_tok, w_tok = pipe.token_grid(SimpleNamespace(height=h, width=w, num_frames=f))  # duck Request
        timed = run_alternating({"step": lambda feeds=feeds: engine(feeds)}, cfg.runs, cfg.warmup)["step"]
        tokens = frames * h_tok * w_tok
        rows.append({"name": f"denoise step @ {tokens} tokens ({h}x{w}x{f})", "height": h, "width": w,
                     "num_frames": f, "latent_tokens": tokens, **summarize(timed.seconds)})
        log(f"  {rows[-1]['name']}: p50 {rows[-1]['p50_ms']:.1f} ms")
    return {"kind": "sweep", "env": fingerprint(cfg.threads, {"bundle": bundle}),
            "config": {"bundle": str(bundle), "backbone": m.backbone, "preset": m.preset, "task": task,
                       "runs": cfg.runs, "warmup": cfg.warmup, "threads": cfg.threads},
            "rows": rows}


def plot_sweep(result: dict, path: str | Path) -> Path:
    """Write a PNG of the step's p50 against latent tokens (a bar up to p90 at each point); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["rows"], key=lambda r: r["latent_tokens"])
    tokens = [r["latent_tokens"] for r in rows]
    p50 = [r["p50_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(tokens, p50, yerr=[[0] * len(rows), [r["p90_ms"] - r["p50_ms"] for r in rows]], marker="o",
                capsize=3, label="p50 (bar: p90)")
    c = result["config"]
    ax.set(xlabel="latent tokens per step", ylabel="denoise step (ms)",
           title=f"{c['backbone']} ({c['preset']}), {c['threads']} threads")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
