"""Generic pieces every backbone adapter uses: pixels in and out of a VAE, CFG batching, the per-request canvas.

Nothing here knows a model name. Pixel conversions follow diffusers' ``VaeImageProcessor``: ``x / 255 * 2 - 1``
in (float32), ``round((x / 2 + 0.5).clamp(0, 1) * 255)`` out, Lanczos resizing, so that adapters match the
diffusers pipelines bit for bit. The CFG batch layout is [negative, positive] project-wide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import PIL.Image
import torch

from metacanvas_deploy.mc_export.errors import InputError
from metacanvas_deploy.mc_export.models.backbones.base import Conditioning
from metacanvas_deploy.mc_export.models.connectors import CanvasPrep

ImageLike = Union[PIL.Image.Image, np.ndarray]  # RGB PIL image or uint8 (H, W, 3) array


def _to_pil(image, name: str) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB":
            raise InputError(f"{name} must be an RGB image, got PIL mode {image.mode!r}; "
                             f"pass image.convert('RGB') if that is what you mean")
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise InputError(f"{name} as a numpy array must be uint8 (H, W, 3) RGB, got {image.dtype} "
                             f"{tuple(image.shape)}")
        return PIL.Image.fromarray(image)
    raise InputError(f"{name} must be a PIL.Image or a uint8 (H, W, 3) numpy array, got {type(image).__name__}")


def image_to_tensor(image: ImageLike, height: int, width: int, name: str = "image") -> torch.Tensor:
    """One RGB image -> (1, 3, height, width) float32 in [-1, 1]. Another size is resized to (height, width)
    with Lanczos (diffusers' default resampler).

    The tensor keeps diffusers' memory layout (a permuted view of (1, H, W, 3): channels-last strides): a VAE's
    convolutions pick their kernels by layout, and only the same layout gives bit-identical latents.
    """
    pil = _to_pil(image, name)
    if pil.size != (width, height):
        pil = pil.resize((width, height), resample=PIL.Image.LANCZOS)
    x = np.asarray(pil).astype(np.float32)[None] / 255.0  # (1, H, W, 3) in [0, 1]
    x = torch.from_numpy(x).permute(0, 3, 1, 2)  # (1, 3, H, W), channels-last strides
    return 2.0 * x - 1.0


def images_to_tensor(images: ImageLike | Sequence[ImageLike], height: int, width: int,
                     name: str = "images") -> torch.Tensor:
    """One image or a non-empty sequence of them -> (N, 3, height, width) float32 in [-1, 1]."""
    if isinstance(images, (PIL.Image.Image, np.ndarray)):
        images = [images]
    if not isinstance(images, Sequence) or len(images) == 0:
        raise InputError(f"{name} must be an image or a non-empty list of images, got {type(images).__name__}")
    return torch.cat([image_to_tensor(im, height, width, f"{name}[{i}]") for i, im in enumerate(images)])


def video_to_tensor(video, height: int, width: int, num_frames: int, name: str = "video") -> torch.Tensor:
    """A uint8 (F, H, W, 3) array or a sequence of F images, F == num_frames -> (1, 3, F, height, width)
    float32 in [-1, 1]."""
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise InputError(f"{name} as a numpy array must be uint8 (F, H, W, 3) RGB, got {video.dtype} "
                             f"{tuple(video.shape)}")
        video = list(video)
    if not isinstance(video, Sequence) or len(video) != num_frames:
        got = len(video) if isinstance(video, Sequence) else type(video).__name__
        raise InputError(f"{name} must have num_frames={num_frames} frames, got {got}")
    frames = images_to_tensor(video, height, width, name)  # (F, 3, H, W)
    return frames.permute(1, 0, 2, 3)[None]  # (1, 3, F, H, W)


def frames_to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1], (B, 3, H, W) or (B, 3, F, H, W) -> uint8 frames (B, F, H, W, 3)."""
    x = decoded.detach().float()
    if x.ndim == 4:
        x = x[:, :, None]  # (B, 3, 1, H, W)
    x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)  # (B, F, H, W, 3)
    return (x.cpu().numpy() * 255).round().astype(np.uint8)


def cfg_concat(negative: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """The project-wide CFG batch layout: (2B, ...) = [negative, positive] along the batch."""
    return torch.cat([negative, positive], dim=0)


def cfg_combine(output: torch.Tensor, scale: float) -> torch.Tensor:
    """(2B, ...) model output in [negative, positive] order -> (B, ...) ``neg + scale * (pos - neg)``."""
    negative, positive = output.chunk(2)
    return negative + scale * (positive - negative)


def check_conditioning(cond: Conditioning, text_dim: int, use_cfg: bool, pooled_dim: int = 0) -> int:
    """InputError for conditioning that cannot feed the DiT (wrong width, missing negative branch or
    negative canvas, missing pooled embeddings when ``pooled_dim``); returns the batch size B."""
    if cond.prompt_embeds.ndim != 3 or cond.prompt_embeds.shape[-1] != text_dim:
        raise InputError(f"prompt_embeds must be (B, L, {text_dim}), got {tuple(cond.prompt_embeds.shape)}")
    batch = cond.prompt_embeds.shape[0]
    if use_cfg and cond.negative_prompt_embeds is None:
        raise InputError("guidance asks for an unconditional branch but cond.negative_prompt_embeds is None; "
                         "encode a negative prompt (default '') or turn CFG off")
    if use_cfg and cond.negative_prompt_embeds.shape != cond.prompt_embeds.shape:
        raise InputError(f"negative_prompt_embeds {tuple(cond.negative_prompt_embeds.shape)} must match "
                         f"prompt_embeds {tuple(cond.prompt_embeds.shape)} (pad both to one length)")
    if use_cfg and cond.canvas_states is not None and cond.negative_canvas_states is None:
        raise InputError("the negative branch needs its own canvas: cond.negative_canvas_states is None while "
                         "cond.canvas_states is set")
    if pooled_dim:
        for name in ("pooled_prompt_embeds",) + (("negative_pooled_prompt_embeds",) if use_cfg else ()):
            pooled = getattr(cond, name)
            if pooled is None or tuple(pooled.shape) != (batch, pooled_dim):
                got = None if pooled is None else tuple(pooled.shape)
                raise InputError(f"{name} must be ({batch}, {pooled_dim}), got {got}")
    return batch


def prepare_canvas(canvas_prep: CanvasPrep, cond: Conditioning, use_cfg: bool, frames: int, height: int,
                   width: int) -> torch.Tensor | None:
    """The canvas residual for one request, computed once (never per step): (B', T, H, W, D_dit) in the CFG
    layout [negative, positive], or None when the conditioning has no canvas (the stock DiT)."""
    if cond.canvas_states is None:
        return None
    k, h, w = canvas_prep.grid
    want = (cond.prompt_embeds.shape[0], k * h * w, canvas_prep.out.in_features)  # (B, N_canvas, D_mllm)
    for name in ("canvas_states",) + (("negative_canvas_states",) if use_cfg else ()):
        if tuple(getattr(cond, name).shape) != want:  # checked per branch, before they are batched
            raise InputError(f"{name} must be (B, N_canvas, D_mllm) = {want} like the prompt batch, "
                             f"got {tuple(getattr(cond, name).shape)}")
    states = cond.canvas_states
    if use_cfg:
        states = cfg_concat(cond.negative_canvas_states, cond.canvas_states)  # (2B, N_canvas, D_mllm)
    dtype = next(canvas_prep.parameters()).dtype
    return canvas_prep(states.to(dtype), frames, height, width)  # (B', T, H, W, D_dit)
