"""One declaration per exported stage, and everything derived from it.

A `Component` owns a torch module (the exact computation the stage's engine will run) and a `ComponentSpec`:
its tensors with symbolic dims (`runtime.tensor_spec.TensorSpec`, the same class the manifest stores) and the
min/opt/max of each symbol. From that one declaration come torch.export's dynamic shapes, the ONNX input and
output names, dummy and calibration inputs at any profile point, TensorRT profiles, runtime shape checks and
the manifest's engine entry. A formula written twice is a bug waiting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from metacanvas_deploy.mc_export.components.spec_data import ComponentSpec, Tolerance
from metacanvas_deploy.runtime.tensor_spec import TensorSpec

__all__ = ["Component", "ComponentSpec", "Tolerance", "random_tensor"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


def random_tensor(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A generic input: standard normal floats, zeros for integer tensors. Components override inputs whose
    values carry meaning (ids, masks, coefficient tables)."""
    if spec.dtype.startswith("float") or spec.dtype == "bfloat16":
        return rng.standard_normal(shape).astype(np.float32)
    return np.zeros(shape, dtype=spec.dtype)


class Component(ABC):
    """A stage to export: a spec, the module computing it, and meaningful sample inputs."""

    spec: ComponentSpec

    @abstractmethod
    def module(self) -> nn.Module:
        """forward(*inputs in spec order) -> tuple of outputs in spec order (a single tensor for one output)."""

    def sample_inputs(self, which: str = "opt", seed: int = 0,
                      overrides: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """Inputs at a profile point; subclasses replace the ones whose values carry meaning."""
        rng = np.random.default_rng(seed)
        shapes = self.spec.shapes(which, overrides)
        return {t.name: random_tensor(t, shapes[t.name], rng) for t in self.spec.inputs}

    def export_dynamic_shapes(self) -> tuple:
        """torch.export's dynamic shapes in the structure of ``module().forward``'s signature: one entry per
        positional input by default; a module taking ``(x, *caches)`` overrides this to ``(x_dims, (c, ...))``."""
        dyn = self.spec.dynamic_shapes()
        return tuple(dyn[n] for n in self.spec.input_names)

    def torch_inputs(self, arrays: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.ascontiguousarray(arrays[t.name])).to(_TORCH_DTYPES[t.dtype])
                     for t in self.spec.inputs)

    @torch.no_grad()
    def reference(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The PyTorch outputs on the given inputs, by output name."""
        out = self.module()(*self.torch_inputs(arrays))
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o.detach().float().numpy() if o.is_floating_point() else o.numpy()
                for t, o in zip(self.spec.outputs, out)}
