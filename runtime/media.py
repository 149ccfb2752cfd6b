"""Reading and writing images and videos as uint8 RGB arrays (Pillow, imageio; no torch)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from metacanvas_deploy.runtime.errors import RuntimeInputError
from metacanvas_deploy.runtime.limits import MAX_FRAMES, MAX_SIDE

MAX_PIXELS = 64 * 2**20  # an input image or frame: 64 Mpixel (8192 x 8192), far beyond any bundle's sizes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".gif")


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, as a viewer shows it: EXIF orientation applied, 16-bit samples
    scaled to 8 bits (not clipped), alpha and palette images converted (alpha dropped, as diffusers'
    `load_image` does). The size is checked from the header, before the pixels are decoded."""
    try:
        with Image.open(path) as im:
            _check_size(path, im.size, max_pixels)
            im = ImageOps.exif_transpose(im)
            return _to_rgb8(path, im)
    except Image.DecompressionBombError as e:
        raise RuntimeInputError(f"cannot read image {path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RuntimeInputError(f"cannot read image {path}: {e}") from None


def _check_size(path, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1 or w > MAX_SIDE or h > MAX_SIDE or w * h > max_pixels:
        raise RuntimeInputError(f"{path} is {w}x{h}: images and frames may be at most {MAX_SIDE} pixels a side "
                                f"and {max_pixels} pixels in all; resize it first")


def _to_rgb8(path, im: Image.Image) -> np.ndarray:
    """Any Pillow mode as uint8 RGB without silent clipping: 16-bit integer samples keep their top 8 bits;
    32-bit integer or float samples have no agreed range and are refused."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16) >> 8  # (H, W) 16-bit grey
        return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=-1)
    if im.mode in ("I", "F"):
        raise RuntimeInputError(f"{path} holds {'32-bit integer' if im.mode == 'I' else 'floating-point'} samples "
                                "(Pillow mode " + im.mode + "); convert it to 8-bit RGB first")
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_video(path: str | os.PathLike, max_frames: int = MAX_FRAMES, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A video file (mp4, gif, or a folder of images) as (F, H, W, 3) uint8 RGB. Frames are decoded one at a
    time: more than ``max_frames`` frames, or a frame larger than ``max_pixels``, is an error before the rest
    is decoded."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) > max_frames:
            raise RuntimeInputError(f"video {path} has {len(files)} frames; at most {max_frames} are accepted")
        frames = [read_image(p, max_pixels) for p in files]
    else:
        frames = _decode_video(path, max_frames, max_pixels)
    if not frames:
        raise RuntimeInputError(f"video {path} has no frames")
    if len({f.shape for f in frames}) != 1:
        raise RuntimeInputError(f"video {path} has frames of different sizes")
    return np.stack(frames).astype(np.uint8)


def _decode_video(path: Path, max_frames: int, max_pixels: int) -> list[np.ndarray]:
    import imageio.v3 as iio

    frames: list[np.ndarray] = []
    try:
        for f in iio.imiter(path):
            f = np.asarray(f)
            if not frames:
                _check_size(path, (f.shape[1], f.shape[0]), max_pixels)
            if len(frames) == max_frames:
                raise RuntimeInputError(f"video {path} has more than {max_frames} frames; give at most "
                                        f"{max_frames}")
            if f.dtype != np.uint8:
                raise RuntimeInputError(f"video {path} has {f.dtype} samples; expected 8-bit video")
            if f.ndim == 2:  # grey
                f = np.repeat(f[..., None], 3, axis=-1)
            frames.append(f[..., :3])
    except RuntimeInputError:
        raise
    except (OSError, ValueError, RuntimeError, IndexError, SyntaxError) as e:  # Pillow: SyntaxError on a bad GIF
        raise RuntimeInputError(f"cannot read video {path}: {e}") from None
    return frames


def check_output(path: str | os.PathLike, frames: int) -> Path:
    """Before any work: ``path`` has a suffix that can hold ``frames`` frames and its folder is writable (a
    probe file is created and removed there). Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise RuntimeInputError(f"unsupported output {path.name!r}: use .png for images, .mp4 or .gif for video")
    if suffix in IMAGE_SUFFIXES and frames != 1:
        raise RuntimeInputError(f"{frames} frames cannot be written to {path.name}: use .mp4 or .gif")
    if path.is_dir():
        raise RuntimeInputError(f"output {path} is a directory; give a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RuntimeInputError(f"cannot write to {folder}: {e.strerror or e}") from None
    return path


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
    check_output(path, len(frames))
    suffix = path.suffix.lower()
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
