"""`mc_export build --precision int8|fp8`: the float bundle first (built or taken from the cache), then each
quantized stage calibrated on it, gated against it, and written into a new bundle beside it.

The float bundle stays at ``<out>-fp32`` (or ``--float-bundle DIR``): it is the accuracy reference
(`python -m calib report`) and a usable bundle in its own right. The quantized bundle copies every float stage
it does not quantize and records the recipe, its digest, the layers kept or moved back to float and the
measured accuracy in its manifest (`build.quantization`). For TensorRT the quantized stage's engine is built
from the Q/DQ graph (explicit quantization); the gates ran on ONNX Runtime's execution of the same graph.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from metacanvas_deploy.calib.graph import external_data
from metacanvas_deploy.calib.quantize import quantize_stage
from metacanvas_deploy.calib.recipes import Recipe, default_recipe


def float_bundle_path(cfg) -> Path:
    """Where the float reference bundle is built (or found, by its cache key): ``--float-bundle`` (one float
    bundle can serve an int8 and an fp8 build) or ``<out>-fp32``."""
    return Path(cfg.float_bundle) if cfg.float_bundle else Path(cfg.out).with_name(Path(cfg.out).name + "-fp32")


def recipe_for(cfg, model) -> Recipe:
    """The build's recipe: the user's (--recipe FILE) or the backbone's default."""
    if cfg.recipe is not None:
        return cfg.recipe
    layers = getattr(model.transformer.config, "num_layers", None)
    return default_recipe(model.cfg.backbone, cfg.precision, num_layers=layers, target=cfg.target)


def build_quantized(cfg, model, ranges, key: str, log) -> Path:
    """Build ``cfg.out`` at ``cfg.precision`` (int8 / fp8) from the float bundle at ``<out>-fp32``."""
    from metacanvas_deploy.mc_export.build import build
    from metacanvas_deploy.mc_export.export.onnx_export import export_component
    from metacanvas_deploy.mc_export.stages import plan_stages, tensorrt_engine
    from metacanvas_deploy.runtime.bundle import load_bundle, write_bundle

    recipe = recipe_for(cfg, model)
    float_out = build(dataclasses.replace(cfg, precision="fp32", recipe=None, float_bundle=None,
                                          out=float_bundle_path(cfg)), log)
    float_bundle = load_bundle(float_out)
    components = plan_stages(model, ranges)
    missing = [s for s in recipe.stages if s not in components]
    if missing:
        from metacanvas_deploy.mc_export.errors import ConfigError

        raise ConfigError(f"recipe {recipe.name} quantizes {missing}, which a {model.cfg.backbone} bundle lacks")
    log(f"quantizing {', '.join(recipe.stages)} to {recipe.format} ({recipe.name}, {recipe.digest()[:12]})")

    def populate(tmp: Path):
        m = float_bundle.manifest
        engines, records = dict(m.engines), {}
        with tempfile.TemporaryDirectory(prefix="calib-") as scratch:
            for stage in recipe.stages:
                raw = Path(scratch) / f"{stage}.raw.onnx"
                export_component(components[stage], raw)
                q = quantize_stage(float_out, raw, recipe, stage, Path(scratch), log=log,
                                   low_memory=getattr(model, "lazy_weights", None) is not None)
                if cfg.target == "tensorrt":  # TensorRT's explicit quantization takes the Q/DQ graph
                    _, engines[stage] = tensorrt_engine(components[stage], q.qdq_path, tmp, cfg, log)
                else:  # ONNX Runtime: the optimised graph, integer kernels fused (named for the bundle)
                    shutil.copyfile(q.cpu_path, tmp / q.cpu_path.name)
                    data = external_data(q.cpu_path)
                    if data is not None:
                        shutil.copyfile(data, tmp / data.name)
                    engines[stage] = dataclasses.replace(
                        m.engines[stage], file=q.cpu_path.name, sha256="", size_bytes=0, precision=cfg.precision,
                        external_data=(data.name,) if data is not None else ())
                records[stage] = q.manifest_record(recipe)
        replaced = {rel for stage in recipe.stages for rel in m.engines[stage].external_data}
        files = [rel for rel in m.files if rel not in replaced]
        for rel in files:
            shutil.copyfile(float_bundle.path / rel, tmp / rel)
        for stage, entry in m.engines.items():
            if stage not in recipe.stages:
                shutil.copyfile(float_bundle.path / entry.file, tmp / entry.file)
        files += [rel for stage in recipe.stages for rel in engines[stage].external_data]
        build_info = {**_thawed(m.build), "cache_key": key, "precision": cfg.precision,
                      "quantization": {"float_bundle": str(float_out), "float_cache_key": m.build["cache_key"],
                                       "stages": records}}
        return dataclasses.replace(m, engines=engines, build=build_info, files={rel: "" for rel in files})

    write_bundle(cfg.out, populate)
    return Path(cfg.out)


def _thawed(mapping) -> dict:
    from metacanvas_deploy.runtime.manifest_fields import thaw

    return thaw(mapping)
