"""FLUX.1-Kontext image editing: the input image is VAE-encoded as context; guidance-distilled, so the negative
branch runs only for true CFG (true_cfg_scale > 1); the schedule's shift depends on the target token count."""

from __future__ import annotations

import numpy as np

from metacanvas_deploy.runtime.backbones.common import pixels
from metacanvas_deploy.runtime.errors import RuntimeInputError


class Host:
    def __init__(self, pipe):
        self.pipe = pipe

    def infer_task(self, image, video, reference_images) -> str:
        return "edit"

    def check(self, req):
        if req.image is None:
            raise RuntimeInputError("image editing needs an input image (image=...)")
        if req.video is not None or req.reference_images is not None:
            raise RuntimeInputError("FLUX-Kontext editing takes one image, no video or reference images")
        return req

    def use_cfg(self, req) -> bool:
        return req.true_cfg_scale > 1.0

    def planner_vision(self, req):
        return [req.image], None

    def prepare(self, req, planned):
        pipe = self.pipe
        image = pixels([req.image], req.height, req.width)  # (1, 3, H, W): resized to the output size
        image_latents = pipe.engines["vae_encoder"]({"image": image})["image_latents"]
        _, h_tok, w_tok = pipe.token_grid(req)
        feeds = {"prompt_embeds": planned.prompt_embeds, "pooled_prompt_embeds": planned.pooled_prompt_embeds,
                 "canvas": planned.canvas, "image_latents": image_latents,
                 "guidance": np.array([req.guidance_scale], np.float32),
                 "guidance_scale": np.array([req.true_cfg_scale if planned.rows == 2 else 1.0], np.float32)}
        sample = pipe.initial_sample(req, pipe.denoise_shape("sample", req))
        return feeds, sample, pipe.schedule(req.num_inference_steps, image_seq_len=h_tok * w_tok)

    def finish(self, req, latents):
        return self.pipe.engines["vae_decoder"]({"latents": latents})["frames"]  # (1, H, W, 3) uint8
