"""One tensor's declaration (`TensorSpec`) and the min/opt/max of its symbolic dims (`DimRange`).

A tensor is declared once with symbolic dims (`batch`, `latent_frames`, `prompt_tokens`, `canvas_tokens`...);
each engine stores one `DimRange` per symbol (`dims_ranges`), and every concrete shape is derived from the two:
TensorRT optimisation profiles and dummy inputs with `shape_at`, runtime checks with `check`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from metacanvas_deploy.runtime.errors import ShapeError
from metacanvas_deploy.runtime.manifest_fields import (
    SYMBOL,
    build_checked,
    check_int,
    check_keys,
    check_mapping,
    check_sequence,
    check_str,
    fail,
    is_int,
)

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool")  # = numpy dtype names
# A dim is an int, a symbol (`h_tok`), or a whole multiple of one (`2*h_tok`: latents are twice the token grid).
SCALED = re.compile(r"([1-9][0-9]*)\*([a-z_][a-z0-9_]*)\Z")


def split_dim(dim: str) -> tuple[int, str]:
    """`"2*h_tok"` -> `(2, "h_tok")`; `"h_tok"` -> `(1, "h_tok")`."""
    m = SCALED.match(dim)
    return (int(m.group(1)), m.group(2)) if m else (1, dim)


@dataclass(frozen=True)
class DimRange:
    """The min/opt/max of one symbolic dim (TensorRT's optimisation-profile triple). JSON: `[min, opt, max]`."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            check_int(getattr(self, name), name)
        if not self.min <= self.opt <= self.max:
            raise fail("", f"expected min <= opt <= max, got [{self.min}, {self.opt}, {self.max}]")

    def at(self, which: str) -> int:
        """The value at `which` ("min", "opt" or "max")."""
        if which not in ("min", "opt", "max"):
            raise ValueError(f"which must be 'min', 'opt' or 'max', got {which!r}")
        return getattr(self, which)

    def to_dict(self) -> list[int]:
        return [self.min, self.opt, self.max]

    @classmethod
    def from_dict(cls, value: Any, where: str = "") -> DimRange:
        if isinstance(value, DimRange):
            return value
        triple = check_sequence(value, where)
        if len(triple) != 3:
            raise fail(where, f"expected [min, opt, max], got {list(triple)!r}")
        return build_checked(cls, where, min=triple[0], opt=triple[1], max=triple[2])


def parse_ranges(value: Any, name: str) -> Mapping[str, DimRange]:
    """`{symbol: DimRange or [min, opt, max]}` -> a read-only `{symbol: DimRange}`."""
    out = {check_str(k, f"{name}.{k}", pattern=SYMBOL): DimRange.from_dict(v, f"{name}.{k}")
           for k, v in check_mapping(value, name).items()}
    return MappingProxyType(out)


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: its name (identical in torch, ONNX, engine and runtime), numpy dtype name,
    and dims, each a fixed int or a symbol whose range the engine's `dims_ranges` gives."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def __post_init__(self) -> None:
        check_str(self.name, "name")
        check_str(self.dtype, "dtype", choices=DTYPES)
        dims = check_sequence(self.dims, "dims")
        for i, d in enumerate(dims):
            if not (isinstance(d, str) and (SYMBOL.match(d) or SCALED.match(d))) and not (is_int(d) and d >= 0):
                raise fail(f"dims[{i}]", f"expected an integer >= 0, a lowercase symbol like 'batch' or a multiple "
                                         f"like '2*h_tok', got {d!r}")
        object.__setattr__(self, "dims", dims)

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbolic dims in order of first appearance."""
        return tuple(dict.fromkeys(split_dim(d)[1] for d in self.dims if isinstance(d, str)))

    def describe(self, ranges: Mapping[str, DimRange]) -> str:
        """e.g. `float32[batch=1..4, 16, prompt_tokens=1..512]`."""
        def one(d):
            if isinstance(d, int):
                return str(d)
            k, sym = split_dim(d)
            return f"{d}={k * ranges[sym].min}..{k * ranges[sym].max}" if sym in ranges else f"{d}=?"

        return f"{self.dtype}[{', '.join(one(d) for d in self.dims)}]"

    def shape_at(self, ranges: Mapping[str, DimRange], which: str = "opt") -> tuple[int, ...]:
        """The concrete shape with every symbol at its `which` ("min", "opt" or "max") value."""
        missing = [d for d in self.symbols if d not in ranges]
        if missing:
            raise fail("dims_ranges", f"tensor `{self.name}` uses symbol {missing[0]!r}, which has no range")
        return tuple(d if isinstance(d, int) else split_dim(d)[0] * ranges[split_dim(d)[1]].at(which)
                     for d in self.dims)

    def check(self, shape: Sequence[int], ranges: Mapping[str, DimRange], dtype: Any = None) -> dict[str, int]:
        """Check a concrete shape (and, if given, a dtype) against this spec; return the symbol bindings.

        Raises `ShapeError` with the tensor's name, its symbolic shape with ranges, and what came."""
        self.shape_at(ranges, "min")  # every symbol has a range
        shape = tuple(int(s) for s in shape)
        problems = []
        if dtype is not None and str(dtype) != self.dtype:
            problems.append(f"dtype is {dtype}, expected {self.dtype}")
        bound: dict[str, int] = {}
        if len(shape) != len(self.dims):
            problems.append(f"rank is {len(shape)}, expected {len(self.dims)}")
        else:
            for axis, (want, got) in enumerate(zip(self.dims, shape)):
                if isinstance(want, int):
                    if got != want:
                        problems.append(f"axis {axis} is {got}, expected {want}")
                    continue
                k, sym = split_dim(want)
                r = ranges[sym]
                if got % k:
                    problems.append(f"axis {axis} ({want}) is {got}, not a multiple of {k}")
                elif not r.min <= got // k <= r.max:
                    problems.append(f"axis {axis} ({want}) is {got}, outside {k * r.min}..{k * r.max}")
                elif bound.setdefault(sym, got // k) != got // k:
                    problems.append(f"axis {axis} ({want}) is {got} but an earlier axis has {sym}={bound[sym]}")
        if problems:
            raise ShapeError(f"tensor `{self.name}`: expected {self.describe(ranges)}, got shape {shape}"
                             f"{f' {dtype}' if dtype is not None else ''}: {'; '.join(problems)}")
        return bound

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "") -> TensorSpec:
        obj = check_keys(obj, cls, where)
        dims = check_sequence(obj["dims"], f"{where}.dims")
        return build_checked(cls, where, name=obj["name"], dtype=obj["dtype"], dims=dims)
