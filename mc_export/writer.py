"""Writing a bundle: the content key, the float build (every stage exported, gated, optimised) and the one
manifest writer every bundle goes through, float or quantized."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.device import gpu_identity
from metacanvas_deploy.runtime.errors import MetaCanvasRuntimeError
from metacanvas_deploy.runtime.manifest import BUNDLE_FORMAT, SCHEMA_VERSION, Manifest


def weights_hash(model) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) in a fixed order: the build's content key. A lazy
    model (weights on disk) hashes its checkpoint's files instead, streamed."""
    if getattr(model, "lazy_weights", None) is not None:
        return "files:" + model.lazy_weights.content_hash()
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tool_versions(target: str = "onnxruntime") -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    from metacanvas_deploy.mc_export import __version__

    versions = {"mc_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "diffusers": diffusers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if target == "tensorrt":
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    return versions


def cache_key(cfg, model, ranges: BuildRanges, steps: int, weights_digest: str, recipe=None) -> str:
    """The bundle's content key: weights (``weights_digest``, from `weights_hash`), model config, precision,
    target, ranges, steps, tool versions, schema, GPU identity and (quantized) the recipe's digest."""
    payload = {"weights": weights_digest, "metacanvas": model.cfg.to_dict(), "precision": cfg.precision,
               "target": cfg.target, "ranges": ranges.to_json(), "steps": steps, "tools": tool_versions(cfg.target),
               "verify": cfg.verify, "schema": SCHEMA_VERSION, "device": gpu_identity(cfg)}
    if getattr(cfg, "cache", "off") != "off":  # step caching (absent when off: existing keys stay valid)
        payload["cache"] = [cfg.cache, cfg.cache_budget_db, cfg.cache_curve, cfg.cache_curve_source]
    if recipe is not None:
        payload["recipe"] = recipe.digest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached(out: Path, key: str) -> bool:
    """An existing bundle with the same key that verifies (hashes included) is a cache hit."""
    from metacanvas_deploy.runtime.bundle import load_bundle

    if not (Path(out) / "manifest.json").is_file():
        return False
    try:
        bundle = load_bundle(out)
    except MetaCanvasRuntimeError:
        return False
    return bundle.manifest.build.get("cache_key") == key


def build_float(cfg, model, ranges: BuildRanges, steps: int, key: str, log, raw_dir: Path | None = None,
                keep_raw: tuple[str, ...] = ()) -> dict[str, Path | None]:
    """Write the float bundle ``cfg.out``: every stage exported, gated and optimised (`stages.write_stages`).
    Returns the raw exports kept for ``keep_raw`` (see `write_stages`)."""
    from metacanvas_deploy.mc_export.stages import plan_stages, write_stages
    from metacanvas_deploy.runtime.bundle import write_bundle

    cache = getattr(cfg, "cache", "off") != "off"
    components = plan_stages(model, ranges, cache=cache)
    log(f"building {model.cfg.backbone} ({cfg.preset or 'checkpoint'}) for {cfg.target} {cfg.precision}: "
        f"stages {', '.join(components)}")
    raws: dict[str, Path | None] = {}

    def populate(tmp: Path) -> Manifest:
        written = write_stages(components, tmp, cfg, log, getattr(model, "lazy_weights", None), raw_dir, keep_raw)
        raws.update(written.raws)
        if cfg.target == "onnxruntime-gpu":  # the same ONNX files, run by the CUDA provider (runtime.ort_cuda)
            device = gpu_identity(cfg)
            written.engines.update({s: dataclasses.replace(e, device=device) for s, e in written.engines.items()})
        files = {**written.files, **_write_tokenizer(model, tmp)}
        made = manifest(cfg, model, ranges, steps, key, written.engines, files, written.gates,
                        stage_records=written.records)
        if cache:  # the schedule is measured on this very bundle, before it is sealed (mc_export.step_cache_build)
            from metacanvas_deploy.mc_export.step_cache_build import bundle_schedule

            made = manifest(cfg, model, ranges, steps, key, written.engines, files, written.gates,
                            stage_records=written.records,
                            step_cache=bundle_schedule(cfg, components, tmp, made, steps, log).to_dict())
        return made

    write_bundle(cfg.out, populate)
    return raws


def _write_tokenizer(model, tmp: Path) -> dict[str, str]:
    model.tokenizer.tokenizer.save(str(tmp / "tokenizer.json"))
    return {"tokenizer.json": ""}


def manifest(cfg, model, ranges: BuildRanges, steps: int, key: str, engines, files,
             gates: dict[str, str], quantization: dict | None = None, stage_records: dict | None = None,
             step_cache: dict | None = None) -> Manifest:
    """Every bundle's manifest (float or quantized: ``quantization`` is `build.quantization`)."""
    from metacanvas_deploy.mc_export.components.common import scheduler_config as scheduler_config_of
    from metacanvas_deploy.runtime.schedulers import make_plan

    mc = model.cfg
    scheduler_config = scheduler_config_of(model.adapter)
    d = model.defaults
    plan = None
    if not scheduler_config.get("use_dynamic_shifting"):  # FLUX's plan depends on the image size: at run time
        plan = make_plan(scheduler_config, steps).to_json()
    qwen = model.planner.qwen.config
    command = " ".join(["python -m mc_export", *sys.argv[1:]]) if sys.argv and "mc_export" in sys.argv[0] else ""
    return Manifest(
        schema_version=SCHEMA_VERSION, format=BUNDLE_FORMAT, backbone=mc.backbone,
        preset=cfg.preset or "checkpoint", tasks=tuple(mc.tasks), engines=engines, files=files,
        ranges={"height": (ranges.height[0], ranges.height[2]), "width": (ranges.width[0], ranges.width[2]),
                "num_frames": (ranges.num_frames[0], ranges.num_frames[2]),
                "prompt_tokens": (ranges.prompt_tokens[0], ranges.prompt_tokens[2])},
        multiples={"height": model.adapter.size_multiple, "width": model.adapter.size_multiple,
                   "num_frames_minus_1": model.adapter.frame_multiple or 1},
        scheduler={"config": scheduler_config, "plans": {str(steps): plan} if plan else {},
                   **({"cache": step_cache} if step_cache else {})},
        canvas={"keyframes": mc.canvas_keyframes, "height": mc.canvas_height, "width": mc.canvas_width,
                "tokens": mc.canvas_tokens},
        defaults=_defaults(d, ranges),
        build={"cache_key": key, "command": command, "source": _source(cfg), "tools": tool_versions(cfg.target),
               "precision": cfg.precision, "target": cfg.target, "metacanvas": mc.to_dict(),
               "ranges": ranges.to_json(), "parity": gates,
               "lazy_weights": getattr(model, "lazy_weights", None) is not None,
               "planner": {"image_token_id": qwen.image_token_id, "video_token_id": qwen.video_token_id,
                           "spatial_merge_size": qwen.vision_config.spatial_merge_size,
                           "tokens_per_second": qwen.vision_config.tokens_per_second,
                           "max_prompt_tokens": mc.max_prompt_tokens},
               "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "stages": stage_records or {},
               **({"quantization": quantization} if quantization is not None else {})},
    )


def _source(cfg) -> dict:
    """Where the weights came from, so that `verify` can rebuild the reference."""
    if cfg.checkpoint is not None:
        return {"checkpoint": str(Path(cfg.checkpoint).resolve())}
    return {"preset": cfg.preset, "seed": cfg.seed, "random_canvas": cfg.random_canvas}


def _defaults(d, ranges: BuildRanges) -> dict:
    """The request defaults the runtime falls back on: the checkpoint's, each size pulled to the range's opt
    value where the build's ranges leave it out (a full-size model built for small requests)."""
    out = {**dataclasses.asdict(d), "negative_prompt": ""}
    for key, (lo, opt, hi) in (("height", ranges.height), ("width", ranges.width),
                               ("num_frames", ranges.num_frames)):
        if not lo <= out[key] <= hi:
            out[key] = opt
    return out
