"""Weight-only stages straight from the checkpoint, in bounded memory: no float bundle, no fp32 graph on disk.

A lazy model (`--lazy-weights`, `mc_export.models.lazy`) whose recipe quantizes only weight-only stages (w8/w4) is
built in one pass: every stage is exported as in a float build, except that each weight-only stage's weights are
quantized tensor by tensor while they stream from the checkpoint's safetensors into its ONNX file
(`export_component(graph_transform=...)`, `calib.weight_only_graph`): at most one layer's fp32 weight and its codes
are in memory at a time, and the stage's fp32 graph never exists. A full-size 4-bit planner therefore needs about
its quantized size on disk (~1/7 of fp32) and neither the fp32 planner bundle nor its 30 GB of fp32 weights.

The gate of such a stage has no float bundle to compare with: it is the PyTorch fp32 stage (loaded alone, or with
its weights streamed block by block when it does not fit: `stages.gate_stage`), on the stage's own gate inputs at
the small profile shapes, with the recipe's looser weight-only tolerance (``streamed_min_cosine``, every output's
cosine; ``streamed_max_rel``). Each stage's layers, kept-float list, gate rows and the recipe (with its sha256) go
into the manifest under ``build.quantization`` (mode "streamed"); `verify` re-runs the same gate.

Models that fit memory take the calibrated path instead (`mc_export.quantized`): float bundle first, then each
weight-only stage gated on held-out requests end to end (PSNR) with the sensitivity fallback.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import onnx

from metacanvas_deploy.calib import weight_only_graph as wg
from metacanvas_deploy.calib.errors import AccuracyBudgetError
from metacanvas_deploy.calib.graph import op_counts
from metacanvas_deploy.calib.recipes import WEIGHT_ONLY, Recipe
from metacanvas_deploy.calib.weight_only_stage import WEIGHT_ONLY_OPS, chooser, embedding_spec
from metacanvas_deploy.mc_export import writer as w
from metacanvas_deploy.mc_export.components.spec_data import Tolerance
from metacanvas_deploy.mc_export.errors import ConfigError, StageParityError
from metacanvas_deploy.mc_export.export.onnx_export import export_component
from metacanvas_deploy.mc_export.stages import gate_stage, plan_stages, stage_memory, tensorrt_engine, write_stages
from metacanvas_deploy.runtime.bundle import write_bundle
from metacanvas_deploy.runtime.memory import rss_phase

MODE = "streamed"


def linear_shapes(module) -> dict[str, tuple[int, int]]:
    """Weight name -> (K, N) of every `nn.Linear` in a stage's PyTorch module, named as its export names the MatMul
    weights (module paths): what a recipe's weight-only plan is checked against before any export. (A superset of
    the graph's layers: a module the stage's graph does not run is listed too.)"""
    from torch import nn

    return {f"{name}.weight": (m.in_features, m.out_features) for name, m in module.named_modules()
            if isinstance(m, nn.Linear)}


def check_stages(components, recipe: Recipe) -> None:
    """Before any export: int8/fp8 only where their gate applies (a denoise step's update), and every weight-only
    stage's layers from the PyTorch module (`nn.Linear`, named as the export names them): a block size that does
    not divide a quantized layer's K, or a stage with nothing to quantize, is a RecipeError here."""
    from metacanvas_deploy.calib.weight_only_stage import plan_layers

    for stage in recipe.stages:
        comp = components[stage]
        if recipe.format_of(stage) not in WEIGHT_ONLY:
            if "next_sample" not in comp.spec.output_names:
                raise ConfigError(f"{stage}: {recipe.format_of(stage)} calibration gates a denoise step's update; "
                                  f"{stage} is not one: quantize it weight-only (w8 or w4) or leave it fp32")
            continue
        plan_layers(recipe, stage, linear_shapes(comp.module()))


def streams(recipe: Recipe, model) -> bool:
    """Whether a build takes this path: lazy weights, and every stage the recipe quantizes weight-only, round to
    nearest (AWQ searches its scales on calibration calls, which need the float bundle)."""
    return getattr(model, "lazy_weights", None) is not None and all(
        recipe.format_of(s) in WEIGHT_ONLY and recipe.method_of(s) == "rtn" for s in recipe.stages)


def tolerance(recipe: Recipe) -> Tolerance:
    """The gate of a weight-only stage against the PyTorch fp32 stage (no float bundle)."""
    return Tolerance(max_rel=recipe.streamed_max_rel, min_cosine=recipe.streamed_min_cosine)


def build_streamed(cfg, model, recipe: Recipe, ranges, steps: int, key: str, log) -> Path:
    """Write ``cfg.out``: the recipe's weight-only stages quantized while their weights stream, the other stages
    as a float build writes them."""
    components = plan_stages(model, ranges)
    check_stages(components, recipe)
    weights = model.lazy_weights
    log(f"building {model.cfg.backbone} for {cfg.target} from the checkpoint, {', '.join(recipe.stages)} weight-only "
        f"while streaming ({recipe.name}, {recipe.digest()[:12]}); no float bundle")
    float_cfg = dataclasses.replace(cfg, precision="fp32", recipe=None, stage_precision=())

    def populate(tmp: Path):
        engines, files, gates, records, stages_q = {}, {}, {}, {}, {}
        floats = {s: c for s, c in components.items() if s not in recipe.stages}
        written = write_stages(floats, tmp, float_cfg, log, weights)
        for stage, comp in components.items():
            if stage in floats:
                engines[stage], gates[stage] = written.engines[stage], written.gates[stage]
                records[stage] = written.records[stage]
                files.update({n: "" for n in written.engines[stage].external_data})
                continue
            entry, gates[stage], records[stage], stages_q[stage] = _stage(comp, tmp, cfg, recipe, weights, log)
            engines[stage] = entry
            files.update({n: "" for n in entry.external_data})
        model.tokenizer.tokenizer.save(str(tmp / "tokenizer.json"))
        files["tokenizer.json"] = ""
        quantization = {"mode": MODE, "reference": "the PyTorch fp32 stage, weights from the checkpoint (no float "
                        "bundle)", "stages": stages_q}
        return w.manifest(cfg, model, ranges, steps, key, engines, files, gates, quantization, records)

    write_bundle(cfg.out, populate)
    return Path(cfg.out)


def _stage(comp, tmp: Path, cfg, recipe: Recipe, weights, log):
    """One weight-only stage: exported quantized while streaming, placed (ORT) or built (TensorRT), gated against
    PyTorch; a missed gate moves the layers whose weights quantize worst one level up (4 -> 8 bits -> float, the
    recipe's ``fallback_fraction`` of those at the lowest level per round, at most ``max_fallback_rounds``) and
    exports again. Returns (entry, gate verdict, stage record, quantization record)."""
    from metacanvas_deploy.calib.weight_only_stage import bit_counts, plan_layers, raise_level

    stage = comp.spec.stage
    fmt = recipe.format_of(stage)
    layers = plan_layers(recipe, stage, linear_shapes(comp.module()))
    rounds, moved, scores = [], [], None
    for round_ in range(recipe.max_fallback_rounds + 1):
        done: dict = {}
        try:
            entry, rows, skipped, record = _attempt(comp, tmp, cfg, recipe, weights, layers, done, log)
            missed = None
        except StageParityError as e:
            missed = e
        for name in set(layers) - set(done.get("layers", {})):  # a module the stage's graph does not run
            del layers[name]
        rounds.append({**bit_counts(layers), "gate": str(missed) if missed else
                       "passed" if rows else f"not gated: {skipped}"})
        if missed is None:
            break
        if not layers or round_ == recipe.max_fallback_rounds:
            raise AccuracyBudgetError(
                f"{stage}: {recipe.name} ({fmt}) misses its gate against PyTorch fp32 after {len(rounds)} rounds "
                f"({len(moved)} layer moves up): {missed}. Relax streamed_min_cosine / streamed_max_rel in a recipe "
                "file (--recipe), raise max_fallback_rounds, use w8, or build fp32") from missed
        if scores is None:
            scores = weight_scores(comp.module(), weights, layers, recipe, log, stage)
        step = raise_level(layers, scores, recipe.fallback_fraction)
        moved += step
        log(f"  {stage}: round {round_} ({rounds[-1]['layers_4bit']} layers in 4 bits, {rounds[-1]['layers_8bit']} "
            f"in 8) missed its gate; {len(step)} layers move up ({step[0]}{', ...' if len(step) > 1 else ''}), "
            "exporting again")
    gate = f"not gated: {skipped}" if skipped else "passed (weight-only tolerance, against PyTorch fp32)"
    final = tmp / entry.file
    ops = op_counts(onnx.load(str(final), load_external_data=False)) if cfg.target != "tensorrt" else {}
    quant = {"recipe": recipe.to_json(), "recipe_sha256": recipe.digest(), "precision": fmt,
             "quantized_layers": len(done.get("layers", {})), **done, "fallback": moved, "rounds": rounds,
             "kernels": {op: n for op, n in ops.items() if op in WEIGHT_ONLY_OPS},
             "gate": {"tolerance": dataclasses.asdict(tolerance(recipe)), "rows": [dataclasses.asdict(r) for r in rows]}}
    return entry, gate, record, quant


def weight_scores(module, weights, layers: dict[str, int], recipe: Recipe, log=None, label: str = "stage"
                  ) -> dict[str, float]:
    """The streamed fallback's ranking: each layer's weight noise-to-signal ratio at its bit width
    (`calib.weight_only.weight_error`), data-free (there is no float bundle to capture activations from), each
    weight read from the checkpoint on its own."""
    from metacanvas_deploy.calib import weight_only as wo
    from metacanvas_deploy.mc_export.progress import Progress

    refs = weights.refs(module)
    progress = Progress(f"{label}: quantization error of {len(layers)} layers", len(layers), log, unit_bytes=False)
    out = {}
    for name, bits in layers.items():
        w = refs[name].load().numpy().T  # (K, N), as the export stores it
        out[name] = wo.weight_error(w, wo.BlockSpec(bits, recipe.block_size, recipe.symmetric))
        progress.update(1)
    progress.close()
    return out


def _attempt(comp, tmp: Path, cfg, recipe: Recipe, weights, layers: dict[str, int], done: dict, log):
    """Export ``layers`` (weight name -> bits) quantized while streaming (the rewrite's record into ``done``),
    place or build it, gate it (raises StageParityError on a miss). Returns (entry, gate rows, why not gated,
    stage record)."""
    import onnxruntime as ort

    stage = comp.spec.stage
    fmt = recipe.format_of(stage)
    form = "dequantize" if cfg.target == "tensorrt" else "matmulnbits"

    def quantize(ir_model) -> None:
        done.update(wg.rewrite(ir_model, chooser(layers, recipe), form, embedding_spec(recipe, stage, form)).to_json())

    stage_cfg = dataclasses.replace(cfg, precision=fmt, recipe=None, stage_precision=())
    with tempfile.TemporaryDirectory(prefix="wo-") as scratch, rss_phase() as memory:
        raw = Path(scratch) / f"{stage}.onnx"
        started = time.perf_counter()
        log(f"  {stage}: exporting {fmt}, weights quantized as they stream")
        export_component(comp, raw, weights=weights, fused_attention=cfg.target != "tensorrt", log=log,
                         graph_transform=quantize)
        if cfg.target == "tensorrt":
            final, entry = tensorrt_engine(comp, raw, tmp, stage_cfg, log)
            engine = _trt(final, entry)
        else:
            final = tmp / f"{stage}.onnx"
            _place(raw, final)
            data = final.with_name(final.name + ".data")
            entry = comp.spec.engine_entry(final.name, "onnxruntime", ort.__version__, fmt,
                                           external_data=(data.name,) if data.exists() else ())
            engine = final
        exported = time.perf_counter()
        rows, skipped = gate_stage(comp, engine, weights, tolerance(recipe), log) if cfg.verify else ([], "--no-verify")
        gated = time.perf_counter()
    if rows:
        worst = min(rows, key=lambda r: r.cosine)
        bits = list(done.get("layers", {}).values())
        log(f"  {stage}: {len(bits)} layers in {fmt} ({bits.count(4)} in 4 bits, {bits.count(8)} in 8); gate ok "
            f"(worst cosine {worst.cosine:.6f} on {worst.output}, max_rel {max(r.max_rel for r in rows):.2e})")
    written = sum(f.stat().st_size for f in (final, *(tmp / n for n in entry.external_data)))
    record = {"export_s": round(exported - started, 2), "gate_s": round(gated - exported, 2), "bytes": written,
              **stage_memory(memory)}
    return entry, rows, skipped, record


def _place(raw: Path, final: Path) -> None:
    """ONNX Runtime's offline optimisation when the quantized graph fits the memory budget (a 4-bit 7B planner,
    ~5 GB, does), else the file as written (ORT optimises at load)."""
    from metacanvas_deploy.calib.graph import optimize_for_ort
    from metacanvas_deploy.mc_export.models.lazy import memory_budget

    size = sum(p.stat().st_size for p in (raw, raw.with_name(raw.name + ".data")) if p.exists())
    if size < memory_budget():
        optimize_for_ort(raw, final)
        return
    for src in (raw, raw.with_name(raw.name + ".data")):
        if src.exists():
            shutil.move(src, final.with_name(final.name + src.name[len(raw.name):]))


def _trt(plan: Path, entry):
    from metacanvas_deploy.runtime.trt_engine import TrtEngine

    return TrtEngine(plan, entry)
