"""FLUX.1-Kontext-dev behind MetaCanvas: image editing (task ``edit``) with the canvas on the target tokens.

Everything here mirrors diffusers' ``FluxKontextPipeline`` (0.42.1) step for step, so that with the canvas
layers at zero the final latents equal the pipeline's bit for bit:
  * latents are 2x2-packed: (B, C, 2h, 2w) -> (B, h*w, 4C); the DiT sees [target tokens | context-image tokens]
    along the sequence, image ids (0, row, col) for the target and (1, row, col) for the context, text ids zeros;
  * the input image is resized to (height, width) (Lanczos, diffusers' resampler) and VAE-encoded with the
    posterior mode, then ``(z - shift_factor) * scaling_factor``; the pipeline instead keeps the image's own size
    (rounded down to a multiple of 16): with an image already at (height, width) the two agree;
  * sigmas linspace(1, 1/n, n) with the resolution-dependent shift ``mu`` of the target token count;
  * guidance-distilled: ``guidance_scale`` feeds the guidance embedding; an unconditional branch only when
    ``true_cfg_scale > 1``, batched [negative, positive] in one DiT call (the pipeline runs two calls).
The canvas residual is added to the first h*w tokens leaving ``x_embedder``; context tokens pass untouched.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from metacanvas_deploy.mc_export.errors import ConfigError, InputError, TaskError
from metacanvas_deploy.mc_export.models.backbones.base import CanvasCall, CanvasHook, Conditioning, SampleOutput
from metacanvas_deploy.mc_export.models.backbones.common import (
    ImageLike,
    cfg_combine,
    cfg_concat,
    check_conditioning,
    frames_to_uint8,
    image_to_tensor,
    prepare_canvas,
)
from metacanvas_deploy.mc_export.models.config import MetaCanvasConfig
from metacanvas_deploy.mc_export.models.connectors import CanvasInjector, CanvasPrep

PACK = 2  # FLUX packs 2x2 latent pixels into one token


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, h*w, 4C), FluxKontextPipeline._pack_latents."""
    b, c, hh, ww = latents.shape
    x = latents.view(b, c, hh // PACK, PACK, ww // PACK, PACK)  # (B, C, h, 2, w, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
    return x.reshape(b, (hh // PACK) * (ww // PACK), c * PACK * PACK)  # (B, h*w, 4C)


def unpack_latents(packed: torch.Tensor, h_tok: int, w_tok: int) -> torch.Tensor:
    """(B, h*w, 4C) -> (B, C, 2h, 2w), FluxKontextPipeline._unpack_latents."""
    b, _, c4 = packed.shape
    x = packed.view(b, h_tok, w_tok, c4 // 4, PACK, PACK)  # (B, h, w, C, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
    return x.reshape(b, c4 // 4, h_tok * PACK, w_tok * PACK)  # (B, C, 2h, 2w)


def image_ids(h_tok: int, w_tok: int, first: float = 0.0, device: torch.device | None = None) -> torch.Tensor:
    """RoPE ids (h*w, 3) = (first, row, col) per token; first = 1 marks Kontext context-image tokens.

    The pipeline's values (float32 whole numbers), built without in-place writes: with symbolic sizes (the
    exported denoise step computes its ids from the latents' shapes) slice assignment would export as Scatter.
    """
    rows = torch.arange(h_tok, dtype=torch.float32, device=device)[:, None].expand(h_tok, w_tok)  # (h, w)
    cols = torch.arange(w_tok, dtype=torch.float32, device=device)[None, :].expand(h_tok, w_tok)  # (h, w)
    ids = torch.stack([torch.full_like(rows, first), rows, cols], dim=-1)  # (h, w, 3)
    return ids.reshape(h_tok * w_tok, 3)  # (h*w, 3)


def shift_mu(image_seq_len: int, config) -> float:
    """The resolution-dependent timestep shift of FLUX (diffusers' ``calculate_shift``), from the scheduler
    config's base/max sequence lengths and shifts."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


class FluxKontextAdapter:
    """FLUX.1-Kontext-dev (transformer, VAE, FlowMatchEuler scheduler) with the MetaCanvas canvas hook."""

    backbone = "flux"
    # FLUX.1-Kontext-dev: guidance_scale feeds the guidance embedding; a negative branch only for true CFG
    guidance_distilled = True

    @staticmethod
    def transformer_config(preset: dict, vae: dict, cfg: MetaCanvasConfig) -> dict:
        """A preset's DiT kwargs for this MetaCanvas config: the preset's own."""
        return dict(preset)

    def __init__(self, transformer, vae, scheduler, cfg: MetaCanvasConfig, canvas_prep: CanvasPrep,
                 injector: CanvasInjector):
        if cfg.backbone != self.backbone:
            raise ConfigError(f"FluxKontextAdapter needs a flux MetaCanvasConfig, got backbone {cfg.backbone!r}")
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.cfg, self.canvas_prep, self.injector = cfg, canvas_prep, injector
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = transformer.config.in_channels // (PACK * PACK)
        self.hook = CanvasHook(transformer.x_embedder, self._inject)

    # geometry -------------------------------------------------------------------------------------------
    def token_grid(self, height: int, width: int, num_frames: int = 1) -> tuple[int, int, int]:
        """(1, H_tok, W_tok): one DiT token per 2x2 latent pixels, i.e. per (2*vae_scale)^2 image pixels."""
        step = self.vae_scale_factor * PACK
        return 1, height // step, width // step

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this (VAE stride x patch)."""
        return self.vae_scale_factor * PACK

    @property
    def frame_multiple(self) -> int:
        """num_frames - 1 must be a multiple of this (the VAE's temporal stride); 0 for image backbones."""
        return 0

    def check_shape(self, height: int, width: int, num_frames: int = 1) -> None:
        """InputError unless height and width are positive multiples of 2 * vae_scale (16) and frames == 1."""
        step = self.vae_scale_factor * PACK
        if num_frames != 1:
            raise InputError(f"FLUX-Kontext makes images: num_frames must be 1, got {num_frames}")
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0 or v % step:
                raise InputError(f"{name} must be a positive multiple of {step} (VAE stride {self.vae_scale_factor} "
                                 f"x 2x2 packing), got {v!r}")

    # the canvas hook ------------------------------------------------------------------------------------
    def _inject(self, x: torch.Tensor, call: CanvasCall) -> torch.Tensor:
        """x: (B, N_tgt + N_ctx, D) from x_embedder; the injector sees the first N_tgt (target) tokens only."""
        b, _, d = x.shape
        _, _, h_tok, w_tok, _ = call.canvas.shape  # (B, 1, H, W, D)
        n_tgt = h_tok * w_tok
        if call.canvas.shape[0] != b:
            raise InputError(f"canvas batch {call.canvas.shape[0]} != DiT batch {b}")
        canvas = call.canvas.reshape(b, n_tgt, d)  # (B, N_tgt, D)
        target = self.injector(x[:, :n_tgt], canvas, call.timestep, h_tok, w_tok)  # (B, N_tgt, D)
        return torch.cat([target, x[:, n_tgt:]], dim=1)  # context tokens untouched

    # one DiT forward ------------------------------------------------------------------------------------
    def denoise(self, latents: torch.Tensor, image_latents: torch.Tensor, timestep: torch.Tensor,
                guidance: torch.Tensor, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                txt_ids: torch.Tensor, img_ids: torch.Tensor, canvas: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity of the target tokens, (B, N_tgt, 4C).

        latents (B, N_tgt, 4C) and image_latents (B, N_ctx, 4C) packed; timestep (B,) on 0..1000 (the DiT gets
        t/1000 like the pipeline, the injector t); guidance (B,); prompt_embeds (B, L, D_txt); pooled (B, P);
        txt_ids (L, 3); img_ids (N_tgt + N_ctx, 3); canvas (B, 1, H_tok, W_tok, D_dit) or None (stock DiT).
        """
        hidden = torch.cat([latents, image_latents], dim=1)  # (B, N_tgt + N_ctx, 4C)
        call = None if canvas is None else CanvasCall(canvas=canvas, timestep=timestep)
        with self.hook.bind(call):
            out = self.transformer(hidden_states=hidden, timestep=timestep / 1000, guidance=guidance,
                                   pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                                   txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out[:, : latents.shape[1]]  # (B, N_tgt, 4C)

    # VAE ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image: ImageLike, height: int, width: int, batch: int) -> torch.Tensor:
        """The context image -> packed, scaled latents (batch, N_tgt, 4C) (the posterior mode, as diffusers)."""
        pixels = image_to_tensor(image, height, width).to(self.vae.dtype)  # (1, 3, H, W)
        z = self.vae.encode(pixels).latent_dist.mode()  # (1, C, 2h, 2w)
        z = (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return pack_latents(z).expand(batch, -1, -1)  # (B, N_tgt, 4C)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Packed latents (B, N_tgt, 4C) -> uint8 frames (B, 1, H, W, 3)."""
        _, h_tok, w_tok = self.token_grid(height, width)
        z = unpack_latents(latents, h_tok, w_tok)  # (B, C, 2h, 2w)
        z = z / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return frames_to_uint8(self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0])

    # sampling -------------------------------------------------------------------------------------------
    def _check_request(self, task: str, cond: Conditioning, image, video, reference_images, use_cfg: bool) -> None:
        self.cfg.check_task(task)
        if image is None:
            raise TaskError("task 'edit' needs an input image (PIL.Image RGB or uint8 (H, W, 3) numpy array)")
        if video is not None or reference_images is not None:
            raise TaskError("task 'edit' takes one image; video and reference_images are Wan inputs")
        check_conditioning(cond, self.transformer.config.joint_attention_dim, use_cfg,
                           pooled_dim=self.transformer.config.pooled_projection_dim)

    def _initial_latents(self, latents, batch: int, h_tok: int, w_tok: int, generator, dtype) -> torch.Tensor:
        shape = (batch, h_tok * w_tok, self.latent_channels * PACK * PACK)
        if latents is None:
            noise = randn_tensor((batch, self.latent_channels, h_tok * PACK, w_tok * PACK), generator=generator,
                                 dtype=dtype)  # (B, C, 2h, 2w)
            return pack_latents(noise)  # (B, N_tgt, 4C)
        if tuple(latents.shape) != shape:
            raise InputError(f"latents must be packed {shape} (B, H_tok*W_tok, 4*C), got {tuple(latents.shape)}")
        return latents.to(dtype)

    def make_scheduler(self, num_inference_steps: int, n_tgt: int):
        """A fresh scheduler for one request (no state shared between requests): sigmas linspace(1, 1/n, n),
        shifted by ``mu`` of the target token count, as FluxKontextPipeline sets them."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(num_inference_steps, sigmas=sigmas, mu=shift_mu(n_tgt, scheduler.config))
        scheduler.set_begin_index(0)
        return scheduler

    @torch.no_grad()
    def sample(self, task: str, cond: Conditioning, *, image: ImageLike | None = None, video=None,
               reference_images=None, height: int, width: int, num_frames: int = 1, num_inference_steps: int,
               guidance_scale: float = 2.5, generator: torch.Generator | None = None,
               latents: torch.Tensor | None = None, true_cfg_scale: float = 1.0) -> SampleOutput:
        """Reference edit sampling: FluxKontextPipeline's loop with the canvas on the target tokens.

        ``image`` (PIL RGB or uint8 (H, W, 3)) is shared by the B prompts and resized to (height, width).
        ``latents``: packed initial noise (B, H_tok*W_tok, 4C), as the pipeline's ``latents`` argument.
        ``true_cfg_scale > 1`` adds the negative branch (its own canvas and pooled embeddings). The prompt masks
        are not used: FLUX attends to every text position, padded ones are zero embeddings.
        """
        use_cfg = true_cfg_scale > 1.0
        self._check_request(task, cond, image, video, reference_images, use_cfg)
        self.check_shape(height, width, num_frames)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        _, h_tok, w_tok = self.token_grid(height, width)
        b, dtype = cond.prompt_embeds.shape[0], cond.prompt_embeds.dtype
        image_latents = self.encode_image(image, height, width, b).to(dtype)  # (B, N_ctx, 4C)
        if use_cfg:
            image_latents = cfg_concat(image_latents, image_latents)  # (2B, N_ctx, 4C): both branches
        latents = self._initial_latents(latents, b, h_tok, w_tok, generator, dtype)  # (B, N_tgt, 4C)
        canvas = prepare_canvas(self.canvas_prep, cond, use_cfg, 1, h_tok, w_tok)  # (B', 1, H, W, D) once
        embeds, pooled = cond.prompt_embeds, cond.pooled_prompt_embeds  # (B, L, D_txt), (B, P)
        if use_cfg:
            embeds = cfg_concat(cond.negative_prompt_embeds, embeds)  # (2B, L, D_txt)
            pooled = cfg_concat(cond.negative_pooled_prompt_embeds, pooled)  # (2B, P)
        txt_ids = torch.zeros(embeds.shape[1], 3, dtype=dtype)  # (L, 3)
        img_ids = torch.cat([image_ids(h_tok, w_tok), image_ids(h_tok, w_tok, first=1.0)]).to(dtype)  # (2N, 3)
        guidance = torch.full([1], guidance_scale, dtype=torch.float32).expand(embeds.shape[0])  # (B',)
        scheduler = self.make_scheduler(num_inference_steps, h_tok * w_tok)
        for t in scheduler.timesteps:
            x = cfg_concat(latents, latents) if use_cfg else latents  # (B', N_tgt, 4C)
            timestep = t.expand(x.shape[0]).to(dtype)  # (B',) on 0..1000
            v = self.denoise(x, image_latents, timestep, guidance, embeds, pooled, txt_ids, img_ids, canvas)
            if use_cfg:
                v = cfg_combine(v, true_cfg_scale)  # (B, N_tgt, 4C)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        return SampleOutput(frames=self.decode(latents, height, width), latents=latents,
                            prompt_embeds=cond.prompt_embeds,
                            negative_prompt_embeds=cond.negative_prompt_embeds if use_cfg else None)
