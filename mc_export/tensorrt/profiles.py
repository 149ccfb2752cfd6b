"""TensorRT optimisation profiles, derived from a component's spec and nothing else.

A profile gives every engine input a (min, opt, max) shape. Each comes from the spec's `DimRange` symbols through
`ComponentSpec.shapes`, the same formula the runtime binds a request with (`runtime.backbones.common.shape_of`),
so an engine accepts exactly the shapes the manifest promises. A static engine (the CUDA-graph case) pins every
symbol: min == opt == max, and the manifest entry must then carry the pinned ranges (`pinned_dims`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from metacanvas_deploy.mc_export.components.spec_data import ComponentSpec
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.runtime.tensor_spec import DimRange

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]  # (min, opt, max)


def pinned_dims(spec: ComponentSpec, static: Mapping[str, int]) -> dict[str, DimRange]:
    """Every symbol of ``spec`` pinned to one value: ``static[symbol]`` where given, else the symbol's opt.
    ConfigError for an unknown symbol or a value outside the symbol's range."""
    unknown = sorted(set(static) - set(spec.dims))
    if unknown:
        raise ConfigError(f"stage {spec.stage!r} has no dim {unknown[0]!r} to pin; its dims are "
                          f"{', '.join(sorted(spec.dims))}")
    pinned = {}
    for sym, r in spec.dims.items():
        v = int(static.get(sym, r.opt))
        if not r.min <= v <= r.max:
            raise ConfigError(f"stage {spec.stage!r}: cannot pin {sym}={v}, the build covers {r.min}..{r.max}")
        pinned[sym] = DimRange(v, v, v)
    return pinned


def profile_shapes(spec: ComponentSpec, static: Mapping[str, int] | None = None) -> dict[str, Profile]:
    """Input name -> (min, opt, max) shape of the engine's one optimisation profile. With ``static`` (even
    empty) every symbol is pinned (`pinned_dims`) and min == opt == max."""
    if static is not None:
        spec = dataclasses.replace(spec, dims=pinned_dims(spec, static))
    lo, opt, hi = (spec.shapes(which) for which in ("min", "opt", "max"))
    return {name: (lo[name], opt[name], hi[name]) for name in spec.input_names}
