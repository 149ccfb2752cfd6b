"""Activation ranges of named tensors over calibration calls, in ONNX Runtime's calibration-cache format (the one
collector the whole-graph pass, `calib.quantize.calibrate`, and the block pass, `calib.blockwise`, share: the two
agree because every tensor's statistic sees the same values in the same call order)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metacanvas_deploy.calib.activations import Exposer
from metacanvas_deploy.calib.recipes import Recipe

_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def method(recipe: Recipe):
    """ONNX Runtime's CalibrationMethod for the recipe's calibration."""
    from onnxruntime.quantization import CalibrationMethod

    return getattr(CalibrationMethod, _METHODS[recipe.calibration])


def collect_ranges(model_path: Path, tensors: list[str], feeds: Sequence[dict], recipe: Recipe,
                   threads: int | None = None, budget: int | None = None) -> dict:
    """tensor -> range (minmax: ``(lo, hi)`` float32; percentile / entropy: ORT's TensorData) of each of
    ``tensors`` of the graph at ``model_path`` over ``feeds``, each call collected on its own, in chunks of at
    most ``budget`` bytes (`calib.activations`), with ORT's histogram collectors.

    ORT's own calibrator stacks each tensor's samples into one array, which fails when shapes differ between
    requests (prompt lengths do) and holds every call's activations at once. A tensor's statistic only ever
    sees its own values, call by call in ``feeds``' order, so the ranges do not depend on the chunking, nor on
    which graph (the whole stage or one block of it) produced the values."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    if not tensors:
        return {}
    expose = Exposer(model_path, tensors, budget, threads)
    if recipe.calibration == "minmax":
        lo, hi = {}, {}
        for t, v in expose(feeds):
            lo[t] = min(lo.get(t, np.inf), float(v.min()))
            hi[t] = max(hi.get(t, -np.inf), float(v.max()))
        return {t: (np.float32(lo[t]), np.float32(hi[t])) for t in tensors}
    collector = HistogramCollector(method=recipe.calibration, symmetric=False,
                                   num_bins=2048 if recipe.calibration == "percentile" else 128,
                                   num_quantized_bins=128, percentile=recipe.percentile, scenario="same")
    with contextlib.redirect_stdout(io.StringIO()):  # the collector prints per call
        for t, v in expose(feeds):
            collector.collect({t: [v]})
        return collector.compute_collection_result()


def save_ranges(data: dict, recipe: Recipe, cache: Path) -> None:
    """Write ``data`` (`collect_ranges`'s) as ONNX Runtime's calibration cache at ``cache``."""
    from onnxruntime.quantization import TensorsData, save_tensors_data

    save_tensors_data(TensorsData(method(recipe), data), cache)


def load_ranges(cache: Path) -> dict:
    """tensor -> TensorData of a calibration cache."""
    from onnxruntime.quantization import load_tensors_data

    return dict(load_tensors_data(str(cache)).data)
