"""SANA text-to-image: no image inputs; CFG with both branches batched; the prompt mask reaches the DiT."""

from __future__ import annotations

import numpy as np

from metacanvas_deploy.runtime.errors import RuntimeInputError


class Host:
    def __init__(self, pipe):
        self.pipe = pipe

    def infer_task(self, image, video, reference_images) -> str:
        return "t2i"

    def check(self, req):
        if req.image is not None or req.video is not None or req.reference_images is not None:
            raise RuntimeInputError("SANA text-to-image takes no image, video or reference images")
        return req

    def use_cfg(self, req) -> bool:
        return req.guidance_scale > 1.0

    def planner_vision(self, req):
        return None, None

    def prepare(self, req, planned):
        pipe = self.pipe
        feeds = {"prompt_embeds": planned.prompt_embeds, "prompt_mask": planned.prompt_mask,
                 "canvas": planned.canvas, "guidance_scale": np.array([req.guidance_scale], np.float32)}
        sample = pipe.initial_sample(req, pipe.denoise_shape("sample", req))
        return feeds, sample, pipe.schedule(req.num_inference_steps)

    def finish(self, req, latents):
        return self.pipe.engines["vae_decoder"]({"latents": latents})["frames"]  # (1, H, W, 3) uint8
