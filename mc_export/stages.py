"""Which stages a bundle holds, and how each is exported, gated and written into it."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from metacanvas_deploy.calib.graph import optimize_for_ort
from metacanvas_deploy.mc_export import backbones
from metacanvas_deploy.mc_export.components.planner import PlannerComponent
from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.components.spec import Component
from metacanvas_deploy.mc_export.components.vision import VisionComponent
from metacanvas_deploy.mc_export.export.onnx_export import export_component, parity_gate
from metacanvas_deploy.runtime.memory import rss_phase

# Tasks whose planner sees images or video (vision encoder stage).
_VISION_TASKS = {"edit", "i2v", "v2v", "r2v"}


def scheduler_history(model) -> int:
    """K, the multistep history of the backbone's scheduler plan (0 for Euler)."""
    from metacanvas_deploy.mc_export.components.common import scheduler_config
    from metacanvas_deploy.runtime.schedulers import make_plan

    return make_plan(scheduler_config(model.adapter), 2, image_seq_len=256).history


def plan_stages(model, ranges: BuildRanges, cache: bool = False) -> dict[str, Component]:
    """Stage name -> component, in run order. The backbone's record (`mc_export.backbones`) says which denoise
    and VAE stages its tasks need; ``cache``: step caching's FULL and CACHED steps (`components.step_cache`) in
    place of the one denoise step."""
    stages: dict[str, Component] = {}
    if _VISION_TASKS & set(model.cfg.tasks):
        stages["vision_encoder"] = VisionComponent(model, ranges)
    stages["planner"] = PlannerComponent(model, ranges)
    backbone = backbones.get(model.cfg.backbone)
    stages.update(backbone.stage_components(model, ranges, scheduler_history(model)))
    if cache:
        from metacanvas_deploy.mc_export.components.step_cache import cache_stages

        stages = cache_stages(stages, backbone.cache_layout)
    return stages


def gate_stage(comp: Component, engine, weights=None, tolerance=None, log=None) -> tuple[list, str]:
    """The stage's parity gate (raises StageParityError on a miss) for an ONNX file or an engine callable.
    With lazy ``weights``, the stage's reference is loaded alone when it fits the memory budget, else run with
    its weights streamed block by block (`models.streaming`); only a stage whose resident part and largest block
    together exceed the budget is not gated. Returns (rows, why not gated): rows empty when skipped."""
    from metacanvas_deploy.mc_export.models.lazy import fp32_bytes, materialized, memory_budget
    from metacanvas_deploy.mc_export.models.streaming import resident_bytes, stream_units, streamed

    if weights is None:
        return parity_gate(comp, engine, tolerance=tolerance), ""
    module = comp.module()
    need, budget = fp32_bytes(module), memory_budget()
    if need <= budget:  # a lazy model is large: its engine's weights are mapped for the gate, not copied
        with materialized(module, weights):
            return parity_gate(comp, engine, tolerance=tolerance, mapped=True), ""
    resident, block = resident_bytes(module)
    if resident + block > budget:
        return [], (f"even streamed block by block, {(resident + block) / 2**30:.1f} GiB of fp32 weights (resident "
                    f"{resident / 2**30:.1f} GiB + the largest block) > the {budget / 2**30:.1f} GiB budget; run "
                    f"`python -m mc_export verify --bundle DIR` on a machine with ~{3 * need / 2**30:.0f} GiB")
    from metacanvas_deploy.mc_export.progress import Progress

    cases = 2  # parity_gate's default: the opt and min profile points
    progress = Progress(f"{comp.spec.stage}: gate, reference streamed block by block",
                        cases * len(stream_units(module)), log, unit_bytes=False)
    with streamed(module, weights, on_block=lambda: progress.update(1)):
        rows = parity_gate(comp, engine, tolerance=tolerance, mapped=True)
    progress.close()
    return rows, ""


def _place(raw: Path, final: Path, weights, comp: Component) -> bool:
    """ORT's offline optimisation into the bundle, or (a lazy stage larger than the memory budget: ORT would
    hold all of it) the raw export moved as it is; ORT then optimises at load time. Returns whether the bundle's
    file is the raw export (the stage record's ``raw_export``: a quantized build then starts from that file)."""
    from metacanvas_deploy.mc_export.models.lazy import fp32_bytes, memory_budget

    if weights is not None and fp32_bytes(comp.module()) > memory_budget():
        for src in (raw, raw.with_name(raw.name + ".data")):
            if src.exists():
                shutil.move(src, final.with_name(final.name + src.name[len(raw.name):]))
        return True
    optimize_for_ort(raw, final)
    return False


@dataclass
class WrittenStages:
    """What `write_stages` leaves for the manifest: engine entries, extra files (external data), each stage's
    gate verdict ("passed" or why not gated), the raw exports kept for quantization (path, or None where the
    bundle's own file is that raw export), and per-stage records: seconds to export and to gate, peak resident and
    private memory, bytes written."""

    engines: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)
    raws: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)


def write_stages(components: dict[str, Component], bundle_dir: Path, cfg, log, weights=None,
                 raw_dir: Path | None = None, keep_raw: tuple[str, ...] = ()) -> WrittenStages:
    """Export, optimise and gate every stage into ``bundle_dir``. A stage that misses its tolerance raises
    StageParityError and the bundle is never written. ``weights``: lazy weights (`mc_export.models.lazy`). The
    raw exports of the ``keep_raw`` stages stay in ``raw_dir`` (quantization starts from them)."""
    out = WrittenStages()
    with tempfile.TemporaryDirectory(prefix="mc_export-") as scratch:
        bar = tqdm(components.items(), desc="stages", unit="stage", disable=None)
        for stage, comp in bar:
            bar.set_postfix_str(stage)
            kept = stage in keep_raw and raw_dir is not None
            raw = (Path(raw_dir) / f"{stage}.raw.onnx") if kept else Path(scratch) / f"{stage}.onnx"
            with rss_phase() as memory:
                entry, out.gates[stage], out.records[stage] = _write_stage(comp, raw, bundle_dir, cfg, log, weights)
            out.records[stage].update(stage_memory(memory))
            out.files.update({name: "" for name in entry.external_data})
            out.engines[stage] = entry
            if kept:
                out.raws[stage] = raw if raw.exists() else None
    return out


def stage_memory(memory: dict) -> dict:
    """A stage record's memory fields from its `rss_phase` record."""
    return {"peak_rss_mb": round(memory["peak_mb"], 1), "end_private_mb": memory["end_private_mb"],
            "memory_scope": memory["scope"]}


def _write_stage(comp: Component, raw: Path, bundle_dir: Path, cfg, log, weights):
    """One stage: export, place (ORT) or build (TensorRT), gate. Returns (entry, gate verdict, record)."""
    import onnxruntime as ort

    stage = comp.spec.stage
    started = time.perf_counter()
    export_component(comp, raw, weights=weights, fused_attention=cfg.target != "tensorrt", log=log)
    shipped_raw = False
    if cfg.target == "tensorrt":
        final, entry = tensorrt_engine(comp, raw, bundle_dir, cfg, log)
    else:
        final = bundle_dir / f"{stage}.onnx"
        if cfg.target == "onnxruntime-gpu":
            from metacanvas_deploy.mc_export.ort_gpu import prepare

            prepare(raw, final, cfg.precision, raw.parent)
        else:
            shipped_raw = _place(raw, final, weights, comp)
        entry = comp.spec.engine_entry(final.name, "onnxruntime", ort.__version__, cfg.precision,
                                       external_data=_external(bundle_dir, stage))
    exported = time.perf_counter()
    gate = "not run (--no-verify)"
    if cfg.verify:
        log(f"  {stage}: exported in {exported - started:.0f} s; gating against PyTorch")
        rows, skipped = gate_stage(comp, _gate_engine(final, entry, cfg), weights, _tolerance(cfg), log)
        gate = f"not gated: {skipped}" if skipped else "passed"
        if rows:
            worst = max(rows, key=lambda r: r.max_rel)
            log(f"  {stage}: parity ok (worst {worst.output} max_rel {worst.max_rel:.2e}, "
                f"cosine {min(r.cosine for r in rows):.7f})")
        else:
            log(f"  {stage}: parity gate skipped: {skipped}")
    written = sum(f.stat().st_size for f in (final, *(bundle_dir / n for n in entry.external_data)))
    return entry, gate, {"export_s": round(exported - started, 2),
                         "gate_s": round(time.perf_counter() - exported, 2), "bytes": written,
                         "raw_export": shipped_raw}


def _external(bundle_dir: Path, stage: str) -> tuple[str, ...]:
    return tuple(p.name for p in bundle_dir.glob(f"{stage}.onnx.data"))


def _tolerance(cfg):
    """Reduced-precision engines (TensorRT, ONNX Runtime's CUDA provider in fp16) are held to their rounding."""
    from metacanvas_deploy.mc_export.tensorrt.precision import GATE_TOLERANCE

    return GATE_TOLERANCE.get(cfg.precision) if cfg.target in ("tensorrt", "onnxruntime-gpu") else None


def _gate_engine(final: Path, entry, cfg):
    """What the gate runs: the ONNX file (CPU), the engine (TensorRT), the session on the GPU's execution
    provider (ONNX Runtime's CUDA or TensorRT provider: the gate builds and caches TensorRT's engine)."""
    if cfg.target == "tensorrt":
        return _trt_runner(final, entry)
    if cfg.target == "onnxruntime-gpu":
        from metacanvas_deploy.mc_export.device import gpu_identity
        from metacanvas_deploy.mc_export.ort_gpu import cuda_runner
        from metacanvas_deploy.runtime.bundle_verify import sha256_file

        # the entry as the bundle will hold it: TensorRT's provider then caches its engine where a load finds it
        digest = sha256_file(final)[0]
        return cuda_runner(final, dataclasses.replace(entry, device=gpu_identity(cfg), sha256=digest))
    return final


def tensorrt_engine(comp: Component, raw: Path, bundle_dir: Path, cfg, log):
    """Build the stage's TensorRT engine from the raw export (TensorRT cannot parse ONNX Runtime's fused ops)
    into ``<stage>.plan``; returns (path, manifest entry with the GPU's identity)."""
    import tensorrt as trt

    from metacanvas_deploy.mc_export.tensorrt.builder import BuildOptions, build_engine, timing_cache_path
    from metacanvas_deploy.runtime.trt_engine import device_identity

    plan = bundle_dir / f"{comp.spec.stage}.plan"
    options = BuildOptions(precision=cfg.precision, timing_cache=timing_cache_path(device_identity()))
    identity = build_engine(raw, comp.spec, options, plan, log)
    return plan, comp.spec.engine_entry(plan.name, "tensorrt", trt.__version__, cfg.precision, device=identity)


def _trt_runner(plan: Path, entry):
    from metacanvas_deploy.runtime.trt_engine import TrtEngine

    return TrtEngine(plan, entry)
