"""Compiled step caching (MagCache, arXiv 2506.09045): the two step graphs of every backbone, made from its one
denoise component.

FULL (stage ``denoise``) is the backbone's step as it is, plus one output: ``residual``, what the transformer blocks
added to the noisy target tokens' hidden states (the last block's output minus the first block's input), one slot
per CFG row, laid out like the canvas: (rows, latent_frames, h_tok, w_tok, D_dit).

CACHED (stage ``denoise_cached``) is the same step with every block removed: patch embedding and canvas injection,
then the stored ``residual`` (an extra input) added where the blocks would have run, then the output head, CFG
combine and scheduler update, as in FULL. Fed FULL's residual for the same inputs, its outputs equal FULL's up to
float rounding: the head then sees ``x + (y - x)`` instead of ``y``, one rounding of the hidden state (a few ulp,
the stage's tolerance covers it; `cache_gate`).

What is model-specific is data, `CacheLayout`, in the backbone's record (`mc_export.backbones`): which block lists
to skip, which module is the head, and where the target tokens sit in the DiT's sequence (FLUX-Kontext appends its
context image after them, Wan prepends r2v reference frames: only the target tokens' outputs are kept, so the
residual covers them alone). The shared mechanism here never branches on a backbone name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metacanvas_deploy.mc_export.components.spec import Component
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.runtime.tensor_spec import TensorSpec

FULL_STAGE, CACHED_STAGE, RESIDUAL = "denoise", "denoise_cached", "residual"


@dataclass(frozen=True)
class CacheLayout:
    """Where a backbone's DiT keeps what step caching skips (one per backbone, in `mc_export.backbones`)."""

    blocks: tuple[str, ...]  # the transformer's block lists (nn.ModuleList attributes), in run order
    head: str = "norm_out"  # the module whose first positional input is the last block's output (image stream)
    hidden: str = "hidden_states"  # the first block's keyword for that stream (else its first positional input)
    target: str = "first"  # where the target tokens sit in the sequence: "first" or "last" (after references)

    def __post_init__(self):
        if not self.blocks or self.target not in ("first", "last"):
            raise ConfigError(f"CacheLayout needs block lists and target 'first' or 'last', got {self}")


def _target(hidden: torch.Tensor, tokens: int, where: str) -> torch.Tensor:
    """The target tokens of a (rows, N, D) sequence: (rows, tokens, D)."""
    return hidden[:, :tokens] if where == "first" else hidden[:, hidden.shape[1] - tokens:]


@contextlib.contextmanager
def recording(transformer: nn.Module, layout: CacheLayout):
    """While the block runs: ``seen["in"]`` is the first block's image-stream input, ``seen["out"]`` the head's."""
    seen: dict[str, torch.Tensor] = {}

    def first(module, args, kwargs):
        seen.setdefault("in", kwargs[layout.hidden] if layout.hidden in kwargs else args[0])

    def head(module, args):
        seen["out"] = args[0]

    hooks = [getattr(transformer, layout.blocks[0])[0].register_forward_pre_hook(first, with_kwargs=True),
             getattr(transformer, layout.head).register_forward_pre_hook(head)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def adding(transformer: nn.Module, layout: CacheLayout, residual: torch.Tensor):
    """While the block runs, the head's input gets ``residual`` (rows, T, h, w, D) added on the target tokens."""

    def head(module, args):
        hidden = args[0]  # (rows, N, D)
        rows, d = residual.shape[0], residual.shape[-1]
        res = residual.reshape(rows, -1, d).to(hidden.dtype)  # (rows, T*h*w, D)
        n, total = res.shape[1], hidden.shape[1]
        if layout.target == "first":
            hidden = torch.cat([hidden[:, :n] + res, hidden[:, n:]], dim=1)
        else:
            hidden = torch.cat([hidden[:, : total - n], hidden[:, total - n:] + res], dim=1)
        return (hidden, *args[1:])

    handle = getattr(transformer, layout.head).register_forward_pre_hook(head)
    try:
        yield
    finally:
        handle.remove()


def without_blocks(step: nn.Module, layout: CacheLayout) -> nn.Module:
    """A shallow copy of a step module whose transformer has empty block lists: it shares every other weight (and
    their names) with ``step``, and its blocks' weights are not part of it, so the CACHED graph holds none."""
    transformer = copy.copy(step.transformer)
    transformer._modules = dict(transformer._modules)
    for name in layout.blocks:
        transformer._modules[name] = nn.ModuleList()
    adapter = copy.copy(step.adapter)
    adapter.transformer = transformer
    out = copy.copy(step)
    out._modules = {**step._modules, "transformer": transformer}
    out.__dict__["adapter"] = adapter  # a plain attribute, as `StepModule` keeps it
    return out


class _Wrapped(nn.Module):
    """A step module's children registered under their own names (weight names unchanged), the step kept as a plain
    attribute; subclasses' forward runs it inside a hook context."""

    def __init__(self, step: nn.Module, layout: CacheLayout, canvas_index: int):
        super().__init__()
        for name, child in step.named_children():
            self.add_module(name, child)
        self.__dict__["_step"] = step
        self.layout, self.canvas_index = layout, canvas_index

    @classmethod
    def signed(cls, names: tuple[str, ...], *args) -> nn.Module:
        """An instance whose forward's signature names its inputs (torch.export binds example inputs to it)."""
        param = inspect.Parameter

        def forward(self, *inputs):
            return cls.forward(self, *inputs)

        forward.__signature__ = inspect.Signature([param(n, param.POSITIONAL_OR_KEYWORD) for n in ("self", *names)])
        return type(cls.__name__, (cls,), {"forward": forward})(*args)


class _FullModule(_Wrapped):
    def forward(self, *inputs):
        canvas = inputs[self.canvas_index]  # (rows, T, h, w, D)
        with recording(self._step.transformer, self.layout) as seen:
            out = self._step(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        tokens = canvas.shape[1] * canvas.shape[2] * canvas.shape[3]
        delta = _target(seen["out"], tokens, self.layout.target) - _target(seen["in"], tokens, self.layout.target)
        return (*out, delta.reshape(canvas.shape).float())  # (rows, T, h, w, D)


class _CachedModule(_Wrapped):
    def forward(self, *inputs):
        with adding(self._step.transformer, self.layout, inputs[-1]):
            return self._step(*inputs[:-1])


def _residual_spec(base: Component) -> TensorSpec:
    canvas = next(t for t in base.spec.inputs if t.name == "canvas")
    return TensorSpec(RESIDUAL, "float32", canvas.dims)


class FullStep(Component):
    """Stage ``denoise`` of a cached bundle: ``base``'s step, also writing the blocks' residual."""

    def __init__(self, base: Component, layout: CacheLayout):
        self.base, self.layout = base, layout
        spec = base.spec
        self.spec = dataclasses.replace(spec, outputs=(*spec.outputs, _residual_spec(base)),
                                        extra={**spec.extra, "step_cache": "full"})
        self._module = None

    def module(self) -> nn.Module:
        if self._module is None:
            names = tuple(self.base.spec.input_names)
            self._module = _FullModule.signed(names, self.base.module(), self.layout, names.index("canvas")).eval()
        return self._module

    def sample_inputs(self, which: str = "opt", seed: int = 0,
                      overrides: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        return self.base.sample_inputs(which, seed, overrides)


class CachedStep(Component):
    """Stage ``denoise_cached``: ``base``'s step with the blocks replaced by the stored residual (an input)."""

    def __init__(self, base: Component, layout: CacheLayout):
        self.base, self.layout = base, layout
        spec = base.spec
        self.spec = dataclasses.replace(spec, stage=CACHED_STAGE, inputs=(*spec.inputs, _residual_spec(base)),
                                        extra={**spec.extra, "step_cache": "cached"})
        self._module = None

    def module(self) -> nn.Module:
        if self._module is None:
            names = (*self.base.spec.input_names, RESIDUAL)
            step = without_blocks(self.base.module(), self.layout)
            self._module = _CachedModule.signed(names, step, self.layout, names.index("canvas")).eval()
        return self._module

    def sample_inputs(self, which: str = "opt", seed: int = 0,
                      overrides: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """``base``'s inputs and a random residual of the canvas' shape."""
        arrays = self.base.sample_inputs(which, seed, overrides)
        rng = np.random.default_rng(seed + 7)
        arrays[RESIDUAL] = rng.standard_normal(arrays["canvas"].shape).astype(np.float32)
        return arrays


def cache_stages(stages: dict[str, Component], layout: CacheLayout) -> dict[str, Component]:
    """A bundle's stages with ``denoise`` replaced by FULL and CACHED (in that order, where it stood)."""
    out: dict[str, Component] = {}
    for name, comp in stages.items():
        if name == FULL_STAGE:
            out[FULL_STAGE], out[CACHED_STAGE] = FullStep(comp, layout), CachedStep(comp, layout)
        else:
            out[name] = comp
    return out
