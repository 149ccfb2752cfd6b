"""Pieces every backbone's components share: scaled dims, the checked scheduler plan, the uint8 rounding of
decoded frames, VAE batch ranges, and the image VAE stages (FLUX's AutoencoderKL and SANA's DC-AE differ only
in their latent normalisation, which their configs state)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.components.spec import Component, Tolerance
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.runtime.schedulers import SchedulePlan, make_plan
from metacanvas_deploy.runtime.tensor_spec import DimRange

# uint8 frames: ONNX Runtime and torch may round a value within ~1e-6 of a .5 boundary differently: one level,
# max_rel = 1/255 (against max(1, 255)). Two levels anywhere fail.
UINT8_TOLERANCE = Tolerance(max_rel=1.0 / 255, min_cosine=0.99999)


def scaled(k: int, symbol: str) -> str:
    """A dim `k * symbol` in TensorSpec syntax (`"2*h_tok"`; the bare symbol for k = 1)."""
    return symbol if k == 1 else f"{k}*{symbol}"


def scheduler_config(adapter) -> dict:
    """The adapter's diffusers scheduler config as the plain dict `runtime.schedulers.make_plan` reads (and the
    manifest stores): diffusers' bookkeeping keys dropped, the class name kept."""
    cfg = {k: v for k, v in dict(adapter.scheduler.config).items() if not k.startswith("_")}
    cfg["_class_name"] = type(adapter.scheduler).__name__
    return cfg


def checked_plan(config: dict, steps: int, history: int, image_seq_len: int | None = None) -> SchedulePlan:
    """The scheduler's plan (`runtime.schedulers.make_plan`); ConfigError unless it keeps the history K that the
    step graph is built for."""
    plan = make_plan(config, steps, image_seq_len=image_seq_len)
    if plan.history != history:
        raise ConfigError(f"history={history}, but the scheduler's plan keeps history K={plan.history} previous "
                          f"outputs ({config.get('_class_name')}); pass its plan.history")
    return plan


def random_step(plan: SchedulePlan, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`timestep` and `coefficients` of a random step of a real plan, as the runtime feeds them
    (`SchedulePlan.step_feeds`)."""
    return plan.step_feeds(int(rng.integers(plan.num_inference_steps)))


def sample_pixels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A VAE encoder's input as the host makes it: random uint8 RGB values mapped to [-1, 1] in float32."""
    pixels = np.random.default_rng(seed).integers(0, 256, shape).astype(np.float32)
    return pixels / 255 * 2 - 1


def pixels_to_uint8(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, diffusers' VaeImageProcessor rounding
    (half to even, like numpy's round; = `backbones.common.frames_to_uint8`)."""
    x = (decoded / 2 + 0.5).clamp(0, 1) * 255  # (B, 3, H, W)
    return x.round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)


def batch_range(ranges: BuildRanges) -> DimRange:
    """Images per VAE call: up to the planner's image inputs (at least 2); opt = 2 for the reason denoise.ROWS gives."""
    return DimRange(1, 2, max(2, ranges.max_images))


# image VAEs ---------------------------------------------------------------------------------------------------
PIXELS_IN = "RGB uint8 -> Lanczos resize -> x / 255 * 2 - 1, NCHW float32"
FRAMES_OUT = "uint8 (n, H, W, 3) RGB, final: no host post-processing"


def _shift(vae) -> float | None:
    """The VAE's latent shift (AutoencoderKL's ``shift_factor``), None for a VAE without one (DC-AE)."""
    return getattr(vae.config, "shift_factor", None)


class VaeEncode(nn.Module):
    """Pixels in [-1, 1] -> normalised latents ``(z - shift_factor) * scaling_factor`` (no shift when the VAE has
    none): z is the posterior mode of a KL VAE (as diffusers' pipelines take it) or a DC-AE's latent."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        out = self.vae.encode(image)
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent  # (n, C, h, w)
        shift = _shift(self.vae)
        return (z if shift is None else z - shift) * self.vae.config.scaling_factor


class VaeDecode(nn.Module):
    """Normalised latents -> uint8 frames (n, H, W, 3): de-normalised, decoded and rounded like diffusers'
    VaeImageProcessor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        z = latents / self.vae.config.scaling_factor  # (n, C, h, w)
        shift = _shift(self.vae)
        z = z if shift is None else z + shift
        return pixels_to_uint8(self.vae.decode(z, return_dict=False)[0])  # (n, H, W, 3)


def vae_facts(adapter) -> dict:
    """The VAE numbers a runtime needs: its latent normalisation and pixels per latent."""
    vae = adapter.vae.config
    facts = {"vae_scaling_factor": float(vae.scaling_factor)}
    if _shift(adapter.vae) is not None:
        facts["vae_shift_factor"] = float(_shift(adapter.vae))
    return {**facts, "pixels_per_latent": adapter.vae_scale_factor}


class ImageVaeEncoder(Component):
    """Stage "vae_encoder" of an image backbone (`VaeEncode`). Subclasses set ``adapter``, ``latents`` (how the
    output is laid out, for the runtime) and ``spec``."""

    adapter = None
    latents = ""

    def module(self) -> nn.Module:
        return VaeEncode(self.adapter.vae)

    def runtime_facts(self) -> dict:
        return {"backbone": self.adapter.backbone, "image": PIXELS_IN, "latents": self.latents,
                **vae_facts(self.adapter)}

    def sample_inputs(self, which: str = "opt", seed: int = 0,
                      overrides: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """Pixels as the host makes them: uint8 values mapped to [-1, 1]."""
        return {"image": sample_pixels(self.spec.shapes(which, overrides)["image"], seed)}


class ImageVaeDecoder(Component):
    """Stage "vae_decoder" of an image backbone (`VaeDecode`): final latents -> uint8 frames, de-normalisation
    and diffusers' pixel post-processing inside the graph. Subclasses set ``adapter``, ``latents`` and ``spec``."""

    adapter = None
    latents = ""

    def module(self) -> nn.Module:
        return VaeDecode(self.adapter.vae)

    def runtime_facts(self) -> dict:
        return {"backbone": self.adapter.backbone, "latents": self.latents, "frames": FRAMES_OUT,
                **vae_facts(self.adapter)}
