"""The torch-free half of a stage's declaration: `ComponentSpec` (its tensors, symbolic dims and their ranges) and
`Tolerance` (its parity budget). Data only, so that the TensorRT target build (`mc_export.tensorrt.target_build`)
rebuilds a spec from a TensorRT export's JSON on a GPU machine without torch; `components.spec` re-exports both
beside `Component`, which owns the torch module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from metacanvas_deploy.runtime.manifest import EngineEntry
from metacanvas_deploy.runtime.tensor_spec import DimRange, TensorSpec, split_dim


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
        import torch

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
