"""The schema of `manifest.json`, the one file through which the compiler (`mc_export`) and the runtime meet.

Frozen dataclasses, strictly validated both when built in code (by the compiler) and when read from JSON (by
the runtime): an unknown, missing or mistyped field raises `ManifestError` naming the field's dotted path; a
path that is absolute or climbs with `..` raises `BundleSecurityError`. Opaque sections (`scheduler`, `canvas`,
`defaults`, `build`, `extra`, `device`) must hold plain JSON values and are deep-frozen (mappings become
read-only, lists become tuples) so that a loaded manifest cannot be changed in place.

`Manifest.to_json()` / `Manifest.from_json(text)` read and write the file; the nested classes have
`to_dict()` / `from_dict()`. `runtime.bundle` writes and verifies the directory around it.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping

from metacanvas_deploy.runtime.errors import SchemaVersionError, ShapeError
from metacanvas_deploy.runtime.limits import MAX_FRAMES, MAX_GUIDANCE, MAX_PROMPT_TOKENS, MAX_SIDE, MAX_STEPS
from metacanvas_deploy.runtime.manifest_fields import (
    SCHEMA_VERSION,
    SYMBOL,
    build_checked,
    check_int,
    check_keys,
    check_mapping,
    check_relative_path,
    check_sequence,
    check_sha256,
    check_str,
    fail,
    freeze,
    is_int,
    thaw,
)
from metacanvas_deploy.runtime.step_cache import check_manifest_cache
from metacanvas_deploy.runtime.tensor_spec import DTYPES, DimRange, TensorSpec, parse_ranges

__all__ = ["SCHEMA_VERSION", "BUNDLE_FORMAT", "MANIFEST_NAME", "DTYPES", "BACKENDS", "PRECISIONS",
           "REQUEST_RANGES", "MULTIPLES", "DimRange", "TensorSpec", "EngineEntry", "Manifest", "check_relative_path"]

BUNDLE_FORMAT = "metacanvas-bundle"
MANIFEST_NAME = "manifest.json"
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "w8", "w4")  # w8/w4: weight-only (float activations)
REQUEST_RANGES = ("height", "width", "num_frames", "prompt_tokens")
MULTIPLES = ("height", "width", "num_frames_minus_1")
# The `python -m mc_export build` flag that sets each request range (as MIN:MAX).
REBUILD_FLAGS = {"height": "--height", "width": "--width", "num_frames": "--frames", "prompt_tokens": "--prompt-tokens"}
_VERSION = re.compile(r"\d+\.\d+")
_RANGE_LIMITS = {"height": MAX_SIDE, "width": MAX_SIDE, "num_frames": MAX_FRAMES, "prompt_tokens": MAX_PROMPT_TOKENS}


@dataclass(frozen=True, kw_only=True)
class EngineEntry:
    """One compiled stage: its file (bundle-relative), hashes, backend and precision, I/O specs and shape ranges.

    `sha256`/`size_bytes` may be left empty by the compiler: `write_bundle` fills them in. `external_data` lists
    the ONNX external-data files (bundle-relative); their sha256 live in the manifest's `files` map. `device` is
    the GPU identity an engine was built for (TensorRT: name, compute capability, CUDA/driver versions; None for
    ONNX Runtime on CPU)."""

    stage: str
    file: str
    sha256: str = ""
    size_bytes: int = 0
    backend: str
    backend_version: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims_ranges: Mapping[str, DimRange]
    external_data: tuple[str, ...] = ()
    device: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        check_str(self.stage, "stage", pattern=SYMBOL)
        check_relative_path(self.file, "file")
        check_sha256(self.sha256, "sha256")
        check_int(self.size_bytes, "size_bytes")
        check_str(self.backend, "backend", choices=BACKENDS)
        check_str(self.backend_version, "backend_version", pattern=_VERSION)
        check_str(self.precision, "precision", choices=PRECISIONS)
        for kind in ("inputs", "outputs"):
            specs = check_sequence(getattr(self, kind), kind)
            if not specs:
                raise fail(kind, "expected at least one tensor")
            for i, spec in enumerate(specs):
                if not isinstance(spec, TensorSpec):
                    raise fail(f"{kind}[{i}]", f"expected a TensorSpec, got {type(spec).__name__}")
            set_(kind, specs)
        names = [s.name for s in self.inputs + self.outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise fail("outputs", f"tensor name {dupes[0]!r} is used twice among inputs and outputs")
        set_("dims_ranges", parse_ranges(self.dims_ranges, "dims_ranges"))
        used = {s for spec in self.inputs + self.outputs for s in spec.symbols}
        if used - set(self.dims_ranges):
            raise fail("dims_ranges", f"symbol {sorted(used - set(self.dims_ranges))[0]!r} has no [min, opt, max]")
        if set(self.dims_ranges) - used:
            raise fail(f"dims_ranges.{sorted(set(self.dims_ranges) - used)[0]}", "no input or output uses it")
        ext = check_sequence(self.external_data, "external_data")
        for i, path in enumerate(ext):
            check_relative_path(path, f"external_data[{i}]")
        if len(set(ext)) != len(ext) or self.file in ext:
            raise fail("external_data", "lists a file twice or lists the engine file itself")
        set_("external_data", ext)
        if self.device is None and self.backend == "tensorrt":
            raise fail("device", "a TensorRT engine must record the GPU it was built for")
        set_("device", None if self.device is None else freeze(check_mapping(self.device, "device"), "device"))
        set_("extra", freeze(check_mapping(self.extra, "extra"), "extra"))

    def spec(self, name: str) -> TensorSpec:
        """The input or output called `name`."""
        for spec in self.inputs + self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(f"stage `{self.stage}` has no tensor {name!r}; it has {[s.name for s in self.inputs]} "
                       f"-> {[s.name for s in self.outputs]}")

    def input_shapes(self, which: str = "opt") -> dict[str, tuple[int, ...]]:
        """Every input's concrete shape at `which` (a TensorRT optimisation profile, dummy inputs)."""
        return {s.name: s.shape_at(self.dims_ranges, which) for s in self.inputs}

    def check_inputs(self, arrays: Mapping[str, Any]) -> dict[str, int]:
        """Check a feed of arrays (anything with `.shape` and `.dtype`) against the inputs, including that a
        symbol takes one value across all inputs; return the symbol bindings. Raises `ShapeError`."""
        expected = [s.name for s in self.inputs]
        if sorted(arrays) != sorted(expected):
            raise ShapeError(f"stage `{self.stage}` takes inputs {expected}, got {sorted(arrays)}")
        bound: dict[str, tuple[int, str]] = {}
        for spec in self.inputs:
            array = arrays[spec.name]
            for symbol, value in spec.check(array.shape, self.dims_ranges, array.dtype).items():
                first = bound.setdefault(symbol, (value, spec.name))
                if first[0] != value:
                    raise ShapeError(f"stage `{self.stage}`: {symbol} is {first[0]} in `{first[1]}` but {value} in "
                                     f"`{spec.name}`; one request must use one {symbol}")
        return {k: v for k, (v, _) in bound.items()}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(inputs=[s.to_dict() for s in self.inputs], outputs=[s.to_dict() for s in self.outputs],
                   dims_ranges={k: r.to_dict() for k, r in self.dims_ranges.items()},
                   external_data=list(self.external_data), device=thaw(self.device), extra=thaw(self.extra))
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str = "") -> EngineEntry:
        obj = dict(check_keys(obj, cls, where))
        for kind in ("inputs", "outputs"):
            obj[kind] = tuple(TensorSpec.from_dict(t, f"{where}.{kind}[{i}]")
                              for i, t in enumerate(check_sequence(obj[kind], f"{where}.{kind}")))
        obj["dims_ranges"] = parse_ranges(obj["dims_ranges"], f"{where}.dims_ranges")
        return build_checked(cls, where, **obj)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything the runtime knows about a build. See the module docstring and `runtime/bundle.py`."""

    schema_version: int = SCHEMA_VERSION
    format: str = BUNDLE_FORMAT
    backbone: str
    preset: str
    tasks: tuple[str, ...]
    engines: Mapping[str, EngineEntry]
    files: Mapping[str, str] = field(default_factory=dict)
    ranges: Mapping[str, tuple[int, int]]
    multiples: Mapping[str, int]
    scheduler: Mapping[str, Any] = field(default_factory=dict)
    canvas: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    build: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        _check_schema_version(self.schema_version)
        check_str(self.format, "format", choices=(BUNDLE_FORMAT,))
        check_str(self.backbone, "backbone", pattern=SYMBOL)
        check_str(self.preset, "preset", pattern=SYMBOL)
        tasks = check_sequence(self.tasks, "tasks")
        for i, task in enumerate(tasks):
            check_str(task, f"tasks[{i}]", pattern=SYMBOL)
        if not tasks or len(set(tasks)) != len(tasks):
            raise fail("tasks", f"expected at least one task, each once, got {list(tasks)!r}")
        set_("tasks", tasks)
        engines = check_mapping(self.engines, "engines")
        for stage, entry in engines.items():
            if not isinstance(entry, EngineEntry) or entry.stage != stage:
                raise fail(f"engines.{stage}", f"expected an EngineEntry whose stage is {stage!r}")
        if not engines:
            raise fail("engines", "expected at least one engine")
        set_("engines", MappingProxyType(dict(engines)))
        files = {check_relative_path(p, f"files[{p!r}]"): check_sha256(h, f"files[{p!r}]")
                 for p, h in check_mapping(self.files, "files").items()}
        set_("files", MappingProxyType(files))
        self._check_file_sets()
        set_("ranges", self._checked_ranges())
        for key in ("scheduler", "canvas", "defaults", "build"):
            set_(key, freeze(check_mapping(getattr(self, key), key), key))
        self._check_defaults()
        plans = self.scheduler.get("plans", {})
        for steps in check_mapping(plans, "scheduler.plans"):
            if not (steps.isdigit() and 1 <= int(steps) <= MAX_STEPS):
                raise fail(f"scheduler.plans.{steps}", f"expected a step count in 1..{MAX_STEPS}")
        check_manifest_cache(self)  # scheduler.cache: the step-cache schedule (runtime.step_cache)

    def _check_defaults(self) -> None:
        """The request defaults the runtime falls back on: inside this bundle's ranges and the global bounds."""
        d = self.defaults
        for key in ("height", "width", "num_frames"):
            lo, hi = self.ranges[key]
            check_int(d.get(key), f"defaults.{key}", minimum=lo, maximum=hi)
        check_int(d.get("num_inference_steps"), "defaults.num_inference_steps", minimum=1, maximum=MAX_STEPS)
        guidance = d.get("guidance_scale")
        if not (isinstance(guidance, (int, float)) and not isinstance(guidance, bool)
                and 0.0 <= guidance <= MAX_GUIDANCE):
            raise fail("defaults.guidance_scale", f"expected a number in 0..{MAX_GUIDANCE:g}, got {guidance!r}")
        if not isinstance(d.get("negative_prompt"), str):
            raise fail("defaults.negative_prompt", f"expected a string, got {d.get('negative_prompt')!r}")

    def _check_file_sets(self) -> None:
        engine_files = [e.file for e in self.engines.values()]
        for stage, entry in self.engines.items():
            if engine_files.count(entry.file) > 1 or entry.file in self.files:
                raise fail(f"engines.{stage}.file", f"{entry.file!r} is listed twice")
            for path in entry.external_data:
                if path not in self.files:
                    raise fail(f"engines.{stage}.external_data", f"{path!r} has no sha256 in `files`")
        if MANIFEST_NAME in self.files:
            raise fail(f"files[{MANIFEST_NAME!r}]", "the manifest cannot list itself")

    def _checked_ranges(self) -> Mapping[str, tuple[int, int]]:
        for key, names in (("ranges", REQUEST_RANGES), ("multiples", MULTIPLES)):
            given = check_mapping(getattr(self, key), key)
            if set(given) != set(names):
                raise fail(key, f"expected exactly the keys {', '.join(names)}, got {', '.join(given) or 'none'}")
        multiples = {k: check_int(self.multiples[k], f"multiples.{k}", minimum=1) for k in MULTIPLES}
        object.__setattr__(self, "multiples", MappingProxyType(multiples))
        out = {}
        for key in REQUEST_RANGES:
            pair = check_sequence(self.ranges[key], f"ranges.{key}")
            top = _RANGE_LIMITS[key]
            if len(pair) != 2 or not all(is_int(v) and 1 <= v <= top for v in pair) or pair[0] > pair[1]:
                raise fail(f"ranges.{key}", f"expected [min, max] with 1 <= min <= max <= {top}, got {list(pair)!r}")
            step, offset = self.step(key)
            if any((v - offset) % step for v in pair):
                raise fail(f"ranges.{key}", f"{list(pair)} are not both {_step_text(step, offset, plural=True)}")
            out[key] = (pair[0], pair[1])
        return MappingProxyType(out)

    # --- requests and rebuild hints ---

    def step(self, key: str) -> tuple[int, int]:
        """(step, offset) of a request value: allowed values are `offset + k * step` (frames: 1 + 4k)."""
        if key == "num_frames":
            return self.multiples["num_frames_minus_1"], 1
        return (self.multiples[key], 0) if key in self.multiples else (1, 0)

    def rebuild_command(self, out_dir: str | None = None, **ranges: tuple[int, int]) -> str:
        """The command that rebuilds this bundle into `out_dir`, with request `ranges` (e.g. `height=(256, 1024)`)
        changed. Without changes it is `build["command"]` when the compiler recorded one (it should)."""
        if not ranges and isinstance(self.build.get("command"), str):
            return self.build["command"]
        parts = ["python -m mc_export build", f"--backbone {self.backbone}"]
        if self.preset != "checkpoint":
            parts.append(f"--preset {self.preset}")
        if self.preset == "checkpoint" or isinstance(self.build.get("checkpoint"), str):
            parts.append(f"--checkpoint {self.build.get('checkpoint', 'CHECKPOINT_DIR')}")
        parts += [f"{REBUILD_FLAGS[k]} {lo}:{hi}" for k, (lo, hi) in ranges.items()]
        parts.append(f"--out {out_dir or 'DIR'}")
        return " ".join(parts)

    def check_request(self, height: int, width: int, num_frames: int = 1, prompt_tokens: int | None = None,
                      *, out_dir: str | None = None) -> None:
        """Refuse a request this bundle was not built for with one `ShapeError` that lists every problem, the
        allowed ranges, and the rebuild command that would serve it. `prompt_tokens=None` skips that check."""
        values = {"height": height, "width": width, "num_frames": num_frames, "prompt_tokens": prompt_tokens}
        problems, rebuild = [], {}
        for key, value in values.items():
            if value is None and key == "prompt_tokens":
                continue
            try:
                value = operator.index(value)
            except TypeError:
                raise ShapeError(f"{key} must be an integer, got {value!r}") from None
            (lo, hi), (step, offset) = self.ranges[key], self.step(key)
            off = (value - offset) % step
            down, up = value - off, value - off + (step if off else 0)
            allowed = f"this bundle's {lo}..{hi}" + (f" ({_step_text(step, offset)})" if step > 1 else "")
            if not lo <= value <= hi:
                problems.append(f"{key} {value} is outside {allowed}"
                                + (f" and not {_step_text(step, offset)} (nearest: {down} or {up})" if off else ""))
                rebuild[key] = (down if value < lo and down >= 1 else min(lo, up), max(hi, up))
            elif off:
                problems.append(f"{key} {value} is not {_step_text(step, offset)} (nearest: {down} or {up})")
        if problems:
            hint = f"; rebuild with `{self.rebuild_command(out_dir, **rebuild)}`" if rebuild else ""
            raise ShapeError("request not served by this bundle: " + "; ".join(problems) + hint)

    # --- JSON ---

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: thaw(getattr(self, f.name)) for f in fields(self)}
        out["engines"] = {stage: e.to_dict() for stage, e in self.engines.items()}
        return out

    def to_json(self) -> str:
        """The text of `manifest.json`: objects indented by 2, lists of scalars on one line (scheduler plans stay
        readable), fields in declared order, trailing newline. `from_json(m.to_json()).to_json()` is identical."""
        return _dumps(self.to_dict(), 0) + "\n"

    @classmethod
    def from_dict(cls, obj: Any) -> Manifest:
        if not isinstance(obj, Mapping):
            raise fail("", f"expected a JSON object at the top level, got {type(obj).__name__}")
        if "schema_version" not in obj:
            raise fail("schema_version", "required field is missing")
        _check_schema_version(obj["schema_version"])  # before anything else: a newer schema has other fields
        obj = dict(check_keys(obj, cls, ""))
        engines = check_mapping(obj["engines"], "engines")
        obj["engines"] = {stage: EngineEntry.from_dict(e, f"engines.{stage}") for stage, e in engines.items()}
        return cls(**obj)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse `manifest.json`. Duplicate keys, NaN/Infinity and trailing garbage are errors."""
        try:
            obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
        except RecursionError:
            raise fail("", "manifest.json nests too deeply to be a manifest") from None
        except json.JSONDecodeError as e:
            raise fail("", f"manifest.json is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except UnicodeDecodeError as e:
            raise fail("", f"manifest.json is not UTF-8 text: {e}") from None
        return cls.from_dict(obj)

    def sealed(self, engines: Mapping[str, tuple[str, int]], files: Mapping[str, str]) -> Manifest:
        """A copy with the engines' (sha256, size) and the files' sha256 filled in (used by `write_bundle`)."""
        new_engines = {s: replace(e, sha256=engines[s][0], size_bytes=engines[s][1]) for s, e in self.engines.items()}
        return replace(self, engines=new_engines, files={p: files[p] for p in self.files})

    def unsealed_fields(self) -> list[str]:
        """Fields whose hash `write_bundle` has not filled in yet (empty for a bundle on disk)."""
        return ([f"engines.{s}.sha256" for s, e in self.engines.items() if not e.sha256]
                + [f"files[{p!r}]" for p, h in self.files.items() if not h])


def _check_schema_version(version: Any) -> None:
    if not is_int(version):
        raise fail("schema_version", f"expected an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"schema {version} was written by a newer mc_export; this runtime reads schema "
                                 f"{SCHEMA_VERSION}. Upgrade the runtime, or rebuild the bundle with the mc_export "
                                 f"that matches this runtime", "schema_version")
    if version < SCHEMA_VERSION:
        raise SchemaVersionError(f"schema {version} is older than this runtime's {SCHEMA_VERSION}; rebuild the "
                                 "bundle with the current mc_export", "schema_version")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise fail(key, "appears twice in one JSON object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise fail("", f"manifest.json contains {name}, which is not JSON")


def _step_text(step: int, offset: int, plural: bool = False) -> str:
    """"a multiple of 32", "1 + a multiple of 4" (or plural)."""
    text = f"multiples of {step}" if plural else f"a multiple of {step}"
    return f"1 + {text}" if offset else text


def _dumps(value: Any, depth: int) -> str:
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(f"{inner}{_dumps(v, depth + 1)}" for v in value) + f"\n{pad}]"
    return json.dumps(value, allow_nan=False)  # scalars, empty containers, lists of scalars
