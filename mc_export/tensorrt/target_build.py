"""`python -m mc_export engines --export DIR --out BUNDLE`: on the GPU machine (a Jetson included), a TensorRT export
written elsewhere (`export_only`, `build --target tensorrt --export-only`) -> a verified bundle for this GPU.

No torch, transformers, diffusers, onnx or checkpoint: this module imports numpy, the runtime and the torch-free
parts of the TensorRT target (the export folder, the spec, the precision table, profiles, the builder, the gate's
rule); tensorrt and cuda-python are imported when the build starts. In order:
  1. TensorRT and cuda-python import (else BuildError naming what to install);
  2. the export verifies (`export_folder.read_export`: index, paths, every file's sha256);
  3. this GPU can take the precision (`precision.check_precision`: an Orin asked for bf16 is refused here);
  4. the bundle's manifest is composed from the export's skeleton and validated before any engine is built;
  5. per stage: the profile the builder derives from the stored spec must be the stored one, the engine is built
     from the stored graph as it is (`builder.build_engine(..., prepared=True)`: timing cache per GPU), then gated
     against the stored PyTorch references at the precision's tolerance (`GATE_TOLERANCE`, the spec's for fp32);
  6. the bundle is written atomically (`runtime.bundle.write_bundle`) with the device identity in every entry.
A stage that misses its gate raises StageParityError and nothing is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

from metacanvas_deploy.mc_export.errors import BuildError
from metacanvas_deploy.mc_export.export.parity import check_rows, compare
from metacanvas_deploy.mc_export.tensorrt.builder import BuildOptions, build_engine, timing_cache_path
from metacanvas_deploy.mc_export.tensorrt.export_folder import StageExport, TensorRTExport, read_export
from metacanvas_deploy.mc_export.tensorrt.precision import GATE_TOLERANCE, check_precision
from metacanvas_deploy.mc_export.tensorrt.profiles import profile_shapes
from metacanvas_deploy.runtime.bundle import load_bundle, write_bundle
from metacanvas_deploy.runtime.errors import BundleError, MetaCanvasRuntimeError
from metacanvas_deploy.runtime.manifest import EngineEntry, Manifest
from metacanvas_deploy.runtime.memory import rss_phase

INSTALL = ("pip install tensorrt-cu12==10.16.1.11 cuda-python==12.9.4 (the `gpu` extra of metacanvas-deploy); on a "
           "Jetson, JetPack's TensorRT (apt install python3-libnvinfer) and the cuda-python of its CUDA")


def build_engines(export_dir: str | Path, out: str | Path, log=print, timing_cache_dir: Path | None = None) -> Path:
    """Build the bundle ``out`` from the TensorRT export ``export_dir`` on this machine's GPU; returns its path.
    A bundle at ``out`` with the same key (export, GPU, TensorRT) that verifies is left as it is."""
    trt = _tensorrt()
    export = read_export(export_dir)
    identity = _device()
    check_precision(export.precision, identity)
    out = Path(out)
    key = bundle_key(export, identity)
    if _cached(out, key):
        log(f"{out}: up to date (cache key {key[:12]}), nothing to build")
        return out
    options = BuildOptions(precision=export.precision, timing_cache=timing_cache_path(identity, timing_cache_dir))
    entries = {stage: s.spec.engine_entry(f"{stage}.plan", "tensorrt", trt.__version__, export.precision,
                                          device=identity) for stage, s in export.stages.items()}
    command = f"python -m mc_export engines --export {export.path} --out {out}"
    compose_manifest(export, entries, identity, key, command, {}, {})  # the skeleton fails here, not after builds
    log(f"building {', '.join(export.stages)} for {identity['gpu']} (SM {identity['compute_capability']}, TensorRT "
        f"{identity['tensorrt']}) at {export.precision} from {export.path}")
    started = time.perf_counter()

    def populate(tmp: Path) -> Manifest:
        gates, records = {}, {}
        for stage, s in export.stages.items():
            with rss_phase() as memory:
                gates[stage], records[stage] = _build_stage(export, stage, s, entries[stage], options, tmp, log)
            records[stage]["engine_peak_rss_mb"] = round(memory["peak_mb"], 1)
        shutil.copyfile(export.path / "tokenizer.json", tmp / "tokenizer.json")
        return compose_manifest(export, entries, identity, key, command, gates, records)

    write_bundle(out, populate)
    log(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return out


def bundle_key(export: TensorRTExport, identity) -> str:
    """The bundle's content key: the export's key, this GPU and TensorRT (engines are specific to both)."""
    payload = {"export": export.cache_key, "precision": export.precision, "device": dict(identity)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _build_stage(export: TensorRTExport, stage: str, s: StageExport, entry: EngineEntry, options: BuildOptions,
                 tmp: Path, log) -> tuple[str, dict]:
    """Build one engine into ``tmp`` and gate it. Returns (gate verdict, cost record)."""
    derived = profile_shapes(s.spec)
    if derived != dict(s.profile):
        raise BuildError(f"stage {stage!r}: the export records the profile {dict(s.profile)}, but its spec gives "
                         f"{derived} with this mc_export: the export was written by another version. Export again "
                         f"with this one: `{export.command or 'python -m mc_export build ... --export-only'}`")
    started = time.perf_counter()
    build_engine(export.path / s.onnx, s.spec, options, tmp / entry.file, log, prepared=True)
    built = time.perf_counter()
    gate = gate_engine(export, stage, tmp / entry.file, entry, log)
    return gate, {"engine_build_s": round(built - started, 2), "engine_gate_s": round(time.perf_counter() - built, 2),
                  "engine_bytes": (tmp / entry.file).stat().st_size}


def gate_engine(export: TensorRTExport, stage: str, plan: Path, entry: EngineEntry, log) -> str:
    """The engine of ``stage`` against the export's references for it; StageParityError on a miss. Returns the
    verdict for the manifest ("passed", or why there was nothing to gate against)."""
    from metacanvas_deploy.runtime.trt_engine import TrtEngine

    s = export.stages[stage]
    if not s.references:
        log(f"  {stage}: engine not gated: the export holds no references ({s.gate})")
        return f"not gated: the export holds no references ({s.gate})"
    tolerance = GATE_TOLERANCE.get(export.precision, s.spec.tolerance)
    engine = TrtEngine(plan, entry)
    try:
        rows = []
        for case, inputs, outputs in export.references(stage):
            got = engine(inputs)
            rows += [compare(stage, case, name, got[name], outputs[name]) for name in s.spec.output_names]
    finally:
        engine.close()
    check_rows(stage, rows, tolerance)
    worst = max(rows, key=lambda r: r.max_rel)
    log(f"  {stage}: engine parity ok against PyTorch (worst {worst.output} max_rel {worst.max_rel:.2e}, cosine "
        f"{min(r.cosine for r in rows):.7f})")
    return "passed"


def compose_manifest(export: TensorRTExport, entries: dict[str, EngineEntry], identity, key: str, command: str,
                     gates: dict[str, str], records: dict[str, dict]) -> Manifest:
    """The bundle's manifest: the export's skeleton with the engines, this GPU's TensorRT among the tools, the
    engine gates and costs beside the export's, and the command that rebuilds it from the export."""
    d = copy.deepcopy(dict(export.skeleton))
    build = d["build"]
    export_stages = build.get("stages", {})
    build.update(cache_key=key, command=command, target="tensorrt", parity=gates,
                 tools={**build["tools"], "tensorrt": identity["tensorrt"]},
                 stages={stage: {**export_stages.get(stage, {}), **records.get(stage, {})} for stage in entries},
                 export={"cache_key": export.cache_key, "command": export.command, "path": str(export.path),
                         "parity": build["parity"], "created_at": build.get("created_at")},
                 created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    d["engines"] = {stage: entry.to_dict() for stage, entry in entries.items()}
    return Manifest.from_dict(d)


def _tensorrt():
    """tensorrt, after checking that it and cuda-python import; BuildError naming what to install."""
    try:
        import tensorrt as trt
        from cuda.bindings import runtime  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: a wheel whose native libraries are missing
        raise BuildError(f"building engines needs TensorRT 10 and cuda-python on this GPU machine ({e}). Install "
                         f"them: {INSTALL}") from e
    return trt


def _device() -> dict:
    from metacanvas_deploy.runtime.trt_engine import device_identity

    try:
        return device_identity()
    except BundleError as e:
        raise BuildError(f"no usable GPU here ({e}); run `python -m mc_export engines` on the GPU machine the "
                         "bundle is for") from None


def _cached(out: Path, key: str) -> bool:
    if not (out / "manifest.json").is_file():
        return False
    try:
        return load_bundle(out).manifest.build.get("cache_key") == key
    except MetaCanvasRuntimeError:
        return False
