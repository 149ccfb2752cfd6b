"""FLUX.1-Kontext stages: the denoise step (`FluxDenoise`), the VAE encoder of the context image
(`FluxVaeEncoder`) and the VAE decoder (`FluxVaeDecoder`).

How a runtime runs an ``edit`` request with these three engines (numpy only; C = ``latent_channels``, every
number below is in the engine's ``extra``, see `runtime_facts`):

  geometry  height H and width W are multiples of ``size_multiple`` (16 = VAE stride 8 x 2x2 packing);
            h_tok = H / 16, w_tok = W / 16. The context image is resized to (H, W) too (as the reference does),
            so hc_tok = h_tok, wc_tok = w_tok; the graphs accept any other context size in range.
  vae_encoder  ``image`` (n, 3, 16*hc_tok, 16*wc_tok) float32: the RGB uint8 image resized to (W, H) with
            Lanczos (PIL), ``x / 255 * 2 - 1`` in float32, HWC -> CHW. Output ``image_latents``
            (n, C, 2*hc_tok, 2*wc_tok): the posterior mode (mean) normalised as
            ``(mode - vae_shift_factor) * vae_scaling_factor``, unpacked: feed it to the denoise step as is.
  planner   gives ``prompt_embeds`` (rows, L, D_txt), ``pooled_prompt_embeds`` (rows, P) and ``canvas``
            (rows, 1, h_tok, w_tok, D_dit). rows = 2 ([negative, positive]) only when true_cfg_scale > 1, else
            rows = 1 (the positive prompt alone): FLUX.1-Kontext is guidance-distilled.
  plan      ``runtime.schedulers.make_plan(manifest scheduler config, N, image_seq_len=h_tok * w_tok)``
            (FLUX's dynamic shift uses the packed TARGET token count; context tokens are not counted).
  denoise   ``sample`` x_0: standard-normal float32 noise (1, C, 2*h_tok, 2*w_tok), i.e. diffusers'
            ``randn_tensor((1, C, 2h, 2w))`` BEFORE packing (the graph packs and unpacks inside). Step i feeds
            ``timestep`` = [plan.timesteps[i]] and ``coefficients`` = plan.coefficient_array()[i], both float32
            (the graph gives the DiT t / 1000 and the canvas injector t, as the pipeline does);
            ``guidance`` = [guidance_scale] (the distilled guidance embedding, default 2.5);
            ``guidance_scale`` = [true_cfg_scale] (read only when rows = 2; feed [1.0] when rows = 1);
            ``image_latents`` and the planner outputs unchanged every step. ``next_sample`` is x_{i+1}: feed it
            back as ``sample``; after step N - 1 it is the final latents (unpacked).
            Text ids (zeros) and image ids ((0, row, col) target, (1, row, col) context) are computed inside
            the graph from the shapes: the host passes none.
  vae_decoder  ``latents`` (n, C, 2*h_tok, 2*w_tok) = the final ``next_sample``; the graph de-normalises
            (``latents / vae_scaling_factor + vae_shift_factor``), decodes and post-processes exactly like
            diffusers' VaeImageProcessor: ``frames`` (n, H, W, 3) uint8 = round_half_even(clamp(x/2 + 0.5, 0, 1)
            * 255). The runtime does no float post-processing.
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
from metacanvas_deploy.mc_export.models.backbones.flux import PACK, image_ids, pack_latents, unpack_latents
from metacanvas_deploy.runtime.tensor_spec import TensorSpec

TRUE_CFG_SAMPLE = 3.0  # the true-CFG scale sample inputs use when rows = 2 (any value > 1 exercises the branch)


# the denoise step ---------------------------------------------------------------------------------------------
class _FluxStep(StepModule):
    """One Euler (or multistep) step of FluxKontextPipeline's loop, CFG and scheduler update included."""

    def forward(self, sample, prompt_embeds, canvas, timestep, guidance_scale, coefficients, image_latents,
                pooled_prompt_embeds, guidance, last_sample=None, history=None):
        rows = prompt_embeds.shape[0]
        h_tok, w_tok = sample.shape[2] // PACK, sample.shape[3] // PACK
        hc_tok, wc_tok = image_latents.shape[2] // PACK, image_latents.shape[3] // PACK
        x = pack_latents(sample).expand(rows, -1, -1)  # (rows, h*w, 4C)
        context = pack_latents(image_latents).expand(rows, -1, -1)  # (rows, hc*wc, 4C)
        txt_ids = prompt_embeds.new_zeros(prompt_embeds.shape[1], 3)  # (L, 3)
        img_ids = torch.cat([image_ids(h_tok, w_tok, device=sample.device),
                             image_ids(hc_tok, wc_tok, first=1.0, device=sample.device)])  # (N_tgt + N_ctx, 3)
        v = self.adapter.denoise(x, context, timestep.expand(rows), guidance.expand(rows), prompt_embeds,
                                 pooled_prompt_embeds, txt_ids, img_ids, canvas)  # (rows, h*w, 4C)
        v = unpack_latents(cfg_combine(v, guidance_scale), h_tok, w_tok)  # (1, C, 2h, 2w)
        return self.update(coefficients, sample, v, last_sample, history)


class FluxDenoise(ImageDenoise):
    """The FLUX.1-Kontext denoise step (stage "denoise"): module docstring for the runtime's recipe."""

    def __init__(self, model, ranges: BuildRanges, history: int = 0):
        adapter = model.adapter
        if adapter.backbone != "flux":
            raise ConfigError(f"FluxDenoise needs a flux model, got backbone {adapter.backbone!r}")
        if not adapter.transformer.config.guidance_embeds:
            raise ConfigError("FluxDenoise serves guidance-distilled FLUX (guidance_embeds=True) like Kontext-dev")
        super().__init__(model, history, image_seq_len=1)
        cfg, c = model.cfg, adapter.latent_channels
        tok = ranges.token_dims(adapter)
        sample = TensorSpec("sample", "float32", (1, c, scaled(PACK, "h_tok"), scaled(PACK, "w_tok")))
        state_in, outputs = state_specs(sample, history)
        inputs = (*step_inputs(sample, cfg.text_dim, cfg.dit_dim, 1, history),
                  TensorSpec("image_latents", "float32", (1, c, scaled(PACK, "hc_tok"), scaled(PACK, "wc_tok"))),
                  TensorSpec("pooled_prompt_embeds", "float32", ("rows", cfg.pooled_dim)),
                  TensorSpec("guidance", "float32", (1,)),
                  *state_in)
        dims = {**step_dims(ranges), "h_tok": tok["h_tok"], "w_tok": tok["w_tok"], "hc_tok": tok["h_tok"],
                "wc_tok": tok["w_tok"]}
        self.spec = ComponentSpec("denoise", inputs, outputs, dims, extra=self.runtime_facts())

    def module(self) -> nn.Module:
        return _FluxStep(self.adapter)

    def runtime_facts(self) -> dict:
        """What a numpy runtime needs to prepare this stage's inputs (the module docstring says how)."""
        a, vae = self.adapter, self.adapter.vae.config
        return self.step_facts(
            pack=PACK, vae_scale_factor=a.vae_scale_factor, size_multiple=a.size_multiple,
            vae_scaling_factor=float(vae.scaling_factor), vae_shift_factor=float(vae.shift_factor),
            sample_layout="unpacked (1, C, 2*h_tok, 2*w_tok): the initial noise before 2x2 packing",
            plan_image_seq_len="h_tok*w_tok", cfg_rows=["negative", "positive"], cfg_when="true_cfg_scale > 1")

    def sample_inputs(self, which: str = "opt", seed: int = 0,
                      overrides: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """Random latents and text, a real plan step at this resolution, FLUX's default guidance, a true-CFG
        scale > 1 when rows = 2."""
        arrays = super().sample_inputs(which, seed, overrides)
        rng = np.random.default_rng(seed + 1)
        rows, (h2, w2) = arrays["prompt_embeds"].shape[0], arrays["sample"].shape[2:]
        arrays.update(self.plan_step(rng, image_seq_len=(h2 // PACK) * (w2 // PACK)))
        arrays["guidance"] = np.array([self.defaults.guidance_scale], np.float32)
        arrays["guidance_scale"] = np.array([TRUE_CFG_SAMPLE if rows == 2 else 1.0], np.float32)
        return arrays


# the VAE ------------------------------------------------------------------------------------------------------
class FluxVaeEncoder(ImageVaeEncoder):
    """`AutoencoderKL` encoder of the context image (stage "vae_encoder"): pixels in [-1, 1] -> the normalised
    posterior mode, unpacked, exactly what `FluxDenoise` takes as ``image_latents``."""

    latents = "(posterior mode - vae_shift_factor) * vae_scaling_factor, unpacked"

    def __init__(self, model, ranges: BuildRanges):
        self.adapter = model.adapter
        tok, c, px = ranges.token_dims(self.adapter), self.adapter.latent_channels, self.adapter.size_multiple
        image = TensorSpec("image", "float32", ("batch", 3, scaled(px, "hc_tok"), scaled(px, "wc_tok")))
        latents = TensorSpec("image_latents", "float32", ("batch", c, scaled(PACK, "hc_tok"), scaled(PACK, "wc_tok")))
        self.spec = ComponentSpec("vae_encoder", (image,), (latents,),
                                  {"batch": batch_range(ranges), "hc_tok": tok["h_tok"], "wc_tok": tok["w_tok"]},
                                  extra=self.runtime_facts())


class FluxVaeDecoder(ImageVaeDecoder):
    """`AutoencoderKL` decoder (stage "vae_decoder"): final unpacked latents -> uint8 frames, de-normalisation
    and diffusers' pixel post-processing inside the graph."""

    latents = "the denoise step's final next_sample (unpacked, normalised)"

    def __init__(self, model, ranges: BuildRanges):
        self.adapter = model.adapter
        tok, c, px = ranges.token_dims(self.adapter), self.adapter.latent_channels, self.adapter.size_multiple
        latents = TensorSpec("latents", "float32", ("batch", c, scaled(PACK, "h_tok"), scaled(PACK, "w_tok")))
        frames = TensorSpec("frames", "uint8", ("batch", scaled(px, "h_tok"), scaled(px, "w_tok"), 3))
        self.spec = ComponentSpec("vae_decoder", (latents,), (frames,),
                                  {"batch": batch_range(ranges), "h_tok": tok["h_tok"], "w_tok": tok["w_tok"]},
                                  tolerance=UINT8_TOLERANCE, extra=self.runtime_facts())


def stage_components(model, ranges: BuildRanges, history: int) -> dict[str, Component]:
    """FLUX-Kontext's stages after the planner, in run order: the context image's encoder, the step, the decoder."""
    return {"vae_encoder": FluxVaeEncoder(model, ranges), "denoise": FluxDenoise(model, ranges, history),
            "vae_decoder": FluxVaeDecoder(model, ranges)}
