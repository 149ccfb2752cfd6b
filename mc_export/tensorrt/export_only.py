"""`build --target tensorrt --export-only`: everything a TensorRT build needs except the GPU, written on a machine
that has none (`export_folder` describes the folder). The GPU machine then turns it into a bundle without torch or
the checkpoint (`target_build`, `python -m mc_export engines`).

Per stage, in one pass: the export TensorRT parses (decomposed attention, no ONNX Runtime-only ops), weights
stored in 16 bits for fp16/bf16 as they are written and sequences lowered (`half_weights`), the graph checks a
TensorRT build makes (`builder.check_onnx`), then the stage's parity gate run by ONNX Runtime on that very file
against the PyTorch reference, at the precision's tolerance (`precision.GATE_TOLERANCE`; the spec's for fp32).
The gate's inputs and PyTorch outputs are kept as the references the GPU machine gates each engine against, so
the references are exactly what the export was checked with (lazy weights included: `stages.gate_stage`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from metacanvas_deploy.mc_export.errors import ExportFolderError
from metacanvas_deploy.mc_export.export.onnx_export import export_component
from metacanvas_deploy.mc_export.stages import gate_stage, plan_stages, stage_memory
from metacanvas_deploy.mc_export.tensorrt.builder import check_onnx
from metacanvas_deploy.mc_export.tensorrt.export_folder import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    WEIGHTS_DTYPE,
    read_export,
    save_references,
    stage_record,
    write_export,
)
from metacanvas_deploy.mc_export.tensorrt.half_weights import finish_graph, store_weights
from metacanvas_deploy.mc_export.tensorrt.precision import GATE_TOLERANCE, rule
from metacanvas_deploy.mc_export.tensorrt.profiles import profile_shapes
from metacanvas_deploy.mc_export.writer import cache_key, manifest
from metacanvas_deploy.runtime.memory import rss_phase


def export_key(cfg, model, ranges, steps: int, weights_digest: str) -> str:
    """The export's content key: the key of a CPU build of the same model, config and tools, marked as an export
    of this format (no GPU identity: the export is the same for every GPU)."""
    base = cache_key(_here(cfg), model, ranges, steps, weights_digest)
    payload = {"kind": EXPORT_FORMAT, "version": EXPORT_VERSION, "precision": cfg.precision, "base": base}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def export_for_tensorrt(cfg, model, ranges, steps: int, weights_digest: str, log=print) -> Path:
    """Write the TensorRT export ``cfg.out`` for ``model`` (loaded and hashed by `build.build`, ``cfg`` validated
    there: fp32/fp16/bf16); returns its path.
    An export with the same key that verifies is left as it is. StageParityError (nothing written) when a stage's
    graph misses its tolerance on ONNX Runtime."""
    key = export_key(cfg, model, ranges, steps, weights_digest)
    out = Path(cfg.out)
    if _up_to_date(out, key):
        log(f"{out}: up to date (export key {key[:12]}), nothing to export")
        return out
    components = plan_stages(model, ranges)
    weights = getattr(model, "lazy_weights", None)
    log(f"exporting {model.cfg.backbone} ({cfg.preset or 'checkpoint'}) for TensorRT {cfg.precision} on this "
        f"machine (engines are built on the GPU machine): stages {', '.join(components)}")

    def populate(tmp: Path) -> dict:
        stages, records = {}, {}
        for stage, comp in components.items():
            with rss_phase() as memory:
                stages[stage], records[stage] = _export_stage(comp, tmp, cfg, weights, log)
            records[stage].update(stage_memory(memory))
        model.tokenizer.tokenizer.save(str(tmp / "tokenizer.json"))
        skeleton = _skeleton(cfg, model, ranges, steps, key, components, stages, records)
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "precision": cfg.precision,
                "weights_dtype": WEIGHTS_DTYPE[cfg.precision], "cache_key": key,
                "command": skeleton["build"]["command"], "manifest": skeleton, "stages": stages}

    write_export(out, populate)
    return out


def _export_stage(comp, folder: Path, cfg, weights, log) -> tuple[dict, dict]:
    """One stage into ``folder``: its graph, gate and references. Returns (index record, cost record)."""
    stage = comp.spec.stage
    started = time.perf_counter()
    final, weights_record = folder / f"{stage}.onnx", {}

    def store(model):  # while the weights stream into the file: no float32 copy of a 16-bit stage is written
        weights_record.update(store_weights(model, cfg.precision))

    # TensorRT fuses attention itself
    export_component(comp, final, weights=weights, fused_attention=False, graph_transform=store, log=log)
    finish_graph(final)
    check_onnx(final, rule(cfg.precision))
    exported = time.perf_counter()
    references, gate = _gate(comp, final, folder, cfg, weights, log)
    external = tuple(p.name for p in folder.glob(f"{stage}.onnx.data"))
    log(f"  {stage}: {weights_record['converted']} weights in {weights_record['dtype']} "
        f"({weights_record['bytes_before'] / 2**20:.1f} -> {weights_record['bytes_after'] / 2**20:.1f} MiB)")
    record = stage_record(comp.spec, final.name, external, profile_shapes(comp.spec), references, gate,
                          weights_record)
    cost = {"export_s": round(exported - started, 2), "gate_s": round(time.perf_counter() - exported, 2),
            "bytes": sum(f.stat().st_size for f in (final, *(folder / n for n in external)))}
    return record, cost


class _Recorded:
    """A component whose PyTorch reference outputs are kept, with the inputs they were computed on, as the gate
    runs it (`stages.gate_stage` calls ``reference`` once per case, in the case order of its rows)."""

    def __init__(self, comp):
        self._comp, self.calls = comp, []

    def __getattr__(self, name):
        return getattr(self._comp, name)

    def reference(self, feeds):
        out = self._comp.reference(feeds)
        self.calls.append(({k: np.array(v) for k, v in feeds.items()}, out))
        return out


def _gate(comp, onnx_path: Path, folder: Path, cfg, weights, log) -> tuple[dict, str]:
    """The stage's gate on ONNX Runtime (the file as shipped) and the references it leaves:
    ({case: (inputs file, outputs file)}, verdict)."""
    if not cfg.verify:
        return {}, "not run (--no-verify)"
    recorded = _Recorded(comp)
    rows, skipped = gate_stage(recorded, onnx_path, weights, GATE_TOLERANCE.get(cfg.precision), log)
    if skipped:
        log(f"  {comp.spec.stage}: not gated here and no references for the GPU machine: {skipped}")
        return {}, f"not gated: {skipped}"
    cases = list(dict.fromkeys(r.case for r in rows))
    worst = max(rows, key=lambda r: r.max_rel)
    log(f"  {comp.spec.stage}: parity ok on ONNX Runtime (worst {worst.output} max_rel {worst.max_rel:.2e}, "
        f"cosine {min(r.cosine for r in rows):.7f})")
    return {case: save_references(folder, comp.spec.stage, case, feeds, outs)
            for case, (feeds, outs) in zip(cases, recorded.calls, strict=True)}, "passed"


def _skeleton(cfg, model, ranges, steps: int, key: str, components, stages: dict, records: dict) -> dict:
    """The runtime manifest without its engines, from the one manifest writer (`writer.manifest`), validated
    here: it is given provisional entries (the stage graphs, as ONNX Runtime would name them), which the GPU
    machine replaces by its engines, and this machine's tool versions (TensorRT's are added there)."""
    import onnxruntime as ort

    provisional = {stage: comp.spec.engine_entry(stages[stage]["onnx"], "onnxruntime", ort.__version__,
                                                 cfg.precision) for stage, comp in components.items()}
    gates = {stage: s["gate"] for stage, s in stages.items()}
    skeleton = manifest(_here(cfg), model, ranges, steps, key, provisional, {"tokenizer.json": ""}, gates,
                        stage_records=records).to_dict()
    del skeleton["engines"]
    skeleton["build"]["target"] = "tensorrt"
    return skeleton


def _here(cfg):
    """The config as this machine serves it: its tools and no GPU (the export is the same for every GPU)."""
    return dataclasses.replace(cfg, target="onnxruntime")


def _up_to_date(out: Path, key: str) -> bool:
    """An export with the same key that verifies (hashes included) is a cache hit; anything else is rewritten."""
    try:
        return read_export(out).cache_key == key
    except ExportFolderError:
        return False
