"""SANA text-to-image: no image inputs; CFG with both branches batched; the prompt mask reaches the DiT.

Plain functions of the request (`runtime.backbones` describes the contract)."""

from __future__ import annotations

import numpy as np

from metacanvas_deploy.runtime.backbones.common import Prepared, RequestContext
from metacanvas_deploy.runtime.errors import RuntimeInputError
from metacanvas_deploy.runtime.manifest import Manifest
from metacanvas_deploy.runtime.request import PlannerResult, Request


def infer_task(image, video, reference_images) -> str:
    """SANA serves one task."""
    return "t2i"


def check(manifest: Manifest, req: Request) -> Request:
    """The request, or a RuntimeInputError: text to image takes no media."""
    if req.image is not None or req.video is not None or req.reference_images is not None:
        raise RuntimeInputError("SANA text-to-image takes no image, video or reference images")
    return req


def use_cfg(req: Request) -> bool:
    """Whether the negative branch runs (both rows batched in one step call)."""
    return req.guidance_scale > 1.0


def planner_vision(req: Request):
    """(images, video) the planner sees: none."""
    return None, None


def prepare(ctx: RequestContext, req: Request, planned: PlannerResult) -> Prepared:
    """The prompt, its mask and the canvas; seeded noise; the bundle's schedule."""
    feeds = {"prompt_embeds": planned.prompt_embeds, "prompt_mask": planned.prompt_mask,
             "canvas": planned.canvas, "guidance_scale": np.array([req.guidance_scale], np.float32)}
    sample = ctx.initial_sample(req, ctx.denoise_shape("sample", req))
    return Prepared(feeds, sample, ctx.schedule(req.num_inference_steps))


def finish(ctx: RequestContext, req: Request, latents: np.ndarray, state) -> tuple[np.ndarray, np.ndarray]:
    """(frames (1, H, W, 3) uint8, the latents unchanged)."""
    return ctx.engines["vae_decoder"]({"latents": latents})["frames"], latents
