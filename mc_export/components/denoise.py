"""What every denoise-step graph shares: the CFG combine and the scheduler update, folded into the graph so the
runtime's loop is one engine call per step and the latents never leave the engine's memory.

The step graph of every backbone has the same contract with the runtime (`runtime.pipeline`):

    inputs   sample            the scheduler's sample x_i (backbone latent layout, batch 1)
             prompt_embeds     (rows, prompt_tokens, D_txt); rows = 2 is [negative, positive], rows = 1 no CFG
             canvas            (rows, latent_frames, h_tok, w_tok, D_dit) from the planner stage
             timestep          (1,) the scheduler's timestep t_i (0..1000)
             guidance_scale    (1,) CFG scale (ignored when rows = 1)
             coefficients      (3, 3 + K) float32: row i of `runtime.schedulers.SchedulePlan.coefficient_array()`
             last_sample, history   (K > 0 only, UniPC) the multistep state, zeros at step 0
             ...               backbone inputs (condition latents, context image, masks, pooled text)
    outputs  next_sample       x_{i+1} (after the last step: the final latents)
             next_last_sample, next_history   (K > 0 only) the state for step i + 1
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from metacanvas_deploy.mc_export.components.common import checked_plan, random_step, scheduler_config
from metacanvas_deploy.mc_export.components.spec import Component
from metacanvas_deploy.runtime.schedulers import COL_HISTORY, ROW_LAST, ROW_M, ROW_NEXT
from metacanvas_deploy.runtime.tensor_spec import DimRange, TensorSpec

STATE_INPUTS = ("last_sample", "history")
STATE_OUTPUTS = ("next_last_sample", "next_history")
# CFG rows: 1 (one branch) or 2 ([negative, positive]). opt = 2 whatever the defaults: torch.export specialises a
# dim whose example is 1 (the step would then only take rows = 1), and export runs at opt.
ROWS = DimRange(1, 2, 2)


def step_inputs(sample: TensorSpec, text_dim: int, dit_dim: int, frames: int | str, history: int):
    """The inputs every step graph takes first, in this order (the contract above): sample, prompt_embeds,
    canvas, timestep, guidance_scale, coefficients. ``frames`` is the canvas' time dim (1 for images)."""
    return (sample,
            TensorSpec("prompt_embeds", "float32", ("rows", "prompt_tokens", text_dim)),
            TensorSpec("canvas", "float32", ("rows", frames, "h_tok", "w_tok", dit_dim)),
            TensorSpec("timestep", "float32", (1,)),
            TensorSpec("guidance_scale", "float32", (1,)),
            TensorSpec("coefficients", "float32", (3, 3 + history)))


def step_dims(ranges) -> dict[str, DimRange]:
    """The symbols every step graph has besides the token grid: CFG rows and prompt length."""
    return {"rows": ROWS, "prompt_tokens": DimRange(*ranges.prompt_tokens)}


def cfg_combine(output: torch.Tensor, guidance_scale: torch.Tensor) -> torch.Tensor:
    """(rows, ...) -> (1, ...): ``neg + g * (pos - neg)`` as diffusers writes it; with rows = 1 (no CFG) the
    difference is exactly zero, so one graph serves both."""
    neg, pos = output[:1], output[-1:]
    return neg + guidance_scale.reshape(-1, *([1] * (output.dim() - 1))) * (pos - neg)


def scheduler_update(coefficients: torch.Tensor, sample: torch.Tensor, velocity: torch.Tensor,
                     last_sample: torch.Tensor | None = None, history: torch.Tensor | None = None):
    """One step of a `runtime.schedulers.SchedulePlan` in torch: ``outputs = coefficients @ terms``.

    coefficients (3, 3 + K); sample, velocity, last_sample: latent layout; history (K, *latent) with m_{i-1}
    first. Returns (next_sample,) for K = 0 (Euler), else (next_sample, next_last_sample, next_history).
    """
    terms = [sample, velocity]
    k = coefficients.shape[1] - COL_HISTORY
    if k > 0:
        terms += [last_sample, *history.unbind(0)]

    def row(r: int) -> torch.Tensor:
        acc = coefficients[r, 0] * terms[0]
        for j in range(1, len(terms)):
            acc = acc + coefficients[r, j] * terms[j]
        return acc

    x_next = row(ROW_NEXT)
    if k == 0:
        return (x_next,)
    m = row(ROW_M)
    return x_next, row(ROW_LAST), torch.cat([m.unsqueeze(0), history[:-1]], dim=0)


def state_specs(sample: TensorSpec, k: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The multistep state tensors (inputs, outputs) for a scheduler with history K, in sample's layout."""
    out_sample = TensorSpec("next_sample", sample.dtype, sample.dims)
    if k == 0:
        return (), (out_sample,)
    last = TensorSpec("last_sample", sample.dtype, sample.dims)
    hist = TensorSpec("history", sample.dtype, (k, *sample.dims))
    return (last, hist), (out_sample, TensorSpec("next_last_sample", sample.dtype, sample.dims),
                          TensorSpec("next_history", sample.dtype, (k, *sample.dims)))


class StepModule(nn.Module):
    """Base of every backbone's step graph: holds the adapter (whose methods compute the step) and registers the
    weights it uses, the DiT and the canvas injector; `update` ends every step the same way."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter  # plain attribute: its modules are registered below
        self.transformer, self.injector = adapter.transformer, adapter.injector

    @staticmethod
    def update(coefficients: torch.Tensor, sample: torch.Tensor, velocity: torch.Tensor,
               last_sample: torch.Tensor | None = None, history: torch.Tensor | None = None):
        """`scheduler_update` on the CFG-combined velocity: the outputs in spec order, a lone tensor for K = 0."""
        out = scheduler_update(coefficients, sample, velocity, last_sample, history)
        return out if len(out) > 1 else out[0]


class ImageDenoise(Component):
    """What the image backbones' step components share (FLUX, SANA): the adapter, the scheduler config as the
    manifest stores it, the history check, the runtime facts every step has and a real plan step for sample
    inputs. Subclasses declare the spec and their own facts."""

    def __init__(self, model, history: int, image_seq_len: int | None = None):
        self.adapter, self.defaults, self.history = model.adapter, model.defaults, history
        self.config = scheduler_config(self.adapter)
        self.plan(image_seq_len)  # ConfigError unless history is the K of the scheduler's plan

    def plan(self, image_seq_len: int | None = None):
        """The plan at the preset's default step count (`checked_plan`)."""
        return checked_plan(self.config, self.defaults.num_inference_steps, self.history, image_seq_len)

    def step_facts(self, **facts) -> dict:
        """The runtime facts of this step: the shared ones around the backbone's own ``facts``."""
        a = self.adapter
        return {"backbone": a.backbone, "latent_channels": a.latent_channels, **facts,
                "guidance_default": float(self.defaults.guidance_scale), "timestep": "plan.timesteps[i] (0..1000)",
                "history": self.history}

    def plan_step(self, rng: np.random.Generator, image_seq_len: int | None = None) -> dict[str, np.ndarray]:
        """``timestep`` and ``coefficients`` of a random step of the plan, as the runtime feeds them."""
        return random_step(self.plan(image_seq_len), rng)
