"""Qwen2.5-VL's vision encoder as one ONNX graph for any number of images and videos, in memory linear in patches.

Upstream (`Qwen2_5_VisionTransformerPretrainedModel.forward`, transformers 5.23) cannot be exported with a
dynamic image size: it derives rotary positions and the window permutation from `grid_thw` with Python
loops, and its non-flash attention splits q/k/v by `cu_seqlens.tolist()` and attends chunk by chunk, so
a trace bakes in one grid. `ExportableQwenVision` re-composes the tower's own submodules (same weights,
same math; fp32 sums may run in another order) with two changes:

* everything that depends on the grid arrives as tensors computed on the host by
  `runtime.vision_index.vision_inputs` (rotary cos/sin already in window order, window permutation and
  its inverse); the rotary tables stay on the host also because they are the only place where a float64
  could enter the graph, and TensorRT rejects DOUBLE;
* attention runs as a batch of equal segments with no mask: in window order every frame ("full" blocks) and
  every window (the others) is a contiguous run of patches, all of one length when the frames share one size
  that the windows tile (the runtime's fixed square always does; `vision_index.segment_layout` refuses the
  rest). The host hands the structure over as input *shapes*, window_index (F, W, T) and rotary tables
  (F, W, T*merge**2, d); each block reshapes the residual stream to (segments, length, D) and calls SDPA
  with a (segments, H, length, d) batch, which equals upstream's chunk-by-chunk attention. With
  `fused_attention()` (ONNX Runtime targets) that SDPA exports as `com.microsoft.MultiHeadAttention`, whose CPU
  flash path keeps memory linear in patches (`benchmarks/vision_memory.py`); without it (TensorRT) as a
  batched MatMul -> Softmax -> MatMul whose scores are segments * H * length**2, also linear in patches.
  An (N, N) block-diagonal mask, the earlier design, needed 1 GiB per mask and more per head at 16k patches.

A re-composition rather than a patch of upstream modules: the block's attention forward is ~20 lines and a
context manager swapping it would still need the host inputs threaded through `blk(...)`'s kwargs.
The numeric gate (`check_vision_export`) holds it to upstream.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metacanvas_deploy.mc_export.errors import ExportError
from metacanvas_deploy.mc_export.export import attention
from metacanvas_deploy.runtime.vision_index import (
    VISION_INPUT_NAMES,
    VISION_OUTPUT_NAMES,
    VisionGeometry,
    num_patches,
    vision_inputs,
)

OPSET = 20
# Gate: max|ORT - transformers| <= VISION_RTOL * max(1, max|transformers|). Both sides are fp32 and differ
# only in summation order (MatMul vs Conv3d patch embedding, ONNX Runtime's fused attention kernel vs PyTorch's
# SDPA per chunk); on the tiny tower with O(1) activations each lies ~1e-6 relative from a float64 run of
# transformers, and they differ by <= 1.7e-6 relative (fused or decomposed attention alike). 1e-5 leaves room
# for deeper towers; a wrong segment layout, rotary table or permutation shows up as O(1e-1) or more.
VISION_RTOL = 1e-5


class ExportableQwenVision(nn.Module):
    """`visual(pixel_values, grid_thw).pooler_output` with the grid's bookkeeping moved to the host.

    Wraps (and shares the weights of) a `Qwen2_5_VisionTransformerPretrainedModel`. Inputs, named as the
    graph's (N patches, M = N / merge**2 merged tokens, d = head_dim; F frames, W windows per frame, T merged
    tokens per window, M = F * W * T; `runtime.vision_index`):
        pixel_values (N, C*tp*P*P) float32, rotary_cos / rotary_sin (F, W, T*merge**2, d) float32 in window
        order, window_index (F, W, T) int64, reverse_index (M,) int64.
    Output: image_features (M, out_hidden_size) float32 in processor order (what the planner consumes).
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        cfg = visual.config
        self.unit = cfg.spatial_merge_size ** 2
        self.num_heads = cfg.num_heads
        self.fullatt = frozenset(cfg.fullatt_block_indexes)

    def _patch_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Conv3d with kernel == stride over one (C, T, P, P) patch is a GEMM; as MatMul it needs no 5-D view.
        weight = self.visual.patch_embed.proj.weight  # (D, C, T, P, P)
        return F.linear(pixel_values.to(weight.dtype), weight.flatten(1))  # (N, D)

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Upstream `Qwen2_5_VLVisionAttention` within each of S equal segments: x (S, L, D), cos/sin
        (S, 1, L, d) -> (S, L, D). One unmasked SDPA over the batch of segments instead of a loop of chunks."""
        s, length, _ = x.shape
        qkv = attn.qkv(x).reshape(s, length, 3, self.num_heads, -1)  # (S, L, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (S, H, L, d) each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)  # (S, H, L, d)
        return attn.proj(out.transpose(1, 2).reshape(s, length, -1))  # (S, L, D)

    def forward(self, pixel_values: torch.Tensor, rotary_cos: torch.Tensor, rotary_sin: torch.Tensor,
                window_index: torch.Tensor, reverse_index: torch.Tensor) -> torch.Tensor:
        frames, windows, tokens = window_index.shape  # the segment structure, from the host
        h = self._patch_embed(pixel_values)  # (N, D) processor order
        dim = h.shape[-1]
        h = h.reshape(-1, self.unit, dim).index_select(0, window_index.reshape(-1))  # (M, unit, D) window order
        d = rotary_cos.shape[-1]
        layouts = {True: (frames, windows * tokens * self.unit),  # full attention: one segment per frame
                   False: (frames * windows, tokens * self.unit)}  # windowed: one segment per window
        rotary = {full: tuple(t.reshape(s, 1, length, d) for t in (rotary_cos, rotary_sin))  # (S, 1, L, d)
                  for full, (s, length) in layouts.items()}
        for i, blk in enumerate(self.visual.blocks):
            full = i in self.fullatt
            h = h.reshape(*layouts[full], dim)  # (S, L, D)
            h = h + self._attention(blk.attn, blk.norm1(h), *rotary[full])
            h = h + blk.mlp(blk.norm2(h))
        merged = self.visual.merger(h.reshape(-1, dim))  # (M, out_hidden) window order
        return merged.index_select(0, reverse_index)  # (M, out_hidden) processor order


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Upstream `apply_rotary_pos_emb_vision` for one tensor: x (S, H, L, d), cos/sin (S, 1, L, d), in float32."""
    dtype = x.dtype
    x, cos, sin = x.float(), cos.float(), sin.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
    return (x * cos + rotated * sin).to(dtype)


def example_inputs(grid_thw, vision_config, seed: int = 0) -> dict[str, np.ndarray]:
    """Graph inputs for `grid_thw` with random `pixel_values` (standard normal, float32)."""
    geo = VisionGeometry.from_config(vision_config)
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((num_patches(grid_thw), geo.patch_dim), dtype=np.float32)  # (N, C*T*P*P)
    return {"pixel_values": pixels, **vision_inputs(grid_thw, geo)}


def _dynamic_shapes(merge_unit: int) -> dict:
    """Free dims: merged tokens M (patches are N = merge_unit * M), frames F, windows per frame W and merged
    tokens per window T (named so in the ONNX file). M = F * W * T holds for every valid feed, but torch.export
    cannot state a product of dims, and the graph needs none: it reshapes by F, W, T and gathers by index."""
    dim = torch.export.Dim
    tokens, frames = dim("merged_tokens", min=1), dim("vision_frames", min=1)
    windows, per_window = dim("windows_per_frame", min=1), dim("tokens_per_window", min=1)
    rotary = {0: frames, 1: windows, 2: merge_unit * per_window}
    return {"pixel_values": {0: merge_unit * tokens}, "rotary_cos": rotary, "rotary_sin": rotary,
            "window_index": {0: frames, 1: windows, 2: per_window}, "reverse_index": {0: tokens}}


def export_vision_encoder(visual: nn.Module, path, example_grid_thw, opset: int = OPSET,
                          fused_attention: bool = True) -> None:
    """Export `visual` (a Qwen2.5-VL vision tower, eval mode) to ONNX at `path`, dynamic in frames and their size.

    One graph serves any number of images/video frames of one size whose windows are equal (any size
    `vision_index.segment_layout` accepts); feed it `runtime.vision_index.vision_inputs` plus `pixel_values`.
    `example_grid_thw` only shapes the trace (use one with several windows per frame, each of several tokens).
    ``fused_attention``: attention as ONNX Runtime's `MultiHeadAttention` (True, for ONNX Runtime) or decomposed
    (False, for TensorRT), as `export_component`.
    Raises ExportError if the graph holds DOUBLE tensors or ScatterND (TensorRT rejects / runs them badly).
    """
    wrapper = ExportableQwenVision(visual).eval()
    feeds = {k: torch.from_numpy(v) for k, v in example_inputs(example_grid_thw, visual.config).items()}
    args = tuple(feeds[name] for name in VISION_INPUT_NAMES)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.ExitStack() as stack:
        if fused_attention:
            stack.enter_context(attention.fused_attention())
        # N = unit * M makes the exporter say it keeps one name per shared axis ("4*merged_tokens"): expected.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                    input_names=list(VISION_INPUT_NAMES), output_names=list(VISION_OUTPUT_NAMES),
                                    dynamic_shapes=_dynamic_shapes(wrapper.unit),
                                    custom_translation_table=attention.TRANSLATIONS if fused_attention else None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    check_graph_ops(path)


def check_graph_ops(path) -> None:
    """Raise ExportError if the ONNX file at `path` has a DOUBLE tensor or a Scatter node."""
    from metacanvas_deploy.mc_export.export.onnx_export import check_graph

    check_graph(Path(path))


def check_vision_export(visual: nn.Module, path, grids, rtol: float = VISION_RTOL) -> list[dict]:
    """The numeric gate: ONNX Runtime on `path` vs `visual(pixel_values, grid_thw).pooler_output` per grid.

    `pixel_values` are random (seeded per grid). Returns one row per grid (grid, max_abs, scale, rel, cosine,
    seconds of the ORT run); raises ExportError with the table if any `max_abs > rtol * max(1, max|reference|)`.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = []
    for grid in grids:
        feeds = example_inputs(grid, visual.config, seed=len(rows))
        with torch.no_grad():
            ref = visual(torch.from_numpy(feeds["pixel_values"]), torch.tensor(grid)).pooler_output.numpy()
        start = time.perf_counter()
        (got,) = session.run(list(VISION_OUTPUT_NAMES), feeds)
        seconds = time.perf_counter() - start
        max_abs = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
        scale = max(1.0, float(np.abs(ref).max()))
        cosine = float((got * ref).sum() / np.sqrt((got * got).sum() * (ref * ref).sum())) \
            if got.shape == ref.shape else float("nan")
        rows.append(dict(grid=np.asarray(grid).tolist(), max_abs=max_abs, scale=scale, rel=max_abs / scale,
                         cosine=cosine, seconds=seconds))
    bad = [r for r in rows if not r["rel"] <= rtol]
    if bad:
        table = "\n".join(f"  grid {r['grid']}: max_abs {r['max_abs']:.3g}, scale {r['scale']:.3g}, "
                          f"cosine {r['cosine']:.6f}" for r in rows)
        raise ExportError(f"vision encoder ONNX vs transformers beyond rel {rtol}:\n{table}")
    return rows
