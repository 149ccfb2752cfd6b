"""The values one request is made of: the resolved `Request`, the planner's `PlannerResult` and the
`GenerationOutput`. Each belongs to one request and is never shared or changed by another, which is part of what
lets one `runtime.pipeline.Pipeline` serve requests from many threads (the backbone's side of the contract,
`RequestContext` and `Prepared`, is in `runtime.backbones.common`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Request:
    """One generation request, with every default resolved."""

    task: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seed: int
    image: Any = None
    video: Any = None
    reference_images: Any = None
    latents: np.ndarray | None = None


@dataclass
class GenerationOutput:
    frames: np.ndarray  # (F, H, W, 3) uint8; F = 1 for images
    latents: np.ndarray  # final latents (the denoise engine's layout)
    prompt_embeds: np.ndarray  # (1, L, D_txt) what the DiT saw for the prompt
    negative_prompt_embeds: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds inside each stage's engine, plus "total"
    calls: dict[str, int] = field(default_factory=dict)  # engine calls per stage (denoise: one per step)
    # step caching (`runtime.step_cache`): steps that ran the transformer blocks (FULL) and steps that reused
    # their residual (CACHED); steps_cached is 0 for a bundle without step caching or with cache="off"
    steps_computed: int = 0
    steps_cached: int = 0


@dataclass(frozen=True)
class PlannerResult:
    prompt_embeds: np.ndarray  # (rows, L, D_txt)
    canvas: np.ndarray  # (rows, T, H, W, D_dit)
    pooled_prompt_embeds: np.ndarray | None
    prompt_mask: np.ndarray  # (rows, L) int64
    rows: int
