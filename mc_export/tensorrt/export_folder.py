"""A TensorRT export on disk: what one machine (no GPU needed) hands to the GPU machine that builds the engines.

    <export>/
      export.json                      the index, written last: format, precision, the runtime manifest without
                                       its engines ("skeleton"), per stage its spec, profile, weights record, gate
                                       and references, and every other file's sha256 and size
      tokenizer.json                   the planner's tokenizer (copied into the bundle)
      <stage>.onnx [+ .onnx.data]      the graph TensorRT parses: raw export, decomposed attention, sequences
                                       lowered, 16-bit weights for fp16/bf16 (`tensorrt.half_weights`)
      references/<stage>.<case>.inputs.npz / .outputs.npz
                                       each gate case's inputs and the PyTorch outputs on them (numpy, no pickle)

Written by `write_export` through the bundle's atomic writer (`runtime.bundle.write_atomically`); read and
verified by `read_export` (JSON only, every path inside the folder, every file listed and its sha256 checked),
which imports numpy and the runtime only: the GPU machine needs no torch, no onnx and no checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metacanvas_deploy.mc_export.components.spec_data import ComponentSpec, Tolerance
from metacanvas_deploy.mc_export.errors import ExportFolderError
from metacanvas_deploy.runtime.bundle import write_atomically
from metacanvas_deploy.runtime.bundle_verify import hash_all, resolve_inside
from metacanvas_deploy.runtime.errors import BundleError
from metacanvas_deploy.runtime.manifest import check_relative_path
from metacanvas_deploy.runtime.tensor_spec import TensorSpec, parse_ranges

EXPORT_FORMAT = "metacanvas-tensorrt-export"
EXPORT_VERSION = 1
INDEX_NAME = "export.json"
MAX_INDEX_BYTES = 64 << 20
# The precisions an export carries, and what their graphs' weights are stored in (`tensorrt.half_weights`).
# int8/fp8 engines build from Q/DQ graphs that calibration writes against a float bundle, and their gate on the
# GPU machine (against the float bundle's numbers) is not written yet.
WEIGHTS_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

Profile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class StageExport:
    """One stage of an export: its graph, the spec the engine is built and gated from, and its references."""

    spec: ComponentSpec
    onnx: str
    external_data: tuple[str, ...]
    profile: Mapping[str, Profile]
    references: Mapping[str, tuple[str, str]]  # case -> (inputs file, outputs file)
    gate: str  # "passed", or why the export machine could not compute the references
    weights: Mapping  # what `half_weights` converted (dtype, count, bytes)


@dataclass(frozen=True)
class TensorRTExport:
    """A verified export folder (`read_export`)."""

    path: Path
    precision: str
    cache_key: str
    command: str
    skeleton: Mapping  # the runtime manifest's fields, without `engines`
    stages: Mapping[str, StageExport]

    def references(self, stage: str) -> list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """(case, inputs, PyTorch outputs) of every gate case of ``stage`` (no pickle is ever loaded)."""
        return [(case, _load_npz(self.path / ins), _load_npz(self.path / outs))
                for case, (ins, outs) in self.stages[stage].references.items()]


# --- writing ------------------------------------------------------------------------------------------------

def stage_record(spec: ComponentSpec, onnx: str, external_data: tuple[str, ...], profile: Mapping[str, Profile],
                 references: Mapping[str, tuple[str, str]], gate: str, weights: Mapping) -> dict:
    """The JSON of one stage in the index (`StageExport`'s fields)."""
    return {"onnx": onnx, "external_data": list(external_data),
            "spec": {"inputs": [t.to_dict() for t in spec.inputs], "outputs": [t.to_dict() for t in spec.outputs],
                     "dims": {k: r.to_dict() for k, r in spec.dims.items()}, "extra": dict(spec.extra),
                     "tolerance": {"max_rel": spec.tolerance.max_rel, "min_cosine": spec.tolerance.min_cosine}},
            "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
            "references": {case: {"inputs": ins, "outputs": outs} for case, (ins, outs) in references.items()},
            "gate": gate, "weights": dict(weights)}


def save_references(folder: Path, stage: str, case: str, inputs: Mapping[str, np.ndarray],
                    outputs: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """Write one gate case's arrays under ``folder/references``; returns the two folder-relative paths."""
    (folder / "references").mkdir(exist_ok=True)
    names = (f"references/{stage}.{case}.inputs.npz", f"references/{stage}.{case}.outputs.npz")
    for rel, arrays in zip(names, (inputs, outputs)):
        with open(folder / rel, "xb") as f:
            np.savez(f, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return names


def write_export(out: Path, populate: Callable[[Path], dict]) -> dict:
    """Write an export folder atomically: ``populate(tmp)`` writes the files and returns the index without
    ``files``; this lists and hashes every file (symlinks refused), writes `export.json` last and swaps the
    folder into ``out``. An existing ``out`` is replaced only if empty or an export holding nothing else."""
    def fill(tmp: Path) -> dict:
        index = populate(tmp)
        present = _regular_files(tmp)
        index["files"] = {rel: {"sha256": h, "size": n} for rel, (h, n) in sorted(hash_all(
            {rel: tmp / rel for rel in present}).items())}
        _check_listed(tmp, index)
        with open(tmp / INDEX_NAME, "x", encoding="utf-8") as f:
            json.dump(index, f, indent=1, allow_nan=False)
            f.write("\n")
        return index

    return write_atomically(out, fill, _refuse_non_export, what="TensorRT export")


def _check_listed(tmp: Path, index: dict) -> None:
    """Every file a stage names was written (a populate bug otherwise)."""
    named = {rel for s in index["stages"].values() for rel in (s["onnx"], *s["external_data"])}
    named |= {rel for s in index["stages"].values() for r in s["references"].values() for rel in r.values()}
    missing = sorted(named - set(index["files"]))
    if missing:
        raise ExportFolderError(f"the export names files it did not write: {missing}")


def _regular_files(root: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise ExportFolderError(f"{path} is not a regular file or folder; an export holds no links")
            if path.is_file():
                found.add(path.relative_to(root).as_posix())
    return found - {INDEX_NAME}


def _refuse_non_export(out: Path) -> None:
    """``out`` may be replaced when missing, empty, or an export that verifies and holds nothing else."""
    if not os.path.lexists(out) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        return
    try:
        read_export(out, verify_hashes=False)
    except (ExportFolderError, BundleError) as e:
        raise ExportFolderError(f"{out} exists and is not a TensorRT export this build may replace ({e}); choose a "
                                "new or empty --out") from None


# --- reading ------------------------------------------------------------------------------------------------

def read_export(path: str | Path, verify_hashes: bool = True) -> TensorRTExport:
    """Open and verify the export at ``path``: the index (format, version, fields), every path inside the folder,
    no file unlisted, sizes and (unless ``verify_hashes=False``) sha256. ExportFolderError names what is wrong and
    the command that writes the export again."""
    root = Path(path)
    if not (root / INDEX_NAME).is_file():
        raise ExportFolderError(f"{root} holds no {INDEX_NAME}: not a TensorRT export (write one with `python -m "
                                "mc_export build ... --target tensorrt --export-only --out DIR`)")
    root = root.resolve()
    index = _read_index(root)
    again = f"write the export again: `{index.get('command') or 'python -m mc_export build ... --export-only'}`"
    try:
        files = _verify_files(root, index, verify_hashes, again)
        stages = {name: _stage(name, s, files) for name, s in _mapping(index, "stages").items()}
    except (BundleError, KeyError, TypeError, ValueError) as e:  # a field missing, mistyped or out of its range
        raise ExportFolderError(f"{root / INDEX_NAME}: {e}; {again}") from None
    if not stages:
        raise ExportFolderError(f"{root / INDEX_NAME} lists no stage; {again}")
    if _mapping(index, "manifest").get("engines") is not None or "tokenizer.json" not in files:
        raise ExportFolderError(f"{root}: the manifest skeleton must have no engines and the folder a tokenizer.json;"
                                f" {again}")
    return TensorRTExport(root, index["precision"], index["cache_key"], index.get("command", ""),
                          _mapping(index, "manifest"), stages)


def _read_index(root: Path) -> dict:
    file = root / INDEX_NAME
    if file.is_symlink() or file.stat().st_size > MAX_INDEX_BYTES:
        raise ExportFolderError(f"{file} is a link or larger than an export index may be ({MAX_INDEX_BYTES} bytes)")
    try:
        index = json.loads(file.read_bytes(), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ExportFolderError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(index, dict) or index.get("format") != EXPORT_FORMAT:
        raise ExportFolderError(f"{file} is not a TensorRT export index (format {EXPORT_FORMAT!r} expected)")
    if index.get("version") != EXPORT_VERSION:
        raise ExportFolderError(f"{file} is export version {index.get('version')!r}; this mc_export reads version "
                                f"{EXPORT_VERSION}: export again with this mc_export, or build with the one that "
                                "wrote it")
    if index.get("precision") not in WEIGHTS_DTYPE or not isinstance(index.get("cache_key"), str):
        raise ExportFolderError(f"{file}: precision must be one of {', '.join(WEIGHTS_DTYPE)} and cache_key a "
                                f"string, got {index.get('precision')!r}, {index.get('cache_key')!r}")
    return index


def _verify_files(root: Path, index: dict, verify_hashes: bool, again: str) -> dict[str, str]:
    """Listed files: inside the folder, present, none unlisted, sizes and hashes as recorded. Returns rel -> sha."""
    listed = {check_relative_path(rel, f"files[{rel!r}]"): rec for rel, rec in _mapping(index, "files").items()}
    real = {rel: resolve_inside(root, rel, f"files[{rel!r}]", again) for rel in listed}
    extra = sorted(_regular_files(root) - set(listed))
    if extra:
        raise ExportFolderError(f"{root} holds files its {INDEX_NAME} does not list: {extra[:5]}; an export is "
                                f"written whole: {again}")
    sized = [rel for rel, rec in listed.items() if real[rel].stat().st_size != rec["size"]]
    got = hash_all(real) if verify_hashes else {}
    changed = sized + [rel for rel, rec in listed.items() if rel in got and got[rel][0] != rec["sha256"]]
    if changed:
        raise ExportFolderError(f"{root}: {sorted(set(changed))} changed after the export (sha256 or size differ "
                                f"from {INDEX_NAME}): a partial copy, a disk error or an edit. Copy the export again "
                                f"from its source, or {again}")
    return {rel: rec["sha256"] for rel, rec in listed.items()}


def _stage(name: str, s: Mapping, files: Mapping[str, str]) -> StageExport:
    spec_json = s["spec"]
    tol = spec_json["tolerance"]
    spec = ComponentSpec(stage=name, inputs=tuple(TensorSpec.from_dict(t) for t in spec_json["inputs"]),
                         outputs=tuple(TensorSpec.from_dict(t) for t in spec_json["outputs"]),
                         dims=parse_ranges(spec_json["dims"], f"stages.{name}.spec.dims"),
                         tolerance=Tolerance(float(tol["max_rel"]), float(tol["min_cosine"])),
                         extra=dict(spec_json["extra"]))
    refs = {case: (r["inputs"], r["outputs"]) for case, r in s["references"].items()}
    named = [s["onnx"], *s["external_data"], *(rel for pair in refs.values() for rel in pair)]
    unlisted = [rel for rel in named if rel not in files]
    if unlisted:
        raise ExportFolderError(f"stage {name!r} names files the export does not list: {unlisted}")
    profile = {k: tuple(tuple(int(d) for d in shape) for shape in v) for k, v in s["profile"].items()}
    return StageExport(spec, s["onnx"], tuple(s["external_data"]), profile, refs, str(s["gate"]), s["weights"])


def _mapping(obj: Mapping, key: str) -> Mapping:
    value = obj.get(key)
    if not isinstance(value, Mapping):
        raise ExportFolderError(f"{INDEX_NAME}: `{key}` must be an object, got {type(value).__name__}")
    return value


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")
