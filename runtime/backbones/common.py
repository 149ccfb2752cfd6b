"""What every backbone module shares: the contract with the pipeline (`RequestContext` in, `Prepared` out), pixels
in (as diffusers' VaeImageProcessor does them), shape binding, the schedule and the initial noise.

The helpers are pure functions of the manifest and the request: no engine, no Pipeline, no state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from metacanvas_deploy.runtime.errors import RuntimeInputError
from metacanvas_deploy.runtime.manifest import Manifest
from metacanvas_deploy.runtime.manifest_fields import thaw
from metacanvas_deploy.runtime.request import Request
from metacanvas_deploy.runtime.schedulers import SchedulePlan, make_plan
from metacanvas_deploy.runtime.tensor_spec import TensorSpec, split_dim

Engine = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


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


@dataclass(frozen=True)
class Prepared:
    """What a backbone's `prepare` returns: the denoise engine's per-request inputs (everything but the sample,
    the scheduler state and the per-step values), the initial sample, the schedule, and ``state``: whatever its
    `finish` needs afterwards (Wan: the clean latents and their frame mask; None when nothing)."""

    feeds: Mapping[str, np.ndarray]
    sample: np.ndarray
    schedule: SchedulePlan
    state: Any = None


# --- pure helpers over the manifest ---------------------------------------------------------------------------

def token_grid(manifest: Manifest, req) -> tuple[int, int, int]:
    """(latent_frames, h_tok, w_tok) of a request: the bundle's multiples are the VAE stride x patch."""
    mult = manifest.multiples
    frames = (req.num_frames - 1) // mult["num_frames_minus_1"] + 1
    return frames, req.height // mult["height"], req.width // mult["width"]


def denoise_shape(manifest: Manifest, name: str, req, **bindings: int) -> tuple[int, ...]:
    """The concrete shape of a denoise-engine tensor for this request (symbols bound from the token grid)."""
    t, h, w = token_grid(manifest, req)
    spec = manifest.engines["denoise"].spec(name)
    return shape_of(spec, {"latent_frames": t, "h_tok": h, "w_tok": w, **bindings})


def schedule_plan(manifest: Manifest, steps: int, image_seq_len: int | None = None) -> SchedulePlan:
    """The bundle's precomputed plan for this step count, or one computed now (numpy, no torch)."""
    s = thaw(manifest.scheduler)
    pre = s.get("plans", {}).get(str(steps))
    return SchedulePlan.from_json(pre) if pre else make_plan(s["config"], steps, image_seq_len)


def initial_sample(req: Request, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded standard-normal noise (numpy's PCG64: not torch's generator), or the caller's `latents` (copied:
    the caller's array is never written)."""
    if req.latents is not None:
        lat = np.asarray(req.latents)
        if lat.shape != shape or lat.dtype != np.float32 or not np.isfinite(lat).all():
            raise RuntimeInputError(f"latents must be finite float32 {shape}, got {lat.dtype} {lat.shape}")
        return lat.copy()
    return np.random.default_rng(req.seed).standard_normal(shape, dtype=np.float32)


@dataclass(frozen=True)
class RequestContext:
    """What a backbone module's `prepare`/`finish` may use, and nothing more (never the Pipeline): the
    manifest (the bundle's facts), and ``engines``, this request's engine callables by stage (timed into the
    request's own timings, observed, substituted where the request asked). Read-only and per request."""

    manifest: Manifest
    engines: Mapping[str, Engine]

    def token_grid(self, req: Request) -> tuple[int, int, int]:
        """`token_grid` of this bundle."""
        return token_grid(self.manifest, req)

    def denoise_shape(self, name: str, req: Request, **bindings: int) -> tuple[int, ...]:
        """`denoise_shape` of this bundle."""
        return denoise_shape(self.manifest, name, req, **bindings)

    def initial_sample(self, req: Request, shape: tuple[int, ...]) -> np.ndarray:
        """`initial_sample`: the request's seeded noise or its own latents."""
        return initial_sample(req, shape)

    def schedule(self, steps: int, image_seq_len: int | None = None) -> SchedulePlan:
        """`schedule_plan` of this bundle."""
        return schedule_plan(self.manifest, steps, image_seq_len)
