"""Bundles for the benchmarks that start from a model (`compare`, `sweep` without --bundle): built once into a
cache folder by `mc_export.build`, which rebuilds only when the content key changes (weights, config, tools)."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.errors import BenchmarkError

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metacanvas-bench"


def build_config(backbone: str | None, preset: str | None, checkpoint: Path | None, cache: Path):
    """The `mc_export.build.BuildConfig` of the model a benchmark measures: a preset (seed 0, random canvas
    layers: the build's own defaults, so the bundle and the PyTorch model hold the same weights) or a
    checkpoint; no preset and no checkpoint means the `small` preset, the size benchmarks are meant for."""
    from metacanvas_deploy.mc_export.build import BuildConfig

    if backbone is None and checkpoint is None:
        raise BenchmarkError("give --backbone (with --preset) or --checkpoint DIR")
    if checkpoint is None:
        preset = preset or "small"
        name = f"{backbone}-{preset}"
    else:
        name = f"{backbone or 'checkpoint'}-{Path(checkpoint).resolve().name}"
    return BuildConfig(out=Path(cache) / name, backbone=backbone, preset=preset, checkpoint=checkpoint).validate()


def cached_bundle(build_cfg, log=print) -> Path:
    """Build (or find up to date) the bundle of ``build_cfg`` in its cache folder and return its path."""
    from metacanvas_deploy.mc_export.build import build

    return build(build_cfg, log=log)
