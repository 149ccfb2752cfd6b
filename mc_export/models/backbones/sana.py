"""SANA-1.6B behind MetaCanvas: text-to-image (task ``t2i``) with the canvas on every DiT token.

Everything here mirrors diffusers' ``SanaPipeline`` (0.42.1) step for step (with ``use_resolution_binning=False``),
so that with the canvas layers at zero the final latents equal the pipeline's bit for bit:
  * float32 noise (B, C, H/f, W/f) from ``randn_tensor`` (f = the DC-AE stride), or the caller's ``latents``;
  * CFG when ``guidance_scale > 1``: both branches in one DiT call, batch [negative, positive], prompt masks as
    ``encoder_attention_mask``; the DiT gets ``t * timestep_scale``, the canvas injector ``t`` (0..1000);
  * the scheduler is the checkpoint's own (FlowMatchEuler for MetaCanvas-SANA, as for stock SANA), a fresh
    copy per request, ``set_timesteps(n)``;
  * DC-AE decoding of ``latents / scaling_factor``.
Sizes: any positive multiple of the DC-AE stride x patch size (32 at full size, like the pipeline's check;
4 for the tiny preset). The canvas residual is added to the whole ``patch_embed`` output (B, H*W, D).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from metacanvas_deploy.mc_export.errors import ConfigError, InputError, TaskError
from metacanvas_deploy.mc_export.models.backbones.base import CanvasCall, CanvasHook, Conditioning, SampleOutput
from metacanvas_deploy.mc_export.models.backbones.common import (
    cfg_combine,
    cfg_concat,
    check_conditioning,
    frames_to_uint8,
    prepare_canvas,
)
from metacanvas_deploy.mc_export.models.config import MetaCanvasConfig
from metacanvas_deploy.mc_export.models.connectors import CanvasInjector, CanvasPrep


class SanaAdapter:
    """SANA (transformer, DC-AE, FlowMatchEuler scheduler) with the MetaCanvas canvas hook."""

    backbone = "sana"
    guidance_distilled = False  # plain CFG: a negative branch whenever guidance_scale > 1

    @staticmethod
    def transformer_config(preset: dict, vae: dict, cfg: MetaCanvasConfig) -> dict:
        """A preset's DiT kwargs for this MetaCanvas config: the preset's own."""
        return dict(preset)

    def __init__(self, transformer, vae, scheduler, cfg: MetaCanvasConfig, canvas_prep: CanvasPrep,
                 injector: CanvasInjector):
        if cfg.backbone != self.backbone:
            raise ConfigError(f"SanaAdapter needs a sana MetaCanvasConfig, got backbone {cfg.backbone!r}")
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.cfg, self.canvas_prep, self.injector = cfg, canvas_prep, injector
        self.vae_scale_factor = 2 ** (len(vae.config.encoder_block_out_channels) - 1)
        self.patch_size = transformer.config.patch_size
        self.latent_channels = transformer.config.in_channels
        self.hook = CanvasHook(transformer.patch_embed, self._inject)

    # geometry -------------------------------------------------------------------------------------------
    def token_grid(self, height: int, width: int, num_frames: int = 1) -> tuple[int, int, int]:
        """(1, H_tok, W_tok): one DiT token per patch of the DC-AE latent."""
        step = self.vae_scale_factor * self.patch_size
        return 1, height // step, width // step

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this (VAE stride x patch)."""
        return self.vae_scale_factor * self.patch_size

    @property
    def frame_multiple(self) -> int:
        """num_frames - 1 must be a multiple of this (the VAE's temporal stride); 0 for image backbones."""
        return 0

    def check_shape(self, height: int, width: int, num_frames: int = 1) -> None:
        """InputError unless height and width are positive multiples of DC-AE stride x patch and frames == 1."""
        step = self.vae_scale_factor * self.patch_size
        if num_frames != 1:
            raise InputError(f"SANA makes images: num_frames must be 1, got {num_frames}")
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0 or v % step:
                raise InputError(f"{name} must be a positive multiple of {step} (DC-AE stride "
                                 f"{self.vae_scale_factor} x patch {self.patch_size}), got {v!r}")

    # the canvas hook ------------------------------------------------------------------------------------
    def _inject(self, x: torch.Tensor, call: CanvasCall) -> torch.Tensor:
        """x: (B, H*W, D) from patch_embed; every token is a noisy target token."""
        b, n, d = x.shape
        _, _, h_tok, w_tok, _ = call.canvas.shape  # (B, 1, H, W, D)
        if call.canvas.shape[0] != b or h_tok * w_tok != n:
            raise InputError(f"canvas {tuple(call.canvas.shape)} does not fit the DiT tokens {tuple(x.shape)}")
        canvas = call.canvas.reshape(b, n, d)  # (B, H*W, D)
        return self.injector(x, canvas, call.timestep, h_tok, w_tok)

    # one DiT forward ------------------------------------------------------------------------------------
    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                prompt_mask: torch.Tensor, canvas: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, C, h, w) in float32.

        latents (B, C, h, w); timestep (B,) on 0..1000 (the DiT gets ``t * timestep_scale`` like the pipeline,
        the injector t); prompt_embeds (B, L, D_txt); prompt_mask (B, L) 1 = real token;
        canvas (B, 1, H_tok, W_tok, D_dit) or None (the stock DiT).
        """
        call = None if canvas is None else CanvasCall(canvas=canvas, timestep=timestep)
        dtype = self.transformer.dtype
        with self.hook.bind(call):
            out = self.transformer(latents.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
                                   encoder_attention_mask=prompt_mask,
                                   timestep=timestep * self.transformer.config.timestep_scale,
                                   return_dict=False)[0]
        return out.float()

    # VAE ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, C, h, w) -> uint8 frames (B, 1, H, W, 3)."""
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return frames_to_uint8(self.vae.decode(z, return_dict=False)[0])

    # sampling -------------------------------------------------------------------------------------------
    def _check_request(self, task: str, cond: Conditioning, image, video, reference_images, use_cfg: bool) -> int:
        self.cfg.check_task(task)
        if image is not None or video is not None or reference_images is not None:
            raise TaskError("task 't2i' is text-only: it takes no image, video or reference_images")
        batch = check_conditioning(cond, self.transformer.config.caption_channels, use_cfg)
        masks = [("prompt_mask", cond.prompt_mask)]
        if use_cfg:
            masks.append(("negative_prompt_mask", cond.negative_prompt_mask))
        for name, mask in masks:
            if mask is None or tuple(mask.shape) != tuple(cond.prompt_embeds.shape[:2]):
                got = None if mask is None else tuple(mask.shape)
                raise InputError(f"{name} must be (B, L) = {tuple(cond.prompt_embeds.shape[:2])}, got {got}")
        return batch

    def _initial_latents(self, latents, batch: int, height: int, width: int, generator) -> torch.Tensor:
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            return randn_tensor(shape, generator=generator, dtype=torch.float32)  # (B, C, h, w)
        if tuple(latents.shape) != shape:
            raise InputError(f"latents must be {shape} (B, C, H/{self.vae_scale_factor}, W/{self.vae_scale_factor}),"
                             f" got {tuple(latents.shape)}")
        return latents.to(torch.float32)

    def make_scheduler(self, num_inference_steps: int):
        """A fresh scheduler for one request (no state shared between requests), as SanaPipeline sets it."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        scheduler.set_begin_index(0)
        return scheduler

    @torch.no_grad()
    def sample(self, task: str, cond: Conditioning, *, image=None, video=None, reference_images=None, height: int,
               width: int, num_frames: int = 1, num_inference_steps: int, guidance_scale: float = 4.5,
               generator: torch.Generator | None = None, latents: torch.Tensor | None = None) -> SampleOutput:
        """Reference text-to-image sampling: SanaPipeline's loop with the canvas on the DiT tokens."""
        use_cfg = guidance_scale > 1.0
        batch = self._check_request(task, cond, image, video, reference_images, use_cfg)
        self.check_shape(height, width, num_frames)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        _, h_tok, w_tok = self.token_grid(height, width)
        latents = self._initial_latents(latents, batch, height, width, generator)  # (B, C, h, w)
        canvas = prepare_canvas(self.canvas_prep, cond, use_cfg, 1, h_tok, w_tok)  # (B', 1, H, W, D) once
        embeds, mask = cond.prompt_embeds, cond.prompt_mask  # (B, L, D_txt), (B, L)
        if use_cfg:
            embeds = cfg_concat(cond.negative_prompt_embeds, embeds)  # (2B, L, D_txt)
            mask = cfg_concat(cond.negative_prompt_mask, mask)  # (2B, L)
        scheduler = self.make_scheduler(num_inference_steps)
        for t in scheduler.timesteps:
            x = cfg_concat(latents, latents) if use_cfg else latents  # (B', C, h, w)
            v = self.denoise(x, t.expand(x.shape[0]), embeds, mask, canvas)  # (B', C, h, w)
            if use_cfg:
                v = cfg_combine(v, guidance_scale)  # (B, C, h, w)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        return SampleOutput(frames=self.decode(latents), latents=latents, prompt_embeds=cond.prompt_embeds,
                            negative_prompt_embeds=cond.negative_prompt_embeds if use_cfg else None)
