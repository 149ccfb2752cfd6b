"""Validators shared by the manifest's dataclasses (`runtime.tensor_spec`, `runtime.manifest`).

Each raises `ManifestError` (or `BundleSecurityError` for paths) naming the field relative to the object being
checked; `build_checked` puts the enclosing object's path in front while parsing nested JSON, so an error reads
e.g. "manifest field `engines.denoiser.inputs[0].dims[1]`: expected an integer >= 0 ...".
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from metacanvas_deploy.runtime.errors import BundleSecurityError, ManifestError
from metacanvas_deploy.runtime.limits import MAX_JSON_DEPTH, MAX_JSON_INT

SCHEMA_VERSION = 1
SYMBOL = re.compile(r"[a-z_][a-z0-9_]*\Z")
PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def fail(field_name: str, detail: str) -> ManifestError:
    """The error to raise for `field_name` (relative to the object being checked)."""
    return ManifestError(detail, field_name)


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON `true` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_str(value: Any, name: str, *, pattern: re.Pattern | None = None, choices: Sequence[str] = ()) -> str:
    if not isinstance(value, str) or not value:
        raise fail(name, f"expected a non-empty string, got {value!r}")
    if choices and value not in choices:
        raise fail(name, f"expected one of {', '.join(choices)}, got {value!r}")
    if pattern is not None and not pattern.match(value):
        raise fail(name, f"{value!r} does not match {pattern.pattern!r}")
    return value


def check_int(value: Any, name: str, *, minimum: int = 0, maximum: int = MAX_JSON_INT) -> int:
    if not is_int(value) or not minimum <= value <= maximum:
        raise fail(name, f"expected an integer in {minimum}..{maximum}, got {value!r}")
    return value


def check_sha256(value: Any, name: str) -> str:
    """A sha256 hex digest, or "" for a manifest that `write_bundle` has not sealed yet."""
    if not isinstance(value, str) or (value and not SHA256.match(value)):
        raise fail(name, f"expected 64 lowercase hex digits (or \"\" before write_bundle), got {value!r}")
    return value


def check_mapping(value: Any, name: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise fail(name, f"expected an object, got {type(value).__name__}")
    return value


def check_sequence(value: Any, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise fail(name, f"expected a list, got {type(value).__name__}")
    return tuple(value)


def check_relative_path(path: Any, name: str) -> str:
    """A bundle-relative POSIX path: no absolute paths, drive letters, backslashes, `.`/`..` or hidden parts,
    and only `[A-Za-z0-9._-]` in each part (which also keeps ONNX Runtime's special external-data tags out)."""
    if not isinstance(path, str) or not path:
        raise fail(name, f"expected a relative file path, got {path!r}")
    if path.startswith("/") or "\\" in path or re.match(r"[A-Za-z]:", path):
        raise BundleSecurityError(f"{path!r} is absolute; a bundle may only name files inside itself", name)
    parts = path.split("/")
    if ".." in parts:
        raise BundleSecurityError(f"{path!r} climbs out with `..`; a bundle may only name files inside itself", name)
    bad = [p for p in parts if not PATH_PART.match(p)]
    if bad:
        raise BundleSecurityError(f"{path!r} has an empty, hidden or odd part {bad[0]!r}: parts must match "
                                  f"{PATH_PART.pattern!r}", name)
    return path


def freeze(value: Any, name: str, depth: int = 0) -> Any:
    """Deep-freeze a plain JSON value (dict -> read-only mapping, list -> tuple); refuse anything else, integers
    past what JSON readers agree on, and nesting deeper than `MAX_JSON_DEPTH`."""
    if depth > MAX_JSON_DEPTH:
        raise fail(name, f"nests deeper than {MAX_JSON_DEPTH} levels")
    if is_int(value) and abs(value) > MAX_JSON_INT:
        raise fail(name, f"{value} is larger than an integer a manifest may hold (2^53)")
    if value is None or isinstance(value, (str, bool)) or is_int(value):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise fail(name, f"{value!r} is not representable in JSON")
        return value
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise fail(name, f"object keys must be strings, got {key!r}")
        return MappingProxyType({k: freeze(v, f"{name}.{k}", depth + 1) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v, f"{name}[{i}]", depth + 1) for i, v in enumerate(value))
    raise fail(name, f"expected a JSON value, got {type(value).__name__}")


def thaw(value: Any) -> Any:
    """The inverse of `freeze`: plain dicts and lists for `json.dumps`."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def check_keys(obj: Any, cls: type, where: str) -> Mapping:
    """`obj` is a JSON object with exactly the dataclass's fields. Every field is required in JSON, even those
    with a default in code (`to_dict` writes them all), so a truncated or hand-edited manifest is caught."""
    if not isinstance(obj, Mapping):
        raise fail(where, f"expected an object, got {type(obj).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(obj) - set(names))
    if unknown:
        raise fail(f"{where}.{unknown[0]}" if where else unknown[0],
                   f"unknown field (this runtime reads schema {SCHEMA_VERSION}: {', '.join(names)})")
    missing = [n for n in names if n not in obj]
    if missing:
        raise fail(f"{where}.{missing[0]}" if where else missing[0], "required field is missing")
    return obj


def build_checked(cls: type, where: str, **kwargs: Any) -> Any:
    """Construct `cls`, re-raising validation errors with `where` put in front of the field name."""
    try:
        return cls(**kwargs)
    except (ManifestError, BundleSecurityError) as e:
        raise e.within(where) if where else e from None
