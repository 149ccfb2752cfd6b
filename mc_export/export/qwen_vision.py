"""Qwen2.5-VL's vision encoder as one ONNX graph for any number of images, any image size and videos.

Upstream (`Qwen2_5_VisionTransformerPretrainedModel.forward`, transformers 5.23) cannot be exported with a
dynamic image size: it derives rotary positions and the window permutation from `grid_thw` with Python
loops, and its non-flash attention splits q/k/v by `cu_seqlens.tolist()` and attends chunk by chunk, so
a trace bakes in one grid. `ExportableQwenVision` re-composes the tower's own submodules (same weights,
same math; fp32 sums may run in another order) with two changes:

* everything that depends on the grid arrives as tensors computed on the host by
  `runtime.vision_index.vision_inputs` (rotary cos/sin already in window order, window permutation and
  its inverse, segment ids); the rotary tables stay on the host also because they are the only place
  where a float64 could enter the graph, and TensorRT rejects DOUBLE;
* every block runs ONE attention over all N patches with a block-diagonal mask built in the graph from
  (N,) segment ids (`seg[:, None] == seg[None, :]`), which equals attending chunk by chunk. Segment ids
  rather than (N, N) masks as inputs: a mask is N*N values per kind, 1 GiB each at 16k patches.

A re-composition rather than a patch of upstream modules: the block's attention forward is ~20 lines and a
context manager swapping it would still need the host inputs threaded through `blk(...)`'s kwargs.
The numeric gate (`check_vision_export`) holds it to upstream.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metacanvas_deploy.mc_export.errors import ExportError
from metacanvas_deploy.runtime.vision_index import (
    VISION_INPUT_NAMES,
    VISION_OUTPUT_NAMES,
    VisionGeometry,
    num_patches,
    vision_inputs,
)

OPSET = 20
# Gate: max|ORT - transformers| <= VISION_RTOL * max(1, max|transformers|). Both sides are fp32 and differ
# only in summation order (MatMul vs Conv3d patch embedding, one masked softmax vs per-chunk softmax); on the
# tiny tower with O(1) activations each lies ~1e-6 relative from a float64 run of transformers, and they
# differ by <= 1.4e-6 relative. 1e-5 leaves room for deeper towers; a wrong mask, rotary table or
# permutation shows up as O(1e-1) or more.
VISION_RTOL = 1e-5


class ExportableQwenVision(nn.Module):
    """`visual(pixel_values, grid_thw).pooler_output` with the grid's bookkeeping moved to the host.

    Wraps (and shares the weights of) a `Qwen2_5_VisionTransformerPretrainedModel`. Inputs, named as the
    graph's (N patches, M = N / merge**2 merged tokens, d = head_dim):
        pixel_values (N, C*T*P*P) float32, rotary_cos / rotary_sin (N, d) float32 in window order,
        window_index / reverse_index (M,) int64, full_segment_ids / window_segment_ids (N,) int64.
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

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        """Upstream `Qwen2_5_VLVisionAttention` with one masked attention over all N instead of chunks."""
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, H, d) each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)  # (1, H, N, d)
        return attn.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))  # (N, D)

    def forward(self, pixel_values: torch.Tensor, rotary_cos: torch.Tensor, rotary_sin: torch.Tensor,
                window_index: torch.Tensor, reverse_index: torch.Tensor, full_segment_ids: torch.Tensor,
                window_segment_ids: torch.Tensor) -> torch.Tensor:
        h = self._patch_embed(pixel_values)  # (N, D) processor order
        n, dim = h.shape
        h = h.reshape(n // self.unit, self.unit, dim).index_select(0, window_index).reshape(n, dim)  # window order
        full, windowed = (_additive_mask(s, h.dtype) for s in (full_segment_ids, window_segment_ids))  # (N, N)
        for i, blk in enumerate(self.visual.blocks):
            mask = full if i in self.fullatt else windowed
            h = h + self._attention(blk.attn, blk.norm1(h), rotary_cos, rotary_sin, mask)
            h = h + blk.mlp(blk.norm2(h))
        merged = self.visual.merger(h)  # (M, out_hidden) window order
        return merged.index_select(0, reverse_index)  # (M, out_hidden) processor order


def _additive_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N,) segment ids -> (N, N) mask of `dtype`: 0 within a segment, the dtype's min across (never -inf, so even a
    row with nothing allowed could not turn into NaN). Additive rather than boolean: SDPA with a boolean
    mask exports with an extra IsNaN/Where per block, and MatMul-Add-Softmax is the pattern TensorRT fuses."""
    same = segment_ids[:, None] == segment_ids[None, :]  # (N, N) bool
    zero = torch.zeros((), dtype=dtype)
    return torch.where(same, zero, torch.finfo(dtype).min)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Upstream `apply_rotary_pos_emb_vision` for one tensor: x (N, H, d), cos/sin (N, d), in float32."""
    dtype = x.dtype
    x, cos, sin = x.float(), cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()  # cos (N, 1, d)
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
    """One free dim, the merged tokens M; patches are N = merge_unit * M (named so in the ONNX file)."""
    tokens = torch.export.Dim("merged_tokens", min=1)
    patches = merge_unit * tokens
    return {"pixel_values": {0: patches}, "rotary_cos": {0: patches}, "rotary_sin": {0: patches},
            "window_index": {0: tokens}, "reverse_index": {0: tokens},
            "full_segment_ids": {0: patches}, "window_segment_ids": {0: patches}}


def export_vision_encoder(visual: nn.Module, path, example_grid_thw, opset: int = OPSET) -> None:
    """Export `visual` (a Qwen2.5-VL vision tower, eval mode) to ONNX at `path`, dynamic in the number of patches.

    One graph serves any number of images/videos of any size; feed it `runtime.vision_index.vision_inputs`
    plus `pixel_values`. `example_grid_thw` only shapes the trace (use one with several windows per side).
    Raises ExportError if the graph holds DOUBLE tensors or ScatterND (TensorRT rejects / runs them badly).
    """
    wrapper = ExportableQwenVision(visual).eval()
    feeds = {k: torch.from_numpy(v) for k, v in example_inputs(example_grid_thw, visual.config).items()}
    args = tuple(feeds[name] for name in VISION_INPUT_NAMES)
    with torch.no_grad(), warnings.catch_warnings():
        # N = unit * M makes the exporter say it keeps one name per shared axis ("4*merged_tokens"): expected.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                    input_names=list(VISION_INPUT_NAMES), output_names=list(VISION_OUTPUT_NAMES),
                                    dynamic_shapes=_dynamic_shapes(wrapper.unit))
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
