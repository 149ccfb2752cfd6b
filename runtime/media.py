"""Reading and writing images and videos as uint8 RGB arrays (Pillow, imageio; no torch)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from metacanvas_deploy.runtime.errors import RuntimeInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".gif")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; alpha and palette images are converted, not rejected."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as e:
        raise RuntimeInputError(f"cannot read image {path}: {e}") from e


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """A video file (mp4, gif, or a folder of images) as (F, H, W, 3) uint8 RGB."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        frames = [read_image(p) for p in files[:max_frames]]
    else:
        import imageio.v3 as iio

        try:
            frames = [np.asarray(f)[..., :3] for f in iio.imiter(path)]
        except (OSError, ValueError, RuntimeError) as e:
            raise RuntimeInputError(f"cannot read video {path}: {e}") from e
        frames = frames[:max_frames]
    if not frames:
        raise RuntimeInputError(f"video {path} has no frames")
    if len({f.shape for f in frames}) != 1:
        raise RuntimeInputError(f"video {path} has frames of different sizes")
    return np.stack(frames).astype(np.uint8)


def write_media(path: str | os.PathLike, frames: np.ndarray, fps: int = 16) -> None:
    """Write (F, H, W, 3) uint8 frames: .png (F must be 1, or one file per frame is refused), .gif or .mp4.

    The file appears atomically: written to a temp name in the same folder, then renamed.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise RuntimeInputError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise RuntimeInputError(f"unsupported output {path.name}: use .png for images, .mp4 or .gif for video")
    if suffix in IMAGE_SUFFIXES and len(frames) != 1:
        raise RuntimeInputError(f"{len(frames)} frames cannot be written to {path.name}: use .mp4 or .gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix in IMAGE_SUFFIXES:
            Image.fromarray(frames[0]).save(tmp)
        elif suffix == ".gif":
            ims = [Image.fromarray(f) for f in frames]
            ims[0].save(tmp, save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)
        else:
            import imageio.v3 as iio

            # H.264 wants even sizes; yuv420p keeps the file playable everywhere.
            iio.imwrite(tmp, _even(frames), fps=fps, codec="libx264")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; an output file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _even(frames: np.ndarray) -> np.ndarray:
    f, h, w, _ = frames.shape
    return frames[:, : h - h % 2, : w - w % 2]


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth, image-like uint8 (H, W, 3): a bilinearly upsampled 4x4 colour field plus a bright disc."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, 3))
    ys, xs = np.linspace(0, 3, height), np.linspace(0, 3, width)
    y0, x0 = np.minimum(ys.astype(int), 2), np.minimum(xs.astype(int), 2)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = ((1 - fy) * (1 - fx) * coarse[y0][:, x0] + (1 - fy) * fx * coarse[y0][:, x0 + 1]
           + fy * (1 - fx) * coarse[y0 + 1][:, x0] + fy * fx * coarse[y0 + 1][:, x0 + 1])
    cy, cx, r = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width, 0.2 * min(height, width)
    disc = (np.arange(height)[:, None] - cy) ** 2 + (np.arange(width)[None, :] - cx) ** 2 < r * r
    img[disc] = rng.uniform(128, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_media(task: str, height: int, width: int, num_frames: int, seed: int = 0) -> dict:
    """The pipeline keyword arguments a task's inputs need, seeded: ``image`` (edit, i2v), ``video`` (v2v: a
    slowly brightening image) or ``reference_images`` (r2v: one image); {} for t2i / t2v. Calibration and the
    benchmarks feed these where a task takes media."""
    if task in ("edit", "i2v"):
        return {"image": synthetic_image(height, width, seed)}
    if task == "v2v":
        base = synthetic_image(height, width, seed).astype(np.int16)
        return {"video": np.stack([np.clip(base + 3 * f, 0, 255).astype(np.uint8) for f in range(num_frames)])}
    if task == "r2v":
        return {"reference_images": [synthetic_image(height, width, seed)]}
    return {}
