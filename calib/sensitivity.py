"""How sensitive each quantized layer is: the quantization noise of its input activation and its weight,
measured on real activations (the fallback loop of `calib.quantize` moves the most sensitive layers back to float
first). The whole-graph pass measures it on demand; the block pass (`calib.blockwise`) block by block."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from metacanvas_deploy.calib.activations import Exposer
from metacanvas_deploy.calib.recipes import Recipe


def _fake_quant(x: np.ndarray, lo: float, hi: float, recipe: Recipe, axis: int | None = None) -> np.ndarray:
    """x through the recipe's quantizer: int8/uint8 affine (7-bit weights with reduce_range) or FP8 E4M3."""
    if recipe.format == "fp8":
        import torch

        amax = np.maximum(np.abs(x).max(axis=axis, keepdims=True) if axis is not None else max(abs(lo), abs(hi)),
                          1e-12)
        scale = amax / 448.0
        q = torch.from_numpy(np.ascontiguousarray(x / scale, dtype=np.float32)).to(torch.float8_e4m3fn).float()
        return q.numpy() * scale
    if axis is not None:  # symmetric int8 weights per channel
        levels = 63.0 if recipe.reduce_range else 127.0
        scale = np.maximum(np.abs(x).max(axis=tuple(i for i in range(x.ndim) if i != axis), keepdims=True),
                           1e-12) / levels
        return np.clip(np.round(x / scale), -levels, levels) * scale
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # uint8 activations, affine over the calibrated range
    scale = max(hi - lo, 1e-12) / 255.0
    zp = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def sensitivity(prepared: Path, ranges_cache: Path, nodes: list[str], feeds: Sequence[dict], recipe: Recipe,
                threads: int | None = None, budget: int | None = None) -> dict[str, float]:
    """Per layer: the quantization noise-to-signal ratio of its input activation (calibrated range) plus its
    weight (the recipe's granularity), measured on real activations of ``feeds``: the layer's own share of the
    error, larger = more sensitive. The activation sums accumulate chunk by chunk (`calib.activations`); the
    weights are read one layer at a time."""
    from onnx import numpy_helper
    from onnxruntime.quantization import load_tensors_data

    model = onnx.load(str(prepared), load_external_data=False)
    by_name = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    acts = sorted({by_name[n].input[0] for n in nodes})
    ranges = load_tensors_data(str(ranges_cache)).data
    noise, signal = dict.fromkeys(acts, 0.0), dict.fromkeys(acts, 0.0)
    expose = Exposer(prepared, acts, budget, threads)
    for a, x in expose(feeds):
        lo, hi = (float(v) for v in ranges[a].range_value)
        noise[a] += float(np.sum(np.square(x - _fake_quant(x, lo, hi, recipe)), dtype=np.float64))
        signal[a] += float(np.sum(np.square(x), dtype=np.float64))
    out = {}
    for n in nodes:
        node = by_name[n]
        w = numpy_helper.to_array(inits[node.input[1]], base_dir=str(Path(prepared).parent))
        axis = None
        if recipe.per_channel_weights:
            axis = 1 if node.op_type == "MatMul" else 0  # MatMul (K, N): per output column; Conv/Gemm: per row
        a = node.input[0]
        out[n] = noise[a] / max(signal[a], 1e-30) + _nsr(w, _fake_quant(w, 0.0, 0.0, recipe, axis))
    return out


def _nsr(x: np.ndarray, xq: np.ndarray) -> float:
    noise = np.sum(np.square(x - xq), dtype=np.float64)
    return float(noise / max(np.sum(np.square(x), dtype=np.float64), 1e-30))
