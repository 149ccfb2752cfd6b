"""Weight-only quantization: block-wise 8- and 4-bit weights, activations in float (`--precision w8|w4`).

The block quantizer (round to nearest), one numpy reference that every graph form is tested against bit for bit:
a weight matrix W (K, N), as a MatMul reads it, is cut along K into blocks of ``block_size`` per output column;
each block has its own float32 scale (and, asymmetric, an integer zero point):

    symmetric   scale = max|w| / (2^(b-1) - 1)           q = clip(rint(w / scale), -(2^(b-1)-1), 2^(b-1)-1)
    asymmetric  scale = (max(w, 0) - min(w, 0)) / (2^b-1) zp = clip(rint(-min(w, 0) / scale), 0, 2^b-1)
                                                          q = clip(rint(w / scale) + zp, 0, 2^b-1)
    dequantized = (q - zp) * scale                        (symmetric: zp = 0; an all-zero block: scale 1)

Two graph forms carry the same numbers (`calib.weight_only_graph` writes them):
- ONNX Runtime: `com.microsoft.MatMulNBits` (bits 4/8, attributes K, N, bits, block_size): B packed uint8
  (N, K/block, block*bits/8), codes stored unsigned (symmetric: q + 2^(b-1), which is MatMulNBits' default zero
  point, so none is written), scales (N * K/block,), asymmetric zero points uint8 (4 bits: two per byte, low
  nibble first, per column). Embedding tables: `com.microsoft.GatherBlockQuantized` (rows quantized along the
  feature axis).
- TensorRT: opset-21 `DequantizeLinear` (axis 0, block_size) on the weight, then the original MatMul: int4/int8
  codes (symmetric, zero points of the same type, all zero, as TensorRT's IDequantizeLayer requires), scales
  (K/block, N). ONNX Runtime's CPU provider runs this form too: it is the parity oracle here.

Data-aware (``weight_method: awq`` in a recipe; AWQ, Lin et al. 2024): before rounding, each input channel k of W
is scaled by s_k = a_k^alpha (a_k: the RMS of input channel k on calibration calls, normalised so that
sqrt(max(s) min(s)) = 1) and the activation is divided by it in the graph (a `Mul` by 1/s before the layer):
x W = (x / s)(s W), so channels that carry large activations get finer steps. alpha is searched on a grid for
the least activation-weighted error sum_k E[x_k^2] |Q(s W)_k / s_k - W_k|^2 (the diagonal of E|x (W' - W)|^2);
alpha = 0 is round to nearest, so the chosen scale is never worse than it on that measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metacanvas_deploy.calib.errors import RecipeError

WEIGHT_ONLY_BITS = {"w8": 8, "w4": 4}


@dataclass(frozen=True)
class BlockSpec:
    """How one weight is quantized: bits (4 or 8), block length along K, symmetric or affine."""

    bits: int
    block_size: int
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise RecipeError(f"weight-only quantization takes 4 or 8 bits, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise RecipeError(f"block_size must be a power of 2 >= 16 (MatMulNBits' rule), got {self.block_size}")


@dataclass
class BlockQuantized:
    """A (K, N) weight quantized per block along K, per output column."""

    codes: np.ndarray  # (N, K // block) x block, uint8 codes 0..2^bits-1, as (N, K) (symmetric: q + 2^(bits-1))
    scales: np.ndarray  # (N, K // block) float32
    zero_points: np.ndarray  # (N, K // block) uint8 (symmetric: 2^(bits-1))
    spec: BlockSpec

    @property
    def offset(self) -> int:
        """What a symmetric code is stored above its signed value (MatMulNBits' default zero point)."""
        return 1 << (self.spec.bits - 1)


def check_divisible(name: str, k: int, block_size: int) -> None:
    """RecipeError unless ``block_size`` divides the input dimension ``k`` of the weight ``name``."""
    if k % block_size:
        raise RecipeError(f"block_size {block_size} does not divide the input dimension K={k} of {name}; pick a "
                          f"block size that divides every quantized layer's K (e.g. {_divisor(k, block_size)}) or "
                          "keep the layer float (keep_float)")


def _divisor(k: int, block_size: int) -> int:
    b = block_size
    while b >= 16 and k % b:
        b //= 2
    return b if b >= 16 and k % b == 0 else 16


# Columns are quantized in chunks of about this many elements: numpy's temporaries (|w|, w / scale, rint, clip) then
# stay a few times 64 MiB even for the full-size planner's 545M-element embedding table.
CHUNK_ELEMENTS = 1 << 24


def quantize_blocks(w: np.ndarray, spec: BlockSpec) -> BlockQuantized:
    """The reference block quantizer of a MatMul weight ``w`` (K, N). Deterministic float32 arithmetic; columns are
    independent, so quantizing them in chunks changes nothing."""
    k, n = w.shape
    check_divisible("the weight", k, spec.block_size)
    step = max(1, CHUNK_ELEMENTS // k)
    if n > step:
        parts = [quantize_blocks(w[:, j:j + step], spec) for j in range(0, n, step)]
        return BlockQuantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                              np.concatenate([p.zero_points for p in parts]), spec)
    blocks = np.ascontiguousarray(np.asarray(w, np.float32).T).reshape(n, k // spec.block_size, spec.block_size)
    levels = np.float32((1 << spec.bits) - 1)
    if spec.symmetric:
        qmax = np.float32((1 << (spec.bits - 1)) - 1)
        scale = np.abs(blocks).max(axis=-1) / qmax
        scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[..., None]), -qmax, qmax) + np.float32(1 << (spec.bits - 1))
        zp = np.full(scale.shape, 1 << (spec.bits - 1), np.uint8)
    else:
        lo = np.minimum(blocks.min(axis=-1), np.float32(0))
        hi = np.maximum(blocks.max(axis=-1), np.float32(0))
        scale = (hi - lo) / levels
        scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
        zpf = np.clip(np.rint(-lo / scale), 0, levels)
        q = np.clip(np.rint(blocks / scale[..., None]) + zpf[..., None], 0, levels)
        zp = zpf.astype(np.uint8)
    return BlockQuantized(q.astype(np.uint8).reshape(n, k), scale, zp, spec)


def dequantize_blocks(bq: BlockQuantized) -> np.ndarray:
    """(q - zp) * scale back to the (K, N) weight, in the order ONNX's DequantizeLinear computes it."""
    n, k = bq.codes.shape
    bs = bq.spec.block_size
    diff = bq.codes.reshape(n, k // bs, bs).astype(np.int32) - bq.zero_points[..., None].astype(np.int32)
    return np.ascontiguousarray((diff.astype(np.float32) * bq.scales[..., None]).reshape(n, k).T)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two per byte, the first in the low nibble (odd length: a zero
    nibble is added)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits_tensors(bq: BlockQuantized) -> dict[str, np.ndarray]:
    """MatMulNBits' B, scales and (asymmetric only) zero_points for ``bq``."""
    n, k = bq.codes.shape
    bs = bq.spec.block_size
    blocks = bq.codes.reshape(n, k // bs, bs)
    packed = pack_nibbles(blocks) if bq.spec.bits == 4 else blocks
    out = {"B": np.ascontiguousarray(packed), "scales": bq.scales.reshape(-1).copy()}
    if not bq.spec.symmetric:
        zp = pack_nibbles(bq.zero_points) if bq.spec.bits == 4 else bq.zero_points
        out["zero_points"] = np.ascontiguousarray(zp).reshape(-1)
    return out


def dequantize_linear_tensors(bq: BlockQuantized) -> dict[str, np.ndarray]:
    """DequantizeLinear(axis 0, block_size) inputs for ``bq``: codes (K, N), scales (K / block, N), zero points
    (K / block, N); symmetric codes signed (int4 / int8, zero points 0), asymmetric unsigned (uint4 / uint8).
    4-bit arrays come as ml_dtypes int4 / uint4."""
    import ml_dtypes

    if bq.spec.symmetric:
        codes = bq.codes.astype(np.int16) - bq.offset
        zp = np.zeros(bq.scales.shape, np.int16)
        kind = ml_dtypes.int4 if bq.spec.bits == 4 else np.int8
    else:
        codes, zp = bq.codes, bq.zero_points
        kind = ml_dtypes.uint4 if bq.spec.bits == 4 else np.uint8
    return {"x": np.ascontiguousarray(codes.T).astype(kind), "scale": np.ascontiguousarray(bq.scales.T),
            "zero_point": np.ascontiguousarray(zp.T).astype(kind)}


def gather_block_tensors(table: np.ndarray, spec: BlockSpec) -> dict[str, np.ndarray]:
    """GatherBlockQuantized's uint8 data, scales and (asymmetric) zero points for an embedding table (V, D),
    each row quantized in blocks along D (the reference quantizer on the table's transpose)."""
    bq = quantize_blocks(np.asarray(table, np.float32).T, spec)  # a view; codes (V, D), rows quantized in chunks
    data = pack_nibbles(bq.codes) if spec.bits == 4 else bq.codes
    out = {"data": np.ascontiguousarray(data), "scales": bq.scales}
    if not spec.symmetric:
        out["zero_points"] = np.ascontiguousarray(pack_nibbles(bq.zero_points) if spec.bits == 4
                                                  else bq.zero_points)
    return out


def weight_error(w: np.ndarray, spec: BlockSpec) -> float:
    """Noise-to-signal ratio of ``w``'s quantization (the fallback loop's data-free sensitivity)."""
    d = dequantize_blocks(quantize_blocks(w, spec)) - w
    return float(np.sum(np.square(d), dtype=np.float64) / max(np.sum(np.square(w), dtype=np.float64), 1e-30))


AWQ_GRID = tuple(i / 20 for i in range(21))  # alpha = 0, 0.05 .. 1 (AWQ's own search: 20 points)


def weighted_error(w: np.ndarray, power: np.ndarray, spec: BlockSpec, scale: np.ndarray | None = None) -> float:
    """sum_k power_k |W'_k - W_k|^2 / sum_k power_k |W_k|^2 for ``w`` (K, N) quantized with input-channel
    ``scale`` (None: round to nearest), W' = Q(scale W) / scale; ``power``: E[x_k^2] per input channel."""
    w = np.asarray(w, np.float32)
    s = np.ones(w.shape[0], np.float32) if scale is None else np.asarray(scale, np.float32)
    d = dequantize_blocks(quantize_blocks(w * s[:, None], spec)) / s[:, None] - w
    p = np.asarray(power, np.float64)
    return float(p @ np.sum(np.square(d, dtype=np.float64), axis=1)
                 / max(float(p @ np.sum(np.square(w, dtype=np.float64), axis=1)), 1e-30))


def awq_scale(w: np.ndarray, power: np.ndarray, spec: BlockSpec, grid: tuple[float, ...] = AWQ_GRID
              ) -> tuple[np.ndarray, float, float]:
    """AWQ's input-channel scale for ``w`` (K, N) given ``power`` (E[x_k^2], (K,)): the grid point alpha with the
    least `weighted_error` (see the module doc). Returns (scale float32 (K,), alpha, its error)."""
    rms = np.sqrt(np.asarray(power, np.float64))
    rms = np.maximum(rms, max(float(rms.max()), 1e-30) * 1e-4)  # a dead channel: no scale to 0
    best = None
    for alpha in grid:
        s = rms ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = weighted_error(w, power, spec, s)
        if best is None or err < best[2]:
            best = (s, float(alpha), err)
    return best
