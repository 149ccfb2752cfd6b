"""Which stages a bundle holds, and how each is exported, gated and written into it."""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

from tqdm import tqdm

from mc_export.components.planner import PlannerComponent
from mc_export.components.ranges import BuildRanges
from mc_export.components.spec import Component
from mc_export.components.vision import VisionComponent
from mc_export.export.onnx_export import export_component, optimize_for_ort, parity_gate

# Tasks whose planner sees images or video (vision encoder stage).
_VISION_TASKS = {"edit", "i2v", "v2v", "r2v"}


def scheduler_history(model) -> int:
    """K, the multistep history of the backbone's scheduler plan (0 for Euler)."""
    from mc_export.components.common import scheduler_config
    from runtime.schedulers import make_plan

    return make_plan(scheduler_config(model.adapter), 2, image_seq_len=256).history


def plan_stages(model, ranges: BuildRanges) -> dict[str, Component]:
    """Stage name -> component, in run order. The backbone module (`mc_export.components.<backbone>`) says
    which denoise and VAE stages its tasks need."""
    stages: dict[str, Component] = {}
    if _VISION_TASKS & set(model.cfg.tasks):
        stages["vision_encoder"] = VisionComponent(model, ranges)
    stages["planner"] = PlannerComponent(model, ranges)
    backbone = importlib.import_module(f"mc_export.components.{model.cfg.backbone}")
    stages.update(backbone.stage_components(model, ranges, scheduler_history(model)))
    return stages


def write_stages(components: dict[str, Component], bundle_dir: Path, cfg, log) -> tuple[dict, dict]:
    """Export, optimise and gate every stage into ``bundle_dir``. Returns (engines, extra files) for the
    manifest. A stage that misses its tolerance raises StageParityError and the bundle is never written."""
    import onnxruntime as ort

    engines, files = {}, {}
    with tempfile.TemporaryDirectory(prefix="mc_export-") as scratch:
        bar = tqdm(components.items(), desc="stages", unit="stage", disable=None)
        for stage, comp in bar:
            bar.set_postfix_str(stage)
            raw = Path(scratch) / f"{stage}.onnx"
            export_component(comp, raw)
            final = bundle_dir / f"{stage}.onnx"
            optimize_for_ort(raw, final)
            if cfg.verify:
                rows = parity_gate(comp, final)
                worst = max(rows, key=lambda r: r.max_rel)
                log(f"  {stage}: parity ok (worst {worst.output} max_rel {worst.max_rel:.2e}, "
                    f"cosine {min(r.cosine for r in rows):.7f})")
            external = tuple(p.name for p in bundle_dir.glob(f"{stage}.onnx.data"))
            files.update({name: "" for name in external})
            engines[stage] = comp.spec.engine_entry(final.name, "onnxruntime", ort.__version__, cfg.precision,
                                                    external_data=external)
    return engines, files
