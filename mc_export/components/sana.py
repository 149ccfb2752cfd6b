"""SANA stages: the denoise step (`SanaDenoise`), the DC-AE encoder (`SanaVaeEncoder`) and decoder
(`SanaVaeDecoder`).

How a runtime runs a ``t2i`` request with these engines (numpy only; C = ``latent_channels``, f = the DC-AE
stride ``vae_scale_factor``, p = the DiT's ``patch_size``; every number is in the engine's ``extra``, see
`runtime_facts`):

  geometry  height H and width W are multiples of ``size_multiple`` = f * p; h_tok = H / (f p), w_tok = W / (f p);
            the latents are (C, p*h_tok, p*w_tok) = (C, H / f, W / f).
  planner   gives ``prompt_embeds`` (rows, L, D_txt) with ``prompt_mask`` (rows, L) int64 (1 = real token, 0 =
            padding; padded embeddings are zero) and ``canvas`` (rows, 1, h_tok, w_tok, D_dit). rows = 2
            ([negative, positive]) when guidance_scale > 1 (CFG), else rows = 1 (the positive prompt alone).
  plan      ``runtime.schedulers.make_plan(manifest scheduler config, N)`` (static shift: no image_seq_len).
  denoise   ``sample`` x_0: standard-normal float32 noise (1, C, p*h_tok, p*w_tok) (diffusers' ``randn_tensor``
            of that shape). Step i feeds ``timestep`` = [plan.timesteps[i]] and ``coefficients`` =
            plan.coefficient_array()[i], both float32 (the graph scales t by the DiT's ``timestep_scale`` and gives
            the canvas injector t, as the pipeline does); ``guidance_scale`` = [guidance_scale] (read only when
            rows = 2); the planner outputs unchanged every step. ``next_sample`` is x_{i+1}: feed it back as
            ``sample``; after step N - 1 it is the final latents. With a multistep plan (K > 0) the state inputs
            ``last_sample``/``history`` start as zeros and take ``next_last_sample``/``next_history`` back.
  vae_decoder  ``latents`` (n, C, p*h_tok, p*w_tok) = the final ``next_sample``; the graph divides by
            ``vae_scaling_factor``, decodes and post-processes like diffusers' VaeImageProcessor: ``frames``
            (n, H, W, 3) uint8 = round_half_even(clamp(x/2 + 0.5, 0, 1) * 255). No host post-processing.
  vae_encoder  (not used by t2i; for editing-style callers) ``image`` (n, 3, H, W) float32: RGB uint8 resized
            with Lanczos, ``x / 255 * 2 - 1``, NCHW. Output ``latents`` = DC-AE ``latent * vae_scaling_factor``,
            the normalised layout the denoise step and the decoder use.

SANA's and DC-AE's linear attention divide by ``den + 1e-15``; onnxscript's optimizer folds that eps away (an
fp32 add of 1e-15 to a value of order 1 is a no-op it removes) and an all-zero row then gives NaN, so every spec
here exports with ``optimize=False``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from metacanvas_deploy.mc_export.components.common import (
    UINT8_TOLERANCE,
    ImageVaeDecoder,
    ImageVaeEncoder,
    batch_range,
    scaled,
)
from metacanvas_deploy.mc_export.components.denoise import (
    ImageDenoise,
    StepModule,
    cfg_combine,
    state_specs,
    step_dims,
    step_inputs,
)
from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.components.spec import Component, ComponentSpec
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.runtime.tensor_spec import TensorSpec


class _SanaStep(StepModule):
    """One step of SanaPipeline's loop: both CFG branches in one DiT call, CFG combine, scheduler update."""

    def forward(self, sample, prompt_embeds, canvas, timestep, guidance_scale, coefficients, prompt_mask,
                last_sample=None, history=None):
        rows = prompt_embeds.shape[0]
        # One `rows` and one `prompt_tokens` across inputs, stated up front: torch.export gives each input's dims
        # their own symbols, and diffusers' mask view (batch, heads, -1, L) cannot be resolved otherwise.
        torch._check(prompt_mask.shape[0] == rows)
        torch._check(prompt_mask.shape[1] == prompt_embeds.shape[1])
        x = sample.expand(rows, -1, -1, -1)  # (rows, C, h, w)
        v = self.adapter.denoise(x, timestep.expand(rows), prompt_embeds, prompt_mask, canvas)  # (rows, C, h, w)
        return self.update(coefficients, sample, cfg_combine(v, guidance_scale), last_sample, history)


class SanaDenoise(ImageDenoise):
    """The SANA denoise step (stage "denoise"): module docstring for the runtime's recipe."""

    def __init__(self, model, ranges: BuildRanges, history: int = 0):
        adapter = model.adapter
        if adapter.backbone != "sana":
            raise ConfigError(f"SanaDenoise needs a sana model, got backbone {adapter.backbone!r}")
        super().__init__(model, history)
        cfg, c, p = model.cfg, adapter.latent_channels, adapter.patch_size
        tok = ranges.token_dims(adapter)
        sample = TensorSpec("sample", "float32", (1, c, scaled(p, "h_tok"), scaled(p, "w_tok")))
        state_in, outputs = state_specs(sample, history)
        inputs = (*step_inputs(sample, cfg.text_dim, cfg.dit_dim, 1, history),
                  TensorSpec("prompt_mask", "int64", ("rows", "prompt_tokens")),
                  *state_in)
        dims = {**step_dims(ranges), "h_tok": tok["h_tok"], "w_tok": tok["w_tok"]}
        self.spec = ComponentSpec("denoise", inputs, outputs, dims, optimize=False, extra=self.runtime_facts())

    def module(self) -> nn.Module:
        return _SanaStep(self.adapter)

    def runtime_facts(self) -> dict:
        """What a numpy runtime needs to prepare this stage's inputs (the module docstring says how)."""
        a = self.adapter
        return self.step_facts(
            patch_size=a.patch_size, vae_scale_factor=a.vae_scale_factor, size_multiple=a.size_multiple,
            vae_scaling_factor=float(a.vae.config.scaling_factor),
            timestep_scale=float(a.transformer.config.timestep_scale),
            sample_layout="(1, C, H / vae_scale_factor, W / vae_scale_factor)",
            cfg_rows=["negative", "positive"], cfg_when="guidance_scale > 1", prompt_mask="int64, 1 = real token")

    def sample_inputs(self, which: str = "opt", seed: int = 0,
                      overrides: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """Random latents and canvas, left-padded prompts (as the planner's tokenizer pads: at least one real
        token per row, zero embeddings on padding), a real plan step, the preset's CFG scale."""
        arrays = super().sample_inputs(which, seed, overrides)
        rng = np.random.default_rng(seed + 1)
        rows, length = arrays["prompt_mask"].shape
        real = rng.integers(1, length + 1, rows)  # (rows,) real tokens per row
        mask = (np.arange(length)[None] >= (length - real)[:, None]).astype(np.int64)  # (rows, L)
        arrays["prompt_mask"] = mask
        arrays["prompt_embeds"] *= mask[..., None]
        arrays.update(self.plan_step(rng))
        arrays["guidance_scale"] = np.array([self.defaults.guidance_scale], np.float32)
        return arrays


# DC-AE -------------------------------------------------------------------------------------------------------
def _geometry(model, ranges: BuildRanges) -> tuple[dict, tuple, tuple]:
    """(dims, latents dims, pixel dims (batch, H, W)) shared by the DC-AE encoder and decoder."""
    a = model.adapter
    tok = ranges.token_dims(a)
    dims = {"batch": batch_range(ranges), "h_tok": tok["h_tok"], "w_tok": tok["w_tok"]}
    latent = ("batch", a.latent_channels, scaled(a.patch_size, "h_tok"), scaled(a.patch_size, "w_tok"))
    pixels = ("batch", scaled(a.size_multiple, "h_tok"), scaled(a.size_multiple, "w_tok"))
    return dims, latent, pixels


class SanaVaeEncoder(ImageVaeEncoder):
    """DC-AE encoder (stage "vae_encoder"): pixels in [-1, 1] -> ``latent * scaling_factor``."""

    latents = "DC-AE latent * vae_scaling_factor"

    def __init__(self, model, ranges: BuildRanges):
        self.adapter = model.adapter
        dims, latent, (n, h, w) = _geometry(model, ranges)
        self.spec = ComponentSpec("vae_encoder", (TensorSpec("image", "float32", (n, 3, h, w)),),
                                  (TensorSpec("latents", "float32", latent),), dims, optimize=False,
                                  extra=self.runtime_facts())


class SanaVaeDecoder(ImageVaeDecoder):
    """DC-AE decoder (stage "vae_decoder"): final latents -> uint8 frames, de-normalisation and diffusers'
    pixel post-processing inside the graph."""

    latents = "the denoise step's final next_sample (normalised)"

    def __init__(self, model, ranges: BuildRanges):
        self.adapter = model.adapter
        dims, latent, (n, h, w) = _geometry(model, ranges)
        self.spec = ComponentSpec("vae_decoder", (TensorSpec("latents", "float32", latent),),
                                  (TensorSpec("frames", "uint8", (n, h, w, 3)),), dims,
                                  tolerance=UINT8_TOLERANCE, optimize=False, extra=self.runtime_facts())


def stage_components(model, ranges: BuildRanges, history: int) -> dict[str, Component]:
    """SANA's stages after the planner, in run order (t2i: no encoder)."""
    return {"denoise": SanaDenoise(model, ranges, history), "vae_decoder": SanaVaeDecoder(model, ranges)}
