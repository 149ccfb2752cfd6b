"""Wan2.2-TI2V backbone adapter: canvas injection and the PyTorch reference sampler for t2v, i2v, v2v, r2v.

The DiT, VAE and scheduler are stock diffusers objects. What this module adds:
- the canvas hook on ``transformer.patch_embedding``: the injector runs per latent frame (a batch of B*T
  token grids of H*W tokens) on the target frames only, never on r2v's leading reference frames;
- the MetaCanvas input layout ``[noisy target | condition latents | mask]`` when ``condition_channels > 0``;
- Wan2.2-TI2V's per-token timesteps (diffusers' ``expand_timesteps=True``): clean frames (the i2v first
  frame, r2v references) get timestep 0;
- CFG with both branches in one DiT call, ordered [negative, positive].
With zero canvas layers, or no canvas, t2v and i2v reproduce diffusers' ``WanPipeline`` and
``WanImageToVideoPipeline`` (``expand_timesteps=True``); tests/test_wan.py checks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
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
    images_to_tensor,
    prepare_canvas,
    video_to_tensor,
)
from metacanvas_deploy.mc_export.models.config import MetaCanvasConfig
from metacanvas_deploy.mc_export.models.connectors import CanvasInjector, CanvasPrep


@dataclass
class WanRequest:
    """Everything a request fixes before the first step: clean latents, condition channels, timestep layout.

    Shapes: B batch, C latent channels, R reference frames (r2v), T target latent frames, h x w latent grid.
    """

    prefix: torch.Tensor | None  # (B, C, R, h, w) clean r2v reference latents, or None
    first_frame: torch.Tensor | None  # (B, C, 1, h, w) clean i2v image latent, or None
    condition: torch.Tensor | None  # (B, condition_channels, R+T, h, w) [condition latents | mask], or None
    frame_noise: torch.Tensor  # (R+T,) 1.0 on noisy frames, 0.0 on clean ones: per-frame timestep factor

    @property
    def reference_frames(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[2]


class WanAdapter:
    """Runs a stock diffusers Wan2.2-TI2V DiT/VAE/UniPC with the MetaCanvas canvas and input layout."""

    backbone = "wan"
    guidance_distilled = False  # plain CFG: a negative branch whenever guidance_scale > 1

    @staticmethod
    def transformer_config(preset: dict, vae: dict, cfg: MetaCanvasConfig) -> dict:
        """A preset's DiT kwargs for this MetaCanvas config: the input takes the noisy latents plus the
        condition channels (0 for a stock T2V/I2V layout)."""
        return {**preset, "in_channels": vae["z_dim"] + cfg.condition_channels}

    def __init__(self, transformer: WanTransformer3DModel, vae: AutoencoderKLWan,
                 scheduler: UniPCMultistepScheduler, cfg: MetaCanvasConfig, canvas_prep: CanvasPrep,
                 injector: CanvasInjector):
        if cfg.backbone != self.backbone:
            raise ConfigError(f"WanAdapter needs a wan MetaCanvasConfig, got backbone {cfg.backbone!r}")
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.cfg, self.canvas_prep, self.injector = cfg, canvas_prep, injector
        self.latent_channels = vae.config.z_dim
        self.stride_t = vae.config.scale_factor_temporal
        self.stride_s = vae.config.scale_factor_spatial
        self.patch = tuple(transformer.config.patch_size)  # (1, p, p)
        self._check_components()
        self.hook = CanvasHook(transformer.patch_embedding, self._inject)

    def _check_components(self) -> None:
        """The DiT, VAE and MetaCanvas config must agree on channels and widths."""
        tc = self.transformer.config
        expected_in = self.latent_channels + self.cfg.condition_channels
        if tc.in_channels != expected_in:
            raise ConfigError(f"transformer in_channels={tc.in_channels}, but latent channels {self.latent_channels}"
                              f" + condition_channels {self.cfg.condition_channels} = {expected_in}")
        if self.cfg.condition_channels and self.cfg.condition_channels != self.latent_channels + 1:
            raise ConfigError(f"condition_channels must be latent channels + 1 = {self.latent_channels + 1} "
                              f"(condition latents + mask), got {self.cfg.condition_channels}")
        if tc.num_attention_heads * tc.attention_head_dim != self.cfg.dit_dim or tc.text_dim != self.cfg.text_dim:
            raise ConfigError("MetaCanvasConfig dit_dim/text_dim do not match the transformer's width/text_dim")
        if self.patch[0] != 1 or self.patch[1] != self.patch[2]:
            raise ConfigError(f"expected a (1, p, p) patch, got {self.patch}")

    # --- geometry -------------------------------------------------------------------------------------------
    def token_grid(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        """(T_lat, H_tok, W_tok) of the target frames: the one place for Wan's token-count formula."""
        p = self.patch[1]
        return (num_frames - 1) // self.stride_t + 1, height // (self.stride_s * p), width // (self.stride_s * p)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """(B, C, T_lat, h, w) of the target latents."""
        t, h, w = self.token_grid(height, width, num_frames)
        return batch, self.latent_channels, t, h * self.patch[1], w * self.patch[2]

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this (VAE stride x patch)."""
        return self.stride_s * self.patch[1]

    @property
    def frame_multiple(self) -> int:
        """num_frames - 1 must be a multiple of this (the VAE's temporal stride); 0 for image backbones."""
        return self.stride_t

    def check_shape(self, height: int, width: int, num_frames: int) -> None:
        """InputError unless height/width are positive multiples of VAE stride x patch and frames == 4k+1."""
        multiple = self.stride_s * self.patch[1]
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % multiple:
                raise InputError(f"{name}={v!r}: must be a positive multiple of {multiple} "
                                 f"(VAE stride {self.stride_s} x patch {self.patch[1]})")
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % self.stride_t:
            raise InputError(f"num_frames={num_frames!r}: must be {self.stride_t}k+1 (1, {self.stride_t + 1}, "
                             f"{2 * self.stride_t + 1}, ...) for the VAE's temporal stride {self.stride_t}")

    # --- the canvas hook and one DiT forward -----------------------------------------------------------------
    def _inject(self, x: torch.Tensor, call: CanvasCall) -> torch.Tensor:
        """patch_embedding output (B, D, R+T, H, W) -> same, with the injector applied to the T target frames."""
        r = call.reference_frames
        b, d, f, h, w = x.shape
        t = f - r
        if tuple(call.canvas.shape) != (b, t, h, w, d):
            raise InputError(f"canvas residual {tuple(call.canvas.shape)} does not fit the token grid "
                             f"(B={b}, T={t}, H={h}, W={w}, D={d})")
        tokens = x[:, :, r:].permute(0, 2, 3, 4, 1).reshape(b * t, h * w, d)  # (B*T, H*W, D)
        canvas = call.canvas.to(x.dtype).reshape(b * t, h * w, d)  # (B*T, H*W, D)
        # expand + reshape, not repeat_interleave: torch.onnx lowers a symbolic repeat count to a broken Expand
        timestep = call.timestep[:, None].expand(b, t).reshape(b * t)  # (B*T,)
        out = self.injector(tokens, canvas, timestep, h, w)  # (B*T, H*W, D)
        out = out.reshape(b, t, h, w, d).permute(0, 4, 1, 2, 3)  # (B, D, T, H, W)
        # reference tokens pass through untouched; no `if r`: one exported graph serves r = 0 (an empty slice)
        return torch.cat([x[:, :, :r], out], dim=2)

    @staticmethod
    def injector_timestep(timestep: torch.Tensor) -> torch.Tensor:
        """Per-token timesteps (B, N) -> the injector's (B,): the last token's, i.e. the last frame's (DESIGN)."""
        return timestep[:, -1]

    def denoise(self, latent_input: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                canvas: CanvasCall | None) -> torch.Tensor:
        """One DiT forward: (B, C_in, R+T, h, w), per-token timesteps (B, N), (B, L, D_txt) -> velocity
        (B, C, R+T, h, w). ``canvas`` None runs the stock model."""
        with self.hook.bind(canvas):
            return self.transformer(hidden_states=latent_input, timestep=timestep,
                                    encoder_hidden_states=prompt_embeds, return_dict=False)[0]

    # --- VAE --------------------------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as (1, C, 1, 1, 1), the normalisation of diffusers' Wan pipelines."""
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, F, H, W) in [-1, 1] -> normalised latents (N, C, T, h, w) (the posterior's mode)."""
        z = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mode().float()
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T, h, w) -> uint8 frames (B, F, H, W, 3)."""
        z = latents.to(self.vae.device, self.vae.dtype)
        mean, inv_std = self._latent_stats(z)
        return frames_to_uint8(self.vae.decode(z / inv_std + mean, return_dict=False)[0])

    # --- requests ---------------------------------------------------------------------------------------------
    def prepare_request(self, task: str, batch: int, height: int, width: int, num_frames: int, *,
                        image: ImageLike | None = None, video=None,
                        reference_images: ImageLike | Sequence[ImageLike] | None = None) -> WanRequest:
        """Validate the task's pixel inputs and VAE-encode them into the request's clean latents and condition."""
        self.cfg.check_task(task)
        needs = {"i2v": "image", "v2v": "video", "r2v": "reference_images"}
        given = {"image": image, "video": video, "reference_images": reference_images}
        for name, value in given.items():
            if value is None and needs.get(task) == name:
                raise TaskError(f"task {task!r} needs `{name}`, got None")
            if value is not None and needs.get(task) != name:
                raise TaskError(f"task {task!r} takes no `{name}`; " + (
                    f"it takes `{needs[task]}`" if task in needs else "it is text-only"))
        t_lat = self.token_grid(height, width, num_frames)[0]
        prefix = first_frame = source = None
        if task == "i2v":
            first_frame = self.encode(image_to_tensor(image, height, width)[:, :, None])  # (1, C, 1, h, w)
        elif task == "v2v":
            source = self.encode(video_to_tensor(video, height, width, num_frames))  # (1, C, T, h, w)
        elif task == "r2v":
            refs = images_to_tensor(reference_images, height, width, name="reference_images")  # (R, 3, H, W)
            prefix = self.encode(refs[:, :, None]).permute(2, 1, 0, 3, 4)  # (R, C, 1, h, w) -> (1, C, R, h, w)
        r = 0 if prefix is None else prefix.shape[2]
        frame_noise = torch.ones(r + t_lat)
        frame_noise[:r] = 0.0  # references are clean
        if first_frame is not None:
            frame_noise[0] = 0.0  # the i2v image frame is clean
        condition = self._condition(source, r, t_lat, height, width, task)
        device = self.transformer.device
        expand = lambda z: None if z is None else z.to(device).expand(batch, -1, -1, -1, -1)  # noqa: E731 (B, ...)
        return WanRequest(expand(prefix), expand(first_frame), expand(condition), frame_noise.to(device))

    def _condition(self, source: torch.Tensor | None, refs: int, t_lat: int, height: int, width: int,
                   task: str) -> torch.Tensor | None:
        """The [condition latents | mask] channels (1, C+1, R+T, h, w), or None for a stock layout."""
        if not self.cfg.condition_channels:
            return None
        _, c, _, h, w = self.latent_shape(1, height, width, 1)
        latents = torch.zeros(1, c, refs + t_lat, h, w) if source is None else source  # (1, C, R+T, h, w)
        mask = torch.zeros(1, 1, refs + t_lat, h, w)
        if task == "v2v":
            mask.fill_(1.0)
        mask[:, :, :refs] = 1.0  # r2v: mask 1 on the reference frames
        return torch.cat([latents, mask], dim=1)  # (1, C+1, R+T, h, w)

    def model_input(self, latents: torch.Tensor, request: WanRequest) -> torch.Tensor:
        """Scheduler latents (B, C, T, h, w) -> the DiT's input (B, C_in, R+T, h, w) for one step."""
        x = latents
        if request.first_frame is not None:  # Wan2.2-TI2V: the clean image latent replaces frame 0
            x = torch.cat([request.first_frame, x[:, :, 1:]], dim=2)  # (B, C, T, h, w)
        if request.prefix is not None:
            x = torch.cat([request.prefix, x], dim=2)  # (B, C, R+T, h, w)
        if request.condition is not None:
            x = torch.cat([x, request.condition.to(x.dtype)], dim=1)  # (B, C_in, R+T, h, w)
        return x.to(self.transformer.dtype)

    def token_timesteps(self, t: torch.Tensor, request: WanRequest, batch: int, h_tok: int,
                        w_tok: int) -> torch.Tensor:
        """Scheduler timestep t -> per-token timesteps (batch, (R+T)*H_tok*W_tok), 0 on clean frames."""
        n = h_tok * w_tok  # expand + reshape: exportable with symbolic sizes, unlike repeat_interleave
        per_token = request.frame_noise[:, None].expand(-1, n).reshape(-1) * t  # ((R+T)*H*W,)
        return per_token.unsqueeze(0).expand(batch, -1)

    # --- noise ------------------------------------------------------------------------------------------------
    def initial_latents(self, shape: tuple[int, ...], generator: torch.Generator | None,
                        latents: torch.Tensor | None) -> torch.Tensor:
        """Seeded float32 noise (B, C, T, h, w) as diffusers' ``randn_tensor``, or the caller's ``latents``."""
        if latents is None:
            return randn_tensor(shape, generator=generator, device=self.transformer.device, dtype=torch.float32)
        if tuple(latents.shape) != tuple(shape):
            raise InputError(f"latents: expected shape {tuple(shape)} (B, C, T_lat, h, w), got {tuple(latents.shape)}")
        return latents.to(self.transformer.device, torch.float32)

    # --- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, task: str, cond: Conditioning, *, image: ImageLike | None = None, video=None,
               reference_images: ImageLike | Sequence[ImageLike] | None = None, height: int, width: int,
               num_frames: int, num_inference_steps: int, guidance_scale: float,
               generator: torch.Generator | None = None, latents: torch.Tensor | None = None) -> SampleOutput:
        """The PyTorch reference sampler: one request of B prompts -> B videos of ``num_frames`` frames.

        ``image`` (i2v), ``video`` (v2v, uint8 (F, H, W, 3)) and ``reference_images`` (r2v) are shared by the
        batch. ``guidance_scale <= 1`` runs no negative branch. Returns the target frames only.
        """
        self.cfg.check_task(task)
        self.check_shape(height, width, num_frames)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        do_cfg = guidance_scale > 1.0
        batch = check_conditioning(cond, self.cfg.text_dim, do_cfg)
        request = self.prepare_request(task, batch, height, width, num_frames, image=image, video=video,
                                       reference_images=reference_images)
        grid = self.token_grid(height, width, num_frames)
        canvas = prepare_canvas(self.canvas_prep, cond, do_cfg, *grid)  # (B', T, H, W, D_dit), once
        embeds = cfg_concat(cond.negative_prompt_embeds, cond.prompt_embeds) if do_cfg else cond.prompt_embeds
        embeds = embeds.to(self.transformer.device, self.transformer.dtype)  # (B', L, D_txt)
        latents = self.initial_latents(self.latent_shape(batch, height, width, num_frames), generator, latents)
        scheduler = UniPCMultistepScheduler.from_config(self.scheduler.config)  # fresh state per request
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        scheduler.set_begin_index(0)
        r = request.reference_frames
        for t in scheduler.timesteps:
            x = self.model_input(latents, request)  # (B, C_in, R+T, h, w)
            if do_cfg:
                x = torch.cat([x, x])  # (2B, C_in, R+T, h, w): [negative, positive]
            timestep = self.token_timesteps(t, request, x.shape[0], grid[1], grid[2])  # (B', N)
            call = None if canvas is None else CanvasCall(canvas, self.injector_timestep(timestep), r)
            velocity = self.denoise(x, timestep, embeds, call)[:, :, r:]  # (B', C, T, h, w)
            if do_cfg:
                velocity = cfg_combine(velocity, guidance_scale)  # (B, C, T, h, w)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if request.first_frame is not None:
            latents = torch.cat([request.first_frame, latents[:, :, 1:]], dim=2)  # the clean image frame
        return SampleOutput(frames=self.decode(latents), latents=latents, prompt_embeds=cond.prompt_embeds,
                            negative_prompt_embeds=cond.negative_prompt_embeds if do_cfg else None)
