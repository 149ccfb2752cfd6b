"""Pieces every backbone's components share: scaled dims, real plan rows for sample inputs, the uint8 rounding
of decoded frames, CFG rows and VAE batch ranges."""

from __future__ import annotations

import numpy as np
import torch

from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.components.spec import Tolerance
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.runtime.schedulers import make_plan
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


def plan_row(config: dict, steps: int, rng: np.random.Generator, history: int,
             image_seq_len: int | None = None) -> dict[str, np.ndarray]:
    """`timestep` (1,) and `coefficients` (3, 3 + K) of a random step of a real plan, as the runtime feeds them."""
    plan = make_plan(config, steps, image_seq_len=image_seq_len)
    if plan.history != history:
        raise ConfigError(f"the scheduler's plan keeps history K={plan.history}, the component was built for "
                          f"K={history}")
    i = int(rng.integers(plan.num_inference_steps))
    return {"timestep": np.array([plan.timesteps[i]], np.float32),
            "coefficients": plan.coefficient_array()[i].astype(np.float32)}


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
