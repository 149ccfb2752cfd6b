"""Grid-dependent inputs of the Qwen2.5-VL vision encoder, computed on the host in numpy.

Qwen2.5-VL's vision tower derives rotary tables, a window permutation and two packed-attention layouts from
`grid_thw` with Python loops and `.tolist()`, which no ONNX/TensorRT graph can hold for a dynamic image size.
This module computes all of them from `grid_thw` and a few config numbers, so the exported graph
(`mc_export.export.qwen_vision`) only sees tensors whose *shape* depends on the image, never their recipe.
The compiler (to trace and check the export) and the runtime (to run it) both call `vision_inputs`.

numpy + stdlib only: the torch-free runtime imports this file.

Notation (one call may hold several images and videos, packed along one axis):
    grid_thw    (n, 3)  int    per image/video: temporal, height, width in patches (t = frames / temporal_patch)
    N           = sum(t * h * w)      patches
    M           = N / merge**2        merged tokens (what the planner sees); merge = spatial_merge_size
    d           = head_dim = hidden_size / num_heads
    F, W, T     frames (sum of t), windows per frame, merged tokens per window: M = F * W * T

Order of the tokens inside the encoder: the patch embedding comes out in the processor's order (per
image, per frame, per merge block row-major, the merge**2 patches of a block contiguous).
The encoder then permutes the *merge blocks* into window order (`window_index`) and runs every
block in that order; the merger output is permuted back with `reverse_index`. Rotary tables below are
therefore given in window order, ready to use.

Attention segments: upstream attends within each frame ("full" blocks) and within each window (the others).
In window order both are contiguous, and when every frame has the same size and its windows tile it exactly
they are all equal, so the graph runs attention as a batch of segments (F of W*T*merge**2 patches, or F*W of
T*merge**2) with no mask: memory linear in N. `vision_inputs` hands that structure over as the *shape* of
`window_index` (F, W, T) and of the rotary tables (F, W, T*merge**2, d), and refuses grids with unequal
segments (`segment_layout`). The runtime never makes one: it resizes every image and video frame to one square
of a whole number of windows (`runtime.vision`; the build checks the square, `mc_export.components.vision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from metacanvas_deploy.runtime.errors import ShapeError

# Input names of the exported vision graph, in order; `pixel_values` comes from runtime.vision.
VISION_INPUT_NAMES = ("pixel_values", "rotary_cos", "rotary_sin", "window_index", "reverse_index")
VISION_OUTPUT_NAMES = ("image_features",)


@dataclass(frozen=True)
class VisionGeometry:
    """The config numbers of a Qwen2.5-VL vision tower that the grid-dependent inputs need."""

    patch_size: int  # pixels per patch side (14)
    temporal_patch_size: int  # frames per patch (2)
    spatial_merge_size: int  # patches per merged-token side (2)
    window_size: int  # window side in pixels (112)
    in_channels: int  # 3
    head_dim: int  # hidden_size // num_heads
    rope_theta: float  # base of the axial rotary embedding

    @classmethod
    def from_config(cls, config: Any) -> "VisionGeometry":
        """From a `Qwen2_5_VLVisionConfig`, any object with its attributes, or a dict of them (a manifest)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (
            lambda k, d=None: getattr(config, k, d))
        head_dim = get("head_dim") or get("hidden_size") // get("num_heads")
        rope = get("rope_parameters") or {}
        return cls(patch_size=int(get("patch_size")), temporal_patch_size=int(get("temporal_patch_size", 2)),
                   spatial_merge_size=int(get("spatial_merge_size")), window_size=int(get("window_size")),
                   in_channels=int(get("in_channels", 3)), head_dim=int(head_dim),
                   rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))))

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (merge**2)."""
        return self.spatial_merge_size ** 2

    @property
    def window_tokens(self) -> int:
        """Window side in merged tokens (112 px // 2 // 14 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Width of one row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def check_grid(grid_thw: Any, geometry: VisionGeometry) -> np.ndarray:
    """`grid_thw` as an (n, 3) int64 array, or ShapeError if it is not one the encoder can take."""
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0 or not np.issubdtype(grid.dtype, np.integer):
        raise ShapeError(f"grid_thw must be a non-empty (n, 3) integer array of (t, h, w) in patches, "
                         f"got shape {grid.shape} dtype {grid.dtype}")
    m = geometry.spatial_merge_size
    if (grid <= 0).any() or (grid[:, 1:] % m).any():
        raise ShapeError(f"every grid_thw row needs t, h, w > 0 and h, w multiples of spatial_merge_size={m}, "
                         f"got {grid.tolist()}; resize images to multiples of {m * geometry.patch_size} px")
    return grid.astype(np.int64)


def position_ids(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """(N, 2) int64 (row, col) of every patch in processor order (merge blocks row-major, patches in a block
    row-major), repeated for each of the t frames. Same as transformers' `get_vision_position_ids`."""
    m = spatial_merge_size
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each
        block = (h // m, m, w // m, m)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)  # (h*w,) block-major
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))  # (t*h*w, 2)
    return np.concatenate(out, axis=0).astype(np.int64)


def rotary_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """(head_dim // 4,) float32 inverse frequencies of the axial rope, bit-equal to transformers'
    `1 / theta ** (arange(0, d/2, 2) / (d/2))` in float32: the power in float64 rounded to float32 equals
    torch's float32 pow for every head_dim/theta the tests try (d 16..128, theta 1e4..1e6)."""
    half = head_dim // 2
    exponent = np.arange(0, half, 2, dtype=np.float32) / np.float32(half)  # float32 division, as torch
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def rotary_cos_sin(pos_ids: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (N, head_dim) float32 for (N, 2) position ids, laid out as transformers'
    `Qwen2_5_VLVisionRotaryEmbedding`: [rows (d/4), cols (d/4)] twice.

    The angle is formed in float32 exactly like torch (so large positions round the same way); only the
    cos/sin of that float32 angle is taken in float64 and rounded, which is within 1 ulp of torch's.
    Trig runs once per distinct position value (a table of max(pos) + 1 rows), then rows are gathered.
    """
    inv_freq = rotary_inv_freq(head_dim, theta)  # (d/4,)
    top = int(pos_ids.max()) + 1 if len(pos_ids) else 1
    angles = (np.arange(top, dtype=np.float32)[:, None] * inv_freq).astype(np.float64)  # (top, d/4) f32 products
    tables = []
    for trig in (np.cos, np.sin):
        table = trig(angles).astype(np.float32)  # (top, d/4)
        half = np.concatenate([table[pos_ids[:, 0]], table[pos_ids[:, 1]]], axis=-1)  # (N, d/2): rows, cols
        tables.append(np.concatenate([half, half], axis=-1))  # (N, d)
    return tables[0], tables[1]


def window_layout(grid_thw: np.ndarray, geometry: VisionGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The window permutation of merged tokens and the window boundaries, as transformers'
    `get_vision_window_index`.

    Each frame's merged grid (h/m, w/m) is cut into windows of `window_tokens` squared (the last row and
    column of windows may be smaller); windows are taken row-major per frame, tokens row-major inside.
    Returns:
        window_index (M,) int64: window position -> merged-token index in processor order.
        cu_window_seqlens (W + 1,) int32: cumulative window lengths in *patches* (not merged tokens).
    """
    m, ws = geometry.spatial_merge_size, geometry.window_tokens
    index, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // m, w // m
        ids = np.arange(gh * gw).reshape(gh, gw)  # merged tokens of one frame, row-major
        windows = [ids[r:r + ws, c:c + ws].reshape(-1) for r in range(0, gh, ws) for c in range(0, gw, ws)]
        frame = np.concatenate(windows)  # (gh*gw,) one frame's window order
        index.append((np.arange(t)[:, None] * (gh * gw) + frame).reshape(-1) + offset)  # frames in order
        lengths.append(np.tile([len(win) * geometry.merge_unit for win in windows], t))
        offset += t * gh * gw
    cu = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int32)
    return np.concatenate(index).astype(np.int64), cu


def cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """(n_frames + 1,) int32 cumulative frame lengths in patches: "full" attention in Qwen2.5-VL is per frame."""
    lengths = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def segment_layout(grid_thw: np.ndarray, geometry: VisionGeometry) -> tuple[int, int, int]:
    """(F frames, W windows per frame, T merged tokens per window) of a checked grid whose attention segments
    are all equal (see the module docstring), or ShapeError naming what to change.

    Equal segments need one (h, w) for every grid row (frames all the same size) and each merged side h/merge,
    w/merge a multiple of the window side or at most one window (else the last row/column of windows is smaller).
    """
    m, ws = geometry.spatial_merge_size, geometry.window_tokens
    sizes = sorted({(int(h), int(w)) for h, w in grid_thw[:, 1:]})
    if len(sizes) != 1:
        raise ShapeError(f"grid_thw rows have different frame sizes {sizes} (h, w in patches): the vision encoder "
                         f"attends over a batch of equal frames; resize every image and video frame to one size "
                         f"(runtime.vision does) or call it once per size")
    sides = (sizes[0][0] // m, sizes[0][1] // m)  # merged tokens per side
    if any(side > ws and side % ws for side in sides):
        px = ws * m * geometry.patch_size
        raise ShapeError(f"grid_thw frames of {sides[0]}x{sides[1]} merged tokens are not tiled by windows of "
                         f"{ws}x{ws}: the vision encoder attends over a batch of equal windows; use frame sides "
                         f"that are multiples of {px} px or at most {px} px")
    windows = [-(-side // ws) for side in sides]  # per axis
    tokens = [min(side, ws) for side in sides]
    return int(grid_thw[:, 0].sum()), windows[0] * windows[1], tokens[0] * tokens[1]


def vision_inputs(grid_thw: Any, vision_config: Any) -> dict[str, np.ndarray]:
    """Every grid-dependent input of the exported vision encoder, keyed by graph input name.

    Args:
        grid_thw: (n, 3) ints, one row per image (t = 1) or video (t = frames / temporal_patch_size).
        vision_config: a `Qwen2_5_VLVisionConfig`, or a dict / object with the same fields.
    Returns (window order, the segment structure in the shapes; F, W, T: `segment_layout`):
        rotary_cos, rotary_sin   (F, W, T*merge**2, d) float32   rotary tables of each patch
        window_index             (F, W, T) int64      window position -> merged token (processor order)
        reverse_index            (M,) int64           merged token -> window position (argsort of window_index)
    `pixel_values` (N, C*T*P*P) float32, the remaining input, comes from the image processor.
    Raises ShapeError for a grid the encoder cannot take, unequal attention segments included.
    """
    geo = vision_config if isinstance(vision_config, VisionGeometry) else VisionGeometry.from_config(vision_config)
    grid = check_grid(grid_thw, geo)
    frames, windows, tokens = segment_layout(grid, geo)
    unit = geo.merge_unit
    win_index, _ = window_layout(grid, geo)
    # Patch p of window position i is patch unit*window_index[i] + p in processor order.
    patch_order = (win_index[:, None] * unit + np.arange(unit)).reshape(-1)  # (N,)
    pos = position_ids(grid, geo.spatial_merge_size)[patch_order]  # (N, 2) window order
    cos, sin = rotary_cos_sin(pos, geo.head_dim, geo.rope_theta)  # (N, d) each, window order
    segments = (frames, windows, tokens * unit, geo.head_dim)
    return {
        "rotary_cos": cos.reshape(segments),
        "rotary_sin": sin.reshape(segments),
        "window_index": win_index.reshape(frames, windows, tokens),
        "reverse_index": np.argsort(win_index, kind="stable").astype(np.int64),
    }


def num_patches(grid_thw: Any) -> int:
    """N = sum(t * h * w): the rows of `pixel_values` for this grid."""
    grid = np.asarray(grid_thw, dtype=np.int64)
    return int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
