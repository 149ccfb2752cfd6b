"""Qwen2.5-VL image and video preprocessing for the planner's vision tower (numpy + Pillow only).

**Choice** (the paper fixes 144 visual tokens per image): every image is resized (bicubic, as Qwen) to exactly
a square of ``grid * merge * patch`` pixels, so it always gives ``grid**2`` merged tokens (tiny 4x4 at 112 px,
full 12x12 at 336 px); Qwen's own processor would keep the aspect ratio and vary the token count. After the
resize, the arithmetic is Qwen2VLImageProcessor's: rescale by 1/255 in float64, cast to float32, normalize
with OpenAI CLIP's mean/std, and patchify into ``pixel_values (grid_t*grid_h*grid_w, C*tp*patch*patch)``
ordered by 2x2 merge window, with ``grid_thw`` counted in patches (before the merge).

A video is ``frames`` frames sampled evenly (Qwen's ``sample_frames`` rule) and patchified in temporal pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from metacanvas_deploy.runtime.errors import RuntimeInputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses more elongated images; so do we
# 8-bit PIL modes converted to RGB the way transformers' convert_to_rgb does (alpha over white).
# High-bit-depth modes (I, I;16, F) are refused: their value range is not 0..255.
CONVERTIBLE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


@dataclass(frozen=True)
class VisionGeometry:
    """Patch geometry of the vision tower and the fixed input square."""

    grid: int  # merged tokens per side of an image (4 for tiny's 16 tokens, 12 for 144)
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    @classmethod
    def from_tokens(cls, tokens_per_image: int, **kw) -> VisionGeometry:
        """Geometry for a square number of merged tokens per image (``vision_tokens_per_image``)."""
        grid = int(round(tokens_per_image**0.5))
        if grid * grid != tokens_per_image or grid <= 0:
            raise RuntimeInputError(f"tokens per image must be a positive square, got {tokens_per_image}")
        return cls(grid=grid, **kw)

    @property
    def side_px(self) -> int:
        return self.grid * self.merge_size * self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


def to_rgb(image) -> Image.Image:
    """A PIL image or a uint8 array (H, W), (H, W, 3) or (H, W, 4) -> an RGB PIL image.

    Transparency is composited onto white, like transformers' ``convert_to_rgb``; anything else is refused
    with a message saying what to pass.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise RuntimeInputError(f"image arrays must be uint8 (0..255), got {image.dtype}; scale and cast first")
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise RuntimeInputError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4) channels-last, "
                                    f"got shape {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise RuntimeInputError(f"an image must be a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if image.mode not in CONVERTIBLE_MODES:
        raise RuntimeInputError(f"image mode {image.mode!r} is not 8-bit; convert it to 'RGB' first "
                                f"(accepted modes: {', '.join(CONVERTIBLE_MODES)})")
    w, h = image.size
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise RuntimeInputError(f"image size {w}x{h} is empty or more elongated than {MAX_ASPECT_RATIO}:1")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W): x / 255 (in float64, as transformers), then CLIP mean/std."""
    x = rgb.transpose(2, 0, 1).astype(np.float64) * (1 / 255)  # (3, H, W)
    x = x.astype(np.float32)
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def _square_frame(image, side: int) -> np.ndarray:
    """Any accepted image -> normalized float32 (3, side, side), bicubic-resized to the square."""
    rgb = to_rgb(image)
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), resample=Image.Resampling.BICUBIC)
    return normalize(np.asarray(rgb))


def patchify(frames: np.ndarray, geo: VisionGeometry) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 (T, C, H, W) -> (grid_t*grid_h*grid_w, C*tp*p*p), (grid_t, grid_h, grid_w), in Qwen's order.

    Rows run over (t, merge-window row, merge-window column, row in window, column in window); each row is
    (C, tp, p, p) flattened. T is padded to a multiple of the temporal patch by repeating the last frame
    (an image is one frame repeated, as Qwen's image processor broadcasts it).
    """
    t, c, h, w = frames.shape
    tp, p, m = geo.temporal_patch_size, geo.patch_size, geo.merge_size
    if h % (p * m) or w % (p * m):
        raise RuntimeInputError(f"frame size {h}x{w} is not a multiple of {p * m} px")
    if t % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - t % tp, axis=0)], axis=0)
    gt, gh, gw = frames.shape[0] // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


def preprocess_images(images: Sequence, geo: VisionGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Images -> ``pixel_values`` float32 (n * grid_h * grid_w, patch_dim) and ``image_grid_thw`` int64 (n, 3).

    Every image gives ``geo.tokens_per_image`` merged tokens. Images are concatenated in order; for a batch
    of prompts, pass row 0's images first, then row 1's, ... (the order the planner consumes them).
    """
    if isinstance(images, (np.ndarray, Image.Image)) or len(images) == 0:
        raise RuntimeInputError("preprocess_images takes a non-empty list of images")
    patches, grids = [], []
    for image in images:
        frame = _square_frame(image, geo.side_px)[None]  # (1, 3, S, S)
        rows, grid = patchify(frame, geo)
        patches.append(rows)
        grids.append(grid)
    return np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int64)


def sample_frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread evenly over ``total_frames`` (Qwen's ``sample_frames``: floor(i * total / n)).

    A video shorter than ``num_frames`` repeats frames rather than failing.
    """
    if total_frames < 1 or num_frames < 1:
        raise RuntimeInputError(f"cannot sample {num_frames} frames from a video of {total_frames} frames")
    return (np.arange(num_frames) * (total_frames / num_frames)).astype(np.int64)


def preprocess_video(frames, geo: VisionGeometry, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A video -> ``pixel_values_videos`` float32 (gt * grid_h * grid_w, patch_dim), ``video_grid_thw`` (1, 3).

    ``frames`` is a uint8 array (F, H, W, 3) or a list of images; ``num_frames`` (the config's
    ``planner_video_frames``, even) are sampled evenly and each is resized to the square like an image.
    The video gives ``num_frames / temporal_patch * tokens_per_image`` merged tokens.
    """
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise RuntimeInputError(f"a video array must be (F, H, W, 3) uint8, got shape {frames.shape}")
        frames = list(frames)
    if isinstance(frames, Image.Image) or not isinstance(frames, Sequence) or len(frames) == 0:
        raise RuntimeInputError("a video must be a non-empty (F, H, W, 3) array or list of frames")
    if num_frames % geo.temporal_patch_size:
        raise RuntimeInputError(f"num_frames must be a multiple of {geo.temporal_patch_size}, got {num_frames}")
    picked = [frames[i] for i in sample_frame_indices(len(frames), num_frames)]
    video = np.stack([_square_frame(f, geo.side_px) for f in picked])  # (T, 3, S, S)
    rows, grid = patchify(video, geo)
    return rows, np.asarray([grid], dtype=np.int64)


def video_tokens(geo: VisionGeometry, num_frames: int) -> int:
    """Merged tokens of one preprocessed video: (num_frames / temporal_patch) * tokens_per_image."""
    return -(-num_frames // geo.temporal_patch_size) * geo.tokens_per_image
