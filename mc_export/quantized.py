"""`build --precision int8|fp8`: the float bundle first (built in the same pass, or found by its cache key), then
each stage the recipe quantizes calibrated on it (`calib.quantize`), gated against it, and written into a new
bundle beside it.

One pass: the model is loaded and hashed once (by `build.build`), and each quantized stage is exported once: the
float build keeps the raw export of the stages the recipe quantizes (the quantizer and TensorRT take the raw
graph, not ONNX Runtime's optimised one); only a float bundle found in the cache needs them exported again.

The float bundle stays at ``<out>-fp32`` (or ``--float-bundle DIR``): it is the accuracy reference
(`python -m calib report`) and a usable bundle in its own right. The quantized bundle copies every float stage
it does not quantize; its manifest (written by `build.manifest`, as every bundle's) records the recipe, its digest,
the layers kept or moved back to float and the measured accuracy (`build.quantization`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from metacanvas_deploy.calib.blockwise import check_recipe
from metacanvas_deploy.calib.errors import RecipeError
from metacanvas_deploy.calib.graph import external_data
from metacanvas_deploy.calib.quantize import quantize_stage
from metacanvas_deploy.calib.recipes import WEIGHT_ONLY, Recipe
from metacanvas_deploy.calib.weight_only_stage import quantize_weight_only_stage
from metacanvas_deploy.mc_export import writer as w
from metacanvas_deploy.mc_export.backbones import mixed_recipe_for_backbone, recipe_for_backbone
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.export.onnx_export import export_component
from metacanvas_deploy.mc_export.stages import plan_stages, tensorrt_engine
from metacanvas_deploy.mc_export.weight_only_build import build_streamed, check_stages, streams
from metacanvas_deploy.runtime.bundle import load_bundle, write_bundle
from metacanvas_deploy.runtime.manifest_fields import thaw


def float_bundle_path(cfg) -> Path:
    """Where the float reference bundle is built (or found, by its cache key): ``--float-bundle`` (one float
    bundle can serve an int8 and an fp8 build) or ``<out>-fp32``."""
    return Path(cfg.float_bundle) if cfg.float_bundle else Path(cfg.out).with_name(Path(cfg.out).name + "-fp32")


def calibration_state(cfg) -> Path:
    """``<out>.calib``: the block-by-block calibration's state (`calib.blockwise`), kept across runs until the
    bundle is written, so that an interrupted build resumes at its first unfinished block."""
    return Path(cfg.out).with_name(Path(cfg.out).name + ".calib")


def recipe_for(cfg, model) -> Recipe:
    """The build's recipe: the user's (--recipe FILE) or the backbone's default."""
    if cfg.recipe is not None:
        return cfg.recipe
    layers = getattr(model.transformer.config, "num_layers", None)
    if cfg.stage_precision:  # --stage-precision planner=w4,denoise=int8
        return mixed_recipe_for_backbone(model.cfg.backbone, dict(cfg.stage_precision), num_layers=layers,
                                         target=cfg.target)
    return recipe_for_backbone(model.cfg.backbone, cfg.precision, num_layers=layers, target=cfg.target)


def build_quantized(cfg, model, recipe: Recipe, ranges, steps: int, weights_digest: str, key: str, log) -> Path:
    """Build ``cfg.out`` at ``cfg.precision`` (int8 / fp8) with ``recipe``: the float bundle (same model, same
    pass), then each quantized stage from its one raw export."""
    if streams(recipe, model):  # lazy weights, weight-only stages: quantized while streaming, no float bundle
        return build_streamed(cfg, model, recipe, ranges, steps, key, log)
    components = plan_stages(model, ranges)
    missing = [s for s in recipe.stages if s not in components]
    if missing:
        raise ConfigError(f"recipe {recipe.name} quantizes {missing}, which a {model.cfg.backbone} bundle lacks "
                          f"(its stages: {', '.join(components)})")
    check_stages(components, recipe)
    check_calibration(components, recipe, tuple(model.cfg.tasks))
    for stage in recipe.stages:  # a resume state of another recipe: refused before the float build
        fmt = recipe.format_of(stage)
        if fmt not in WEIGHT_ONLY and recipe.calibration_pass == "block":  # the recipe `_quantize` passes on
            narrowed = dataclasses.replace(recipe, format=fmt, stage_formats=()) if recipe.stage_formats else recipe
            check_recipe(calibration_state(cfg) / stage, narrowed)
    float_cfg = dataclasses.replace(cfg, precision="fp32", recipe=None, float_bundle=None, out=float_bundle_path(cfg),
                                    stage_precision=())
    float_key = w.cache_key(float_cfg, model, ranges, steps, weights_digest)
    with tempfile.TemporaryDirectory(prefix="calib-") as scratch:
        scratch = Path(scratch)
        if w.cached(float_cfg.out, float_key):
            log(f"{float_cfg.out}: float bundle up to date (cache key {float_key[:12]})")
            shipped = thaw(load_bundle(float_cfg.out).manifest.build.get("stages", {}))
            raws = {stage: None if shipped.get(stage, {}).get("raw_export")
                    else _raw_export(components[stage], scratch, model, cfg.target) for stage in recipe.stages}
        else:  # None (here and above): the bundle ships that stage's raw export as it is (a lazy stage too large
            # to optimise: its record's ``raw_export``), and quantization starts from that file
            raws = w.build_float(float_cfg, model, ranges, steps, float_key, log, raw_dir=scratch,
                                 keep_raw=recipe.stages)
        float_bundle = load_bundle(float_cfg.out)
        raws = {stage: raw or float_bundle.engine_path(stage) for stage, raw in raws.items()}
        log(f"quantizing {', '.join(recipe.stages)} to {recipe.format} ({recipe.name}, {recipe.digest()[:12]})")

        def populate(tmp: Path):
            m = float_bundle.manifest
            engines, records = dict(m.engines), {}
            for stage in recipe.stages:
                q = _quantize(float_bundle.path, raws[stage], recipe, stage, scratch, cfg, model, log)
                stage_cfg = dataclasses.replace(cfg, precision=recipe.format_of(stage))
                engines[stage] = _place_quantized(q, components[stage], m.engines[stage], tmp, stage_cfg, log)
                records[stage] = {**q.manifest_record(recipe), "precision": recipe.format_of(stage)}
            replaced = {rel for stage in recipe.stages for rel in m.engines[stage].external_data}
            files = {rel: "" for rel in m.files if rel not in replaced}
            for rel in files:
                share(float_bundle.path / rel, tmp / rel)
            for stage, entry in m.engines.items():
                if stage not in recipe.stages:
                    share(float_bundle.path / entry.file, tmp / entry.file)
            files.update({rel: "" for stage in recipe.stages for rel in engines[stage].external_data})
            gates = dict(m.build.get("parity", {}))
            gates.update({stage: "against the float bundle (build.quantization)" for stage in recipe.stages})
            quantization = {"float_bundle": str(Path(float_cfg.out).resolve()), "float_cache_key": float_key,
                            "stages": records}
            records = {s: r for s, r in thaw(m.build.get("stages", {})).items() if s not in recipe.stages}
            return w.manifest(cfg, model, ranges, steps, key, engines, files, gates, quantization, records)

        write_bundle(cfg.out, populate)
    shutil.rmtree(calibration_state(cfg), ignore_errors=True)  # built: nothing left to resume
    return Path(cfg.out)


def check_calibration(components, recipe: Recipe, tasks: tuple[str, ...]) -> None:
    """Before any export: each calibrated (int8/fp8) stage's calibration set fits the recipe
    (`calib.capture.check_calibration_set`), and a block pass's ``block_pattern`` names blocks the stage's module
    has (module paths are the ONNX graph's name scopes: `calib.partition`)."""
    import re

    from metacanvas_deploy.calib.capture import check_calibration_set

    for stage in recipe.stages:
        if recipe.format_of(stage) in WEIGHT_ONLY:
            continue
        check_calibration_set(recipe, tasks)
        if recipe.calibration_pass == "block":
            blocks = [n for n, _ in components[stage].module().named_modules()
                      if re.fullmatch(recipe.block_pattern, n)]
            if not blocks:
                raise RecipeError(f"recipe {recipe.name}: block_pattern {recipe.block_pattern!r} names no block of "
                                  f"the {stage} stage; fix the recipe's block_pattern (e.g. the one `mc_export "
                                  "recipe` prints) or set calibration_pass 'whole'")


def _quantize(float_bundle: Path, raw: Path, recipe: Recipe, stage: str, scratch: Path, cfg, model, log):
    """One stage to its recipe format: weight-only (w8/w4: MatMulNBits for ONNX Runtime, blocked
    DequantizeLinear for TensorRT) or calibrated int8/fp8 (the recipe narrowed to that stage's format)."""
    low_memory = getattr(model, "lazy_weights", None) is not None
    fmt = recipe.format_of(stage)
    if fmt in WEIGHT_ONLY:
        form = "dequantize" if cfg.target == "tensorrt" else "matmulnbits"
        return quantize_weight_only_stage(float_bundle, raw, recipe, stage, scratch, log=log, low_memory=low_memory,
                                          form=form)
    narrowed = dataclasses.replace(recipe, format=fmt, stage_formats=()) if recipe.stage_formats else recipe
    return quantize_stage(float_bundle, raw, narrowed, stage, scratch, log=log, low_memory=low_memory,
                          state_dir=calibration_state(cfg) / stage)


def _raw_export(comp, scratch: Path, model, target: str) -> Path:
    """The stage's raw export, for a float bundle found in the cache (its files are ONNX Runtime's optimised
    graphs)."""
    raw = scratch / f"{comp.spec.stage}.raw.onnx"
    export_component(comp, raw, weights=getattr(model, "lazy_weights", None), fused_attention=target != "tensorrt")
    return raw


def share(src: Path, dst: Path) -> None:
    """A float stage the quantized bundle ships unchanged: a hard link to the float bundle's file where the
    filesystem allows (a full-size planner is 30 GB; no bundle file is ever written in place, a rebuilt bundle
    is a new folder renamed over the old one, so the link keeps the bytes it was verified with), else a copy."""
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(src, dst)


def _place_quantized(q, comp, float_entry, tmp: Path, cfg, log):
    """The quantized stage into the bundle: TensorRT's explicit quantization takes the Q/DQ graph; ONNX Runtime
    ships the optimised graph, integer kernels fused (named as the bundle names it)."""
    if cfg.target == "tensorrt":
        return tensorrt_engine(comp, q.qdq_path, tmp, cfg, log)[1]
    data = external_data(q.cpu_path)  # moved out of the calibration's scratch (one copy of a 5 GB DiT on disk)
    shutil.move(q.cpu_path, tmp / q.cpu_path.name)
    if data is not None:
        shutil.move(data, tmp / data.name)
    return dataclasses.replace(float_entry, file=q.cpu_path.name, sha256="", size_bytes=0, precision=cfg.precision,
                               external_data=(data.name,) if data is not None else ())
