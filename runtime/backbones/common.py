"""What every backbone host shares: pixels in (as diffusers' VaeImageProcessor does them) and shape binding."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from metacanvas_deploy.runtime.errors import RuntimeInputError
from metacanvas_deploy.runtime.tensor_spec import TensorSpec, split_dim


def to_pil(image, name: str) -> Image.Image:
    """An RGB PIL image, or a uint8 (H, W, 3) array, as a PIL image; anything else is a clear error."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise RuntimeInputError(f"{name} must be an RGB image, got mode {image.mode!r}; pass image.convert('RGB')")
        return image
    arr = np.asarray(image) if image is not None else None
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        got = "None" if arr is None else f"{arr.dtype} {arr.shape}"
        raise RuntimeInputError(f"{name} must be a PIL RGB image or a uint8 (H, W, 3) array, got {got}")
    return Image.fromarray(arr)


def pixels(images, height: int, width: int, name: str = "image") -> np.ndarray:
    """Images -> (n, 3, height, width) float32 in [-1, 1]: Lanczos resize, x / 255 * 2 - 1 (diffusers' way)."""
    out = []
    for i, im in enumerate(images):
        pil = to_pil(im, f"{name}[{i}]" if len(images) > 1 else name)
        if pil.size != (width, height):
            pil = pil.resize((width, height), resample=Image.LANCZOS)
        x = np.asarray(pil).astype(np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
        out.append(np.float32(2.0) * x - np.float32(1.0))
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))  # (n, 3, H, W)


def shape_of(spec: TensorSpec, bindings: Mapping[str, int]) -> tuple[int, ...]:
    """A tensor's concrete shape with its symbols bound (``2*h_tok`` -> 2 * bindings["h_tok"])."""
    shape = []
    for d in spec.dims:
        if isinstance(d, int):
            shape.append(d)
        else:
            k, sym = split_dim(d)
            shape.append(k * bindings[sym])
    return tuple(shape)
