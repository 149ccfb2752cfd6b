"""The Wan denoise step: one ONNX graph per build serving t2v, i2v, v2v and r2v (stage "denoise").

One call is one scheduler step (`mc_export.components.denoise` has the contract every backbone shares): the
graph assembles the DiT input from the target latents and the request's clean latents, runs the DiT with the
canvas injector on both CFG rows at once, keeps the target frames' velocity, combines CFG and applies the UniPC
update with the step's precomputed coefficients. Every tensor is float32. Wan-specific inputs (C latent
channels, T = latent_frames, h = 2*h_tok and w = 2*w_tok latent rows/columns, R = ref_frames):

    clean          (1, C, T, h, w)   clean latents pinned into the model input where clean_mask is 1
    clean_mask     (T,)              1.0 on pinned target frames (clean, timestep 0), else 0.0
    reference      (1, C, R, h, w)   r2v's clean reference latents, prepended along time (timestep 0, no canvas,
                                     their velocity dropped); R = 0 (an empty tensor) for the other tasks.
                                     Absent when the build serves no r2v (`runtime_facts()["references"]`).
    condition      (1, C+1, T, h, w) [condition latents | mask] of the TARGET frames; absent when the
                                     checkpoint has condition_channels = 0. The reference frames' condition is
                                     always [zeros | ones] (DESIGN: "condition zeros, mask 1 on them") and is
                                     built in the graph: a dim cannot be "R + T" in a tensor spec (nor in
                                     torch.export), so no input spans both.

Inside the graph (`WanAdapter.sample`'s computation, through the adapter's own methods):
    x      = clean_mask * clean + (1 - clean_mask) * sample        per frame; exact for masks in {0, 1}
    x      = WanAdapter.model_input(x, prefix=reference, condition=[[0 | 1] on the R frames | condition])
    t_tok  = WanAdapter.token_timesteps(timestep, frame factors [0] * R + (1 - clean_mask))   (rows, N tokens)
    v      = DiT(x on `rows` rows, t_tok, prompt_embeds, canvas hook(canvas, t_tok[:, -1], R))[:, :, R:]
    next_* = scheduler_update(coefficients, sample, cfg_combine(v, guidance_scale), last_sample, history)

Host-side recipe (numpy). Latents are the VAE encoder stage's posterior mode z, normalised per channel as
``(z - latents_mean) * (1 / latents_std)`` in float32 (as `WanAdapter.encode`; both vectors in `runtime_facts()`);
T = (num_frames - 1) // vae_stride_temporal + 1, h = height / vae_stride_spatial, w = width / vae_stride_spatial.
  once per request
    plan            `runtime.schedulers.make_plan(scheduler_config, N)`; K = plan.history (2 for Wan's UniPC)
    prompt_embeds   the planner's output: rows = 2 [negative, positive] when guidance_scale > 1, else rows = 1
                    [positive] (the graph's CFG then returns the positive row exactly)
    canvas          the planner's output (rows, T, h_tok, w_tok, D_dit), the same rows
    guidance_scale  [g] (read only when rows = 2)
    t2v             clean = zeros, clean_mask = zeros(T), reference = zeros (1, C, 0, h, w), condition = zeros
    i2v             clean = zeros except clean[:, :, 0] = the image's latent (the image encoded as a one-frame
                    video), clean_mask = [1, 0, ..., 0], reference empty, condition = zeros
    v2v             clean = zeros, clean_mask = zeros(T), reference empty,
                    condition = concat([the source video's latents (1, C, T, h, w), ones (1, 1, T, h, w)], axis 1)
    r2v             clean = zeros, clean_mask = zeros(T), condition = zeros, reference = the R reference
                    images' latents (each encoded as a one-frame video) stacked along time in order: (1, C, R, h, w)
    (clean must be finite even where clean_mask is 0: 0 * NaN is NaN.)
  step i = 0 .. N-1
    sample          i = 0: standard normal noise (1, C, T, h, w); then the previous call's next_sample
    timestep        [plan.timesteps[i]]
    coefficients    plan.coefficient_array()[i] as float32, (3, 3 + K)
    last_sample, history   i = 0: zeros (1, C, T, h, w) and (K, 1, C, T, h, w); then the previous call's
                    next_last_sample and next_history
  after the last step
    latents = clean_mask * clean + (1 - clean_mask) * next_sample (i2v: frame 0 becomes the clean image latent
    again, as the adapter returns it; a no-op for the other tasks), then latents / (1 / latents_std) +
    latents_mean into the VAE decoder (`WanAdapter.decode`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from metacanvas_deploy.mc_export.components.common import checked_plan, scheduler_config
from metacanvas_deploy.mc_export.components.denoise import (
    StepModule,
    cfg_combine,
    state_specs,
    step_dims,
    step_inputs,
)
from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.components.spec import Component, ComponentSpec
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.models.backbones.base import CanvasCall
from metacanvas_deploy.mc_export.models.backbones.wan import WanAdapter, WanRequest
from metacanvas_deploy.runtime.tensor_spec import DimRange, TensorSpec

GUIDANCE_SCALE = 5.0  # Wan2.2's default CFG scale: what sample inputs use


class WanStep(StepModule):
    """The exported computation; shares the model's DiT and injector (the canvas hook calls the injector)."""

    def __init__(self, adapter: WanAdapter, input_names: tuple[str, ...]):
        super().__init__(adapter)
        self.input_names = input_names

    @classmethod
    def signed(cls, adapter: WanAdapter, input_names: tuple[str, ...]) -> WanStep:
        """An instance whose forward's signature names its inputs: torch.export binds example inputs to the
        signature, and which inputs exist depends on the build (history K, condition channels, r2v)."""
        param = inspect.Parameter
        names = ("self", *input_names)

        def forward(self, *inputs):
            return cls.forward(self, *inputs)

        forward.__signature__ = inspect.Signature([param(n, param.POSITIONAL_OR_KEYWORD) for n in names])
        return type(cls.__name__, (cls,), {"forward": forward})(adapter, input_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = dict(zip(self.input_names, inputs))
        sample, embeds = a["sample"], a["prompt_embeds"]  # (1, C, T, h, w), (rows, L, D_txt)
        adapter, p = self.adapter, self.adapter.patch[1]
        mask = a["clean_mask"].view(1, 1, -1, 1, 1)  # (1, 1, T, 1, 1)
        x = mask * a["clean"] + (1 - mask) * sample  # (1, C, T, h, w): clean frames pinned
        frame_noise = 1 - a["clean_mask"]  # (T,)
        reference, condition = a.get("reference"), a.get("condition")
        if reference is not None:  # (1, C, R, h, w), R may be 0
            frame_noise = torch.cat([torch.zeros_like(reference[0, 0, :, 0, 0]), frame_noise])  # (R+T,)
            if condition is not None:  # the references' condition: zero latents, mask 1 (WanAdapter._condition)
                ref_condition = torch.cat([torch.zeros_like(reference), torch.ones_like(reference[:, :1])], 1)
                condition = torch.cat([ref_condition, condition], dim=2)  # (1, C+1, R+T, h, w)
        request = WanRequest(prefix=reference, first_frame=None, condition=condition, frame_noise=frame_noise)
        rows, r = embeds.shape[0], request.reference_frames
        x = adapter.model_input(x, request)  # (1, C_in, R+T, h, w)
        x = x.expand(rows, -1, -1, -1, -1)  # (rows, C_in, R+T, h, w): both CFG rows see the same latents
        h_tok, w_tok = sample.shape[3] // p, sample.shape[4] // p
        timestep = adapter.token_timesteps(a["timestep"], request, rows, h_tok, w_tok)  # (rows, (R+T)*H*W)
        call = CanvasCall(a["canvas"], adapter.injector_timestep(timestep), r)
        velocity = adapter.denoise(x, timestep, embeds, call)[:, :, r:]  # (rows, C, T, h, w)
        velocity = cfg_combine(velocity, a["guidance_scale"])  # (1, C, T, h, w)
        return self.update(a["coefficients"], sample, velocity, a.get("last_sample"), a.get("history"))


class WanDenoise(Component):
    """Stage "denoise" for the Wan backbone: one UniPC step of any Wan task (see the module docstring)."""

    def __init__(self, model, ranges: BuildRanges, history: int):
        adapter, cfg = model.adapter, model.cfg
        if not isinstance(adapter, WanAdapter):
            raise ConfigError(f"WanDenoise needs a wan MetaCanvas, got backbone {cfg.backbone!r}")
        # the plan whose rows sample inputs use; its history must be the graph's K
        self.plan = checked_plan(scheduler_config(adapter), model.defaults.num_inference_steps, history)
        self.model, self.adapter, self.history = model, adapter, history
        c, p = adapter.latent_channels, adapter.patch[1]
        latent = (1, c, "latent_frames", f"{p}*h_tok", f"{p}*w_tok")
        dims = {**step_dims(ranges), **ranges.token_dims(adapter)}
        sample = TensorSpec("sample", "float32", latent)
        state_in, outputs = state_specs(sample, history)
        inputs = [*step_inputs(sample, cfg.text_dim, cfg.dit_dim, "latent_frames", history),
                  *state_in,
                  TensorSpec("clean", "float32", latent),
                  TensorSpec("clean_mask", "float32", ("latent_frames",))]
        self.references = "r2v" in cfg.tasks and ranges.max_reference_frames > 0
        if self.references:
            # One graph for R = 0 (t2v, i2v, v2v) and R > 0 (r2v): Concat with an empty tensor is legal ONNX.
            # torch.export specialises a dim whose example is 0 or 1, so the export example (opt) is R = max,
            # and max is at least 2 (a build asking for 1 gets an engine that also accepts 2).
            r_max = max(2, ranges.max_reference_frames)
            dims["ref_frames"] = DimRange(0, r_max, r_max)
            inputs.append(TensorSpec("reference", "float32", (1, c, "ref_frames", f"{p}*h_tok", f"{p}*w_tok")))
        if cfg.condition_channels:
            inputs.append(TensorSpec("condition", "float32", (1, cfg.condition_channels, *latent[2:])))
        self.spec = ComponentSpec("denoise", tuple(inputs), outputs, dims, extra=self.runtime_facts())
        self._module = WanStep.signed(adapter, tuple(self.spec.input_names)).eval()

    def module(self) -> nn.Module:
        return self._module

    def runtime_facts(self) -> dict:
        """What a numpy runtime needs to prepare this stage's inputs (the manifest's engine `extra`)."""
        a, vae = self.adapter, self.adapter.vae.config
        return {"latent_channels": a.latent_channels, "condition_channels": self.model.cfg.condition_channels,
                "latents_mean": [float(v) for v in vae.latents_mean],
                "latents_std": [float(v) for v in vae.latents_std],
                "vae_stride_temporal": a.stride_t, "vae_stride_spatial": a.stride_s, "patch_size": a.patch[1],
                "history": self.history, "tasks": list(self.model.cfg.tasks), "references": self.references,
                "cfg_rows": ["negative", "positive"]}

    def sample_inputs(self, which: str = "opt", seed: int = 0, overrides: Mapping[str, int] | None = None,
                      task: str | None = None) -> dict[str, np.ndarray]:
        """A real step: coefficients and timestep from one row of the build's UniPC plan (step index by seed),
        multistep state, masks and condition laid out for ``task`` (default: r2v when the shape has reference
        frames, else i2v, v2v or t2v by seed). A task other than r2v pins ref_frames to 0."""
        if task not in (None, "r2v") and self.references:
            overrides = {**(overrides or {}), "ref_frames": 0}
        arrays = super().sample_inputs(which, seed, overrides)
        rng = np.random.default_rng(seed + 1)
        r = arrays["reference"].shape[2] if self.references else 0
        tasks = [t for t in ("i2v", "v2v", "t2v") if t in self.model.cfg.tasks]
        task = task or ("r2v" if r else tasks[seed % len(tasks)])
        plan = self.plan
        arrays.update(plan.step_feeds(int(rng.integers(plan.num_inference_steps))))
        arrays["guidance_scale"] = np.array([GUIDANCE_SCALE], np.float32)
        t = arrays["clean_mask"].shape[0]
        arrays["clean_mask"] = np.zeros(t, np.float32)
        if task == "i2v":
            arrays["clean_mask"][0] = 1.0
        else:
            arrays["clean"] = np.zeros_like(arrays["clean"])
        if "condition" in arrays:
            cond = np.zeros_like(arrays["condition"])
            if task == "v2v":
                cond[:, :-1] = arrays["condition"][:, :-1]
                cond[:, -1] = 1.0
            arrays["condition"] = cond
        return arrays


def stage_components(model, ranges: BuildRanges, history: int) -> dict[str, Component]:
    """Wan's stages after the planner, in run order: VAE encoder pair (i2v/v2v/r2v inputs), the step, the VAE
    decoder pair."""
    from metacanvas_deploy.mc_export.components.wan_vae import wan_vae_stages

    encodes = bool({"i2v", "v2v", "r2v"} & set(model.cfg.tasks))
    vae = wan_vae_stages(model, ranges, encoder=encodes)
    stages = {k: v for k, v in vae.items() if k.startswith("vae_encoder")}
    stages["denoise"] = WanDenoise(model, ranges, history)
    stages.update({k: v for k, v in vae.items() if k.startswith("vae_decoder")})
    return stages
