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
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from metacanvas_deploy.runtime.manifest import EngineEntry
from metacanvas_deploy.runtime.tensor_spec import DimRange, TensorSpec, split_dim

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


@dataclass(frozen=True)
class Tolerance:
    """A stage's parity budget against its PyTorch reference (fp32 export): every output must reach both.

    ``max_rel``: max |ours - ref| / max(1, max |ref|); ``min_cosine``: cosine similarity of the flattened outputs.
    """

    max_rel: float = 1e-4
    min_cosine: float = 0.99999


@dataclass(frozen=True)
class ComponentSpec:
    """The tensors of one stage, with symbolic dims and their ranges. Names are identical in torch, ONNX,
    engines, the manifest and the runtime."""

    stage: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping[str, DimRange]
    tolerance: Tolerance = Tolerance()
    # onnxscript's optimizer folds `x + 1e-15` into `x` (an all-zero linear-attention row then gives NaN,
    # tests/test_component_sana.py): off for linear attention graphs.
    optimize: bool = True
    extra: Mapping = field(default_factory=dict)  # stage facts the runtime needs (opaque JSON)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def shapes(self, which: str = "opt", overrides: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
        """Every input's concrete shape at a profile point, with some symbols pinned by ``overrides``."""
        ranges = dict(self.dims)
        for sym, v in (overrides or {}).items():
            ranges[sym] = DimRange(v, v, v)
        return {t.name: t.shape_at(ranges, which) for t in self.inputs}

    def dynamic_shapes(self) -> dict[str, dict[int, object]]:
        """torch.export dynamic shapes: one `Dim` per symbol, `k * Dim` for scaled dims; fixed (size-1 or pinned)
        symbols stay static."""
        dims = {s: torch.export.Dim(s, min=r.min, max=r.max) for s, r in self.dims.items() if r.min < r.max}
        out: dict[str, dict[int, object]] = {}
        for t in self.inputs:
            axes = {}
            for axis, d in enumerate(t.dims):
                if isinstance(d, str):
                    k, sym = split_dim(d)
                    if sym in dims:
                        axes[axis] = dims[sym] if k == 1 else k * dims[sym]
            out[t.name] = axes
        return out

    def engine_entry(self, file: str, backend: str, backend_version: str, precision: str,
                     external_data: tuple[str, ...] = (), device: dict | None = None) -> EngineEntry:
        """The manifest entry of this stage's engine (hashes are filled in by `runtime.bundle.write_bundle`)."""
        return EngineEntry(stage=self.stage, file=file, backend=backend, backend_version=backend_version,
                           precision=precision, inputs=self.inputs, outputs=self.outputs,
                           dims_ranges={k: v.to_dict() for k, v in self.dims.items()},
                           external_data=external_data, device=device, extra=dict(self.extra))


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
