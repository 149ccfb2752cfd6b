"""FLUX.1-Kontext image editing: the input image is VAE-encoded as context; guidance-distilled, so the negative
branch runs only for true CFG (true_cfg_scale > 1); the schedule's shift depends on the target token count.

Plain functions of the request (`runtime.backbones` describes the contract)."""

from __future__ import annotations

import numpy as np

from metacanvas_deploy.runtime.backbones.common import Prepared, RequestContext, pixels
from metacanvas_deploy.runtime.errors import RuntimeInputError
from metacanvas_deploy.runtime.manifest import Manifest
from metacanvas_deploy.runtime.request import PlannerResult, Request


def infer_task(image, video, reference_images) -> str:
    """FLUX-Kontext serves one task."""
    return "edit"


def check(manifest: Manifest, req: Request) -> Request:
    """The request, or a RuntimeInputError: editing takes exactly one image."""
    if req.image is None:
        raise RuntimeInputError("image editing needs an input image (image=...)")
    if req.video is not None or req.reference_images is not None:
        raise RuntimeInputError("FLUX-Kontext editing takes one image, no video or reference images")
    return req


def use_cfg(req: Request) -> bool:
    """True CFG only: the guidance scale is an input of the distilled model, not a second branch."""
    return req.true_cfg_scale > 1.0


def planner_vision(req: Request):
    """(images, video) the planner sees: the image to edit."""
    return [req.image], None


def prepare(ctx: RequestContext, req: Request, planned: PlannerResult) -> Prepared:
    """The image VAE-encoded as context, the guidance inputs, and the shifted schedule."""
    image = pixels([req.image], req.height, req.width)  # (1, 3, H, W): resized to the output size
    image_latents = ctx.engines["vae_encoder"]({"image": image})["image_latents"]
    _, h_tok, w_tok = ctx.token_grid(req)
    feeds = {"prompt_embeds": planned.prompt_embeds, "pooled_prompt_embeds": planned.pooled_prompt_embeds,
             "canvas": planned.canvas, "image_latents": image_latents,
             "guidance": np.array([req.guidance_scale], np.float32),
             "guidance_scale": np.array([req.true_cfg_scale if planned.rows == 2 else 1.0], np.float32)}
    sample = ctx.initial_sample(req, ctx.denoise_shape("sample", req))
    return Prepared(feeds, sample, ctx.schedule(req.num_inference_steps, image_seq_len=h_tok * w_tok))


def finish(ctx: RequestContext, req: Request, latents: np.ndarray, state) -> tuple[np.ndarray, np.ndarray]:
    """(frames (1, H, W, 3) uint8, the latents unchanged)."""
    return ctx.engines["vae_decoder"]({"latents": latents})["frames"], latents
