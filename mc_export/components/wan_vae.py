"""Wan's VAE as four streaming stages (`mc_export.export.wan_vae_stream`): the first chunk and every later chunk,
for the decoder and the encoder. Each later-chunk graph takes the previous call's caches (`past.*`) and returns
the next ones (`present.*`), so one pair of graphs serves any frame count with bounded memory.

Host-side recipe (runtime.backbones.wan), batch 1, latent grid h = 2*h_tok, w = 2*w_tok:
    decode   z = latents / (1 / latents_std) + latents_mean (per channel); `vae_decoder_first` on z[:, :, :1]
             gives 1 frame and the caches; `vae_decoder` on each next latent frame with the caches gives 4 more.
             Frames are in [-1, 1]: uint8 = round_half_even(clip(x / 2 + 0.5, 0, 1) * 255), as diffusers.
    encode   pixels (1, 3, F, H, W) in [-1, 1], F = 4k + 1: `vae_encoder_first` on frame 0, then `vae_encoder`
             on each next 4 frames with the caches; concatenate the latent frames (the posterior mode).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from metacanvas_deploy.mc_export.components.common import scaled
from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.components.spec import Component, ComponentSpec, Tolerance
from metacanvas_deploy.mc_export.export.wan_vae_stream import CHUNK_FRAMES, WanStreamingDecoder, WanStreamingEncoder
from metacanvas_deploy.runtime.tensor_spec import TensorSpec


class WanVaeStage(Component):
    """One of "vae_decoder_first", "vae_decoder", "vae_encoder_first", "vae_encoder"."""

    def __init__(self, model, ranges: BuildRanges, part: str, first: bool):
        vae = model.vae
        self._module = (WanStreamingDecoder if part == "decoder" else WanStreamingEncoder)(vae).eval()
        self.first = first
        token = model.adapter.patch[1]  # latent rows per DiT token row
        spatial = self._module.spatial  # pixels per latent row
        dims = {k: v for k, v in ranges.token_dims(model.adapter).items() if k in ("h_tok", "w_tok")}
        lat = (1, vae.config.z_dim, 1, scaled(token, "h_tok"), scaled(token, "w_tok"))
        frames = 1 if (first or part == "decoder") else CHUNK_FRAMES
        pix_frames = (1 if first else CHUNK_FRAMES) if part == "decoder" else frames
        pix = (1, 3, pix_frames, scaled(token * spatial, "h_tok"), scaled(token * spatial, "w_tok"))
        caches = [(s, (1, s.channels, s.frames, scaled(token * s.factor, "h_tok"), scaled(token * s.factor, "w_tok")))
                  for s in self._module.slots]
        x_name, y_name = self._module.input_name, self._module.output_name
        x_dims, y_dims = (lat, pix) if part == "decoder" else (pix, lat)
        inputs = [TensorSpec(x_name, "float32", x_dims)]
        if not first:
            inputs += [TensorSpec(s.input_name, "float32", d) for s, d in caches]
        outputs = [TensorSpec(y_name, "float32", y_dims)] + [TensorSpec(s.output_name, "float32", d) for s, d in caches]
        stage = f"vae_{part}" + ("_first" if first else "")
        # ~30 conv layers in fp32 with another summation order: 1e-4 of the output scale (measured <= 3e-6).
        self.spec = ComponentSpec(stage, tuple(inputs), tuple(outputs), dims, Tolerance(max_rel=1e-4),
                                  extra={"chunk_frames": CHUNK_FRAMES, "caches": [s.name for s in self._module.slots]})

    def module(self) -> nn.Module:
        return self._module

    def export_dynamic_shapes(self) -> tuple:
        dyn = self.spec.dynamic_shapes()
        names = self.spec.input_names
        if self.first:
            return (dyn[names[0]],)
        return (dyn[names[0]], tuple(dyn[n] for n in names[1:]))

    def sample_inputs(self, which: str = "opt", seed: int = 0, overrides=None) -> dict[str, np.ndarray]:
        """Pixels in [-1, 1] for the encoder; caches of the right scale (small normal values)."""
        arrays = super().sample_inputs(which, seed, overrides)
        if self._module.input_name == "video":
            rng = np.random.default_rng(seed)
            arrays["video"] = rng.uniform(-1, 1, arrays["video"].shape).astype(np.float32)
        return arrays


def wan_vae_stages(model, ranges: BuildRanges, encoder: bool) -> dict[str, Component]:
    """The decoder pair, and the encoder pair when a task encodes images or video."""
    stages = {}
    if encoder:
        stages["vae_encoder_first"] = WanVaeStage(model, ranges, "encoder", first=True)
        stages["vae_encoder"] = WanVaeStage(model, ranges, "encoder", first=False)
    stages["vae_decoder_first"] = WanVaeStage(model, ranges, "decoder", first=True)
    stages["vae_decoder"] = WanVaeStage(model, ranges, "decoder", first=False)
    return stages
