"""Verification of a bundle on disk, used by `load_bundle` (and by `write_bundle` before it publishes).

Loading (`load_bundle(path)`) checks, in order, and raises a typed error that says what to rebuild:
  manifest present, a regular file inside the bundle, valid JSON, supported `schema_version`, every field valid
  (`ManifestError`, `SchemaVersionError`); every listed path relative, without `..`, and resolving (after
  symlinks) to a regular file inside the bundle (`BundleSecurityError`, `BundleFileError`); the installed
  backend matches each engine's `backend_version` (`BackendVersionError`, rule in `backend_compatible`);
  engine sizes, then (unless `verify_hashes=False`) every file's sha256 (`BundleIntegrityError`); every ONNX
  external-data location stays inside the bundle and is listed for that engine (`BundleSecurityError`).
  Nothing is executed: JSON only (no pickle, no eval, no imports named by the manifest).

Hashes are recomputed on every load (streamed in 1 MiB chunks, files in parallel threads: hashlib releases
the GIL). There is no (path, size, mtime) cache: mtime can be set by anyone who can write the file, so such a
cache would turn "verified" into "probably unchanged". The cost is the disk's read speed or ~1.2 GB/s of sha256
per core (SHA-NI), whichever is lower: milliseconds for `tiny`, ~10-25 s for a ~26 GB full-size bundle.
`verify_hashes=False` skips it (sizes and every security check still run). sha256 detects corruption, not tampering: whoever can rewrite a
file can rewrite the manifest too; the path checks are what keep a bundle from reaching files outside itself.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import posixpath
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

from metacanvas_deploy.runtime.errors import (
    BackendVersionError,
    BundleFileError,
    BundleIntegrityError,
    BundleSecurityError,
    ManifestError,
    SchemaVersionError,
)
from metacanvas_deploy.runtime.manifest import MANIFEST_NAME, EngineEntry, Manifest, check_relative_path
from metacanvas_deploy.runtime.onnx_external_data import MalformedOnnxError, external_data_refs

CHUNK_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20  # precomputed scheduler plans are KBs; anything near this is not a manifest
_BACKEND_MODULES = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}  # a fixed map, never from the manifest


# --- hashing and versions ---

def sha256_file(path: str | Path) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, streamed in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def hash_all(paths: Mapping[str, Path]) -> dict[str, tuple[str, int]]:
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(sha256_file, paths.values())))


def _version_tuple(version: str, parts: int) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None or (parts == 3 and match.group(3) is None):
        return None
    return tuple(int(g) for g in match.groups()[:parts])


def backend_compatible(backend: str, built: str, installed: str) -> bool:
    """Whether engines built with `built` run on `installed`. The rule:

    - onnxruntime: same major.minor (patch and local suffixes like `+cu124` may differ). A plain ONNX file
      would load in any newer ONNX Runtime, but a bundle may hold graphs that ONNX Runtime itself optimised
      and saved (fused contrib ops, layout changes), which are only valid for the release that wrote them;
      patch releases do not change those.
    - tensorrt: same major.minor.patch. A serialized TensorRT engine only deserializes with the TensorRT
      version that built it (we do not build version-compatible engines; they run slower)."""
    parts = 3 if backend == "tensorrt" else 2
    a, b = _version_tuple(built, parts), _version_tuple(installed, parts)
    return a is not None and a == b


def installed_backend_version(backend: str) -> str | None:
    """The version of the backend this process would use, or None when it cannot be imported."""
    try:
        module = importlib.import_module(_BACKEND_MODULES[backend])
    except (ImportError, OSError):  # OSError: a wheel whose native libraries are missing
        return None
    return getattr(module, "__version__", None)


# --- checks ---

def read_manifest(root: Path) -> Manifest:
    hint = f"Rebuild the bundle with `python -m mc_export build ... --out {root}`"
    file = root / MANIFEST_NAME
    if not os.path.lexists(file):
        raise BundleFileError(f"{root} has no {MANIFEST_NAME}: it is not a bundle, or its build did not finish. "
                              f"{hint}")
    file = resolve_inside(root, MANIFEST_NAME, MANIFEST_NAME, hint)
    size = file.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{file} is {size} bytes, more than a manifest may be ({MAX_MANIFEST_BYTES}). {hint}")
    text = file.read_bytes()
    try:
        manifest = Manifest.from_json(text)
    except SchemaVersionError as e:
        raise e.with_hint(f"In {file}") from None
    except (ManifestError, BundleSecurityError) as e:
        raise e.with_hint(f"In {file}. {_best_effort_hint(text, root) or hint}") from None
    unsealed = manifest.unsealed_fields()
    if unsealed:
        raise ManifestError(f"is empty: {file} was not sealed by write_bundle. Rebuild with "
                            f"`{manifest.rebuild_command(str(root))}`", unsealed[0])
    return manifest


def _best_effort_hint(text: bytes, root: Path) -> str | None:
    """The rebuild command from whatever a manifest that failed validation still says, or None."""
    try:
        obj = json.loads(text)
        backbone, preset = obj["backbone"], obj["preset"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if not all(isinstance(v, str) and re.fullmatch(r"[a-z_][a-z0-9_]*", v) for v in (backbone, preset)):
        return None
    return f"Rebuild the bundle with `python -m mc_export build --backbone {backbone} --preset {preset} --out {root}`"


def resolve_inside(root: Path, relative: str, field: str, rebuild: str) -> Path:
    """The real path of a bundle-relative path: it must resolve (after symlinks) to a regular file in `root`."""
    check_relative_path(relative, field)
    real = Path(os.path.realpath(root / relative))
    if not real.is_relative_to(root):
        raise BundleSecurityError(f"{relative!r} resolves to {real}, outside the bundle {root} (a symlink?); "
                                  f"a bundle may only read files inside itself. Do not use it; {_lower(rebuild)}",
                                  field)
    if not real.exists():
        raise BundleFileError(f"bundle {root} is missing {relative!r} (manifest field `{field}`): the bundle is "
                              f"incomplete. {rebuild}")
    if not stat.S_ISREG(real.stat().st_mode):
        raise BundleFileError(f"{relative!r} in bundle {root} is not a regular file (manifest field `{field}`)")
    return real


def listed_files(manifest: Manifest) -> list[tuple[str, str, str, int | None]]:
    """(field, relative path, sha256, size or None) for every file the manifest lists."""
    rows: list[tuple[str, str, str, int | None]] = [
        (f"engines.{stage}.file", e.file, e.sha256, e.size_bytes) for stage, e in manifest.engines.items()]
    return rows + [(f"files[{p!r}]", p, h, None) for p, h in manifest.files.items()]


def check_versions(root: Path, manifest: Manifest, overrides: Mapping[str, str | None]) -> None:
    for stage, entry in manifest.engines.items():
        installed = (overrides[entry.backend] if entry.backend in overrides
                     else installed_backend_version(entry.backend))
        rule = "major.minor.patch" if entry.backend == "tensorrt" else "major.minor"
        rebuild = manifest.rebuild_command(str(root))
        if installed is None:
            raise BackendVersionError(f"engine `{stage}` ({entry.file}) needs {entry.backend} "
                                      f"{entry.backend_version}, which is not installed. Install it, or rebuild "
                                      f"for a backend you have: `{rebuild}`")
        if not backend_compatible(entry.backend, entry.backend_version, installed):
            raise BackendVersionError(f"engine `{stage}` ({entry.file}) was built with {entry.backend} "
                                      f"{entry.backend_version}, installed is {installed}; this runtime needs the "
                                      f"same {rule}. Install {entry.backend}=={entry.backend_version}, or rebuild "
                                      f"with the installed version: `{rebuild}`")


def verify_files(root: Path, manifest: Manifest, *, verify_hashes: bool, what: str) -> None:
    """Paths, sizes, hashes and ONNX external data; `what` is "rebuild" (loading) or "write" (sealing)."""
    rebuild = f"Rebuild with `{manifest.rebuild_command(str(root))}`" if what == "rebuild" else "(populate bug)"
    real = {rel: resolve_inside(root, rel, field, rebuild) for field, rel, _, _ in listed_files(manifest)}
    for field, rel, _, size in listed_files(manifest):
        if size is not None and real[rel].stat().st_size != size:
            raise BundleIntegrityError(f"{rel!r} in bundle {root} is {real[rel].stat().st_size} bytes, the manifest "
                                       f"(`{field}`) says {size}: truncated or replaced after the build. {rebuild}")
    if verify_hashes:
        got = hash_all(real)
        bad = [f"{rel!r} (sha256 {got[rel][0][:12]}..., manifest `{field}` says {want[:12]}...)"
               for field, rel, want, _ in listed_files(manifest) if got[rel][0] != want]
        if bad:
            raise BundleIntegrityError(f"bundle {root} has corrupt files: {'; '.join(bad)}. They changed after "
                                       f"the build (disk error, partial copy or an edit). {rebuild}, or copy the "
                                       "bundle again from its source")
    for stage, entry in manifest.engines.items():
        if entry.backend == "onnxruntime":
            _check_external_data(stage, entry, real[entry.file], rebuild)


def _check_external_data(stage: str, entry: EngineEntry, onnx_path: Path, rebuild: str) -> None:
    """Every external-data location in the ONNX file stays in the bundle and is listed for this engine."""
    field = f"engines.{stage}.external_data"
    try:
        refs = external_data_refs(onnx_path)
    except MalformedOnnxError as e:
        raise BundleIntegrityError(f"engine `{stage}` ({entry.file}) is not a readable ONNX file: {e}. "
                                   f"{rebuild}") from None
    for ref in refs:
        where = f"tensor {ref.tensor!r} of {entry.file}"
        if ref.location is None:
            raise BundleSecurityError(f"{where} is stored externally but names no location. {rebuild}", field)
        loc = ref.location
        if loc.startswith("/") or re.match(r"[A-Za-z]:", loc) or "\\" in loc or ".." in loc.split("/"):
            raise BundleSecurityError(f"{where} reads external data from {loc!r}, outside the bundle: ONNX "
                                      "external data must name a file in the bundle. Do not use this bundle; "
                                      f"{_lower(rebuild)}", field)
        relative = posixpath.normpath(posixpath.join(posixpath.dirname(entry.file), loc))
        if relative not in entry.external_data:
            raise BundleSecurityError(f"{where} reads external data from {loc!r}, which the manifest does not "
                                      f"list for this engine (it lists {list(entry.external_data)}). Do not use "
                                      f"this bundle; {_lower(rebuild)}", field)


def _lower(sentence: str) -> str:
    return sentence[:1].lower() + sentence[1:]
