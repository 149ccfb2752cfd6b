"""`python -m mc_export`: a thin CLI over the typed API. Parses, builds a config, calls one function, and
maps our errors to exit code 2 with a one-line message (tracebacks only for bugs)."""

from __future__ import annotations

import argparse
import sys

from metacanvas_deploy.mc_export.errors import run_cli


def _add_backbone(p, required: bool = False) -> None:
    """``--backbone``, its choices from the registry. Checked by `mc_export.backbones.get` (not argparse), so that
    an unknown name is one line and exit code 2 like every other configuration error."""
    from metacanvas_deploy.mc_export.backbones import BACKBONES

    p.add_argument("--backbone", required=required, metavar="{" + ",".join(BACKBONES) + "}",
                   help=f"one of {', '.join(BACKBONES)}")


def _add_init_checkpoint(sub) -> None:
    p = sub.add_parser("init-checkpoint", help="write a checkpoint folder with seeded random weights")
    _add_backbone(p, required=True)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "full"],
                   help="full: the public models' sizes, streamed to bf16 shards (never built in memory)")
    p.add_argument("--planner", choices=["7b", "3b"],
                   help="full only: Qwen2.5-VL-7B-Instruct (default) or Qwen2.5-VL-3B-Instruct")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-canvas", action="store_true",
                   help="random (not zero) values in the zero-initialised canvas layers and LoRA, so the canvas "
                        "path is exercised")
    p.add_argument("--writer", choices=["module", "streamed"],
                   help="module: built in memory by torch's initialisers (tiny/small default, the weights "
                        "`build --preset` uses); streamed: tensor by tensor from per-name seeded generators into "
                        "bf16 shards (full's only writer)")
    p.add_argument("--max-shard-size", default="5GB", help="streamed: largest weight file (default 5GB)")
    p.add_argument("--out", required=True, help="a new or empty folder (never replaced)")
    p.set_defaults(func=_cmd_init_checkpoint)


def _cmd_init_checkpoint(args) -> None:
    from pathlib import Path

    from metacanvas_deploy.mc_export.models.init_checkpoint import InitCheckpointConfig, init_checkpoint, parse_size

    cfg = InitCheckpointConfig(backbone=args.backbone, preset=args.preset, out=Path(args.out), seed=args.seed,
                               planner=args.planner, random_canvas=args.random_canvas, writer=args.writer,
                               max_shard_bytes=parse_size(args.max_shard_size))
    done = init_checkpoint(cfg, log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {args.preset} {args.backbone} checkpoint (seed {args.seed}, {done.parameters:,} parameters, "
          f"{done.file_bytes:,} bytes) to {args.out}")


def _add_reference(sub) -> None:
    from metacanvas_deploy.mc_export.backbones import ALL_TASKS
    from metacanvas_deploy.runtime.cli import add_request_arguments

    p = sub.add_parser("reference", help="sample with the PyTorch reference and write PNG/MP4/GIF")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task", required=True, choices=ALL_TASKS)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    add_request_arguments(p)
    p.add_argument("--out", required=True, help="output file: .png for images, .mp4 or .gif for video")
    p.set_defaults(func=_cmd_reference)


def _cmd_reference(args) -> None:
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
    from metacanvas_deploy.runtime.media import check_output, read_image, read_video, write_media

    # the output and the media are checked before the model loads; a video task writes its default frames
    frames = args.frames if args.frames is not None else (1 if args.task in ("t2i", "edit") else 2)
    check_output(args.out, frames)
    image = read_image(args.image) if args.image else None
    video = read_video(args.video) if args.video else None
    references = [read_image(r) for r in args.reference] or None
    model = MetaCanvas.from_pretrained(args.checkpoint)
    out = model.generate(
        args.task, args.prompt, args.negative_prompt, image=image, video=video, reference_images=references,
        height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
        guidance_scale=args.guidance, seed=args.seed,
    )
    write_media(args.out, out.frames[0])
    print(f"wrote {args.out}")


def _range(text: str) -> tuple[int, ...]:
    """`512` -> (512, 512, 512); `256:1024` -> (256, opt=min, 1024)... with opt the middle value when given."""
    try:
        parts = tuple(int(p) for p in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N, MIN:MAX or MIN:OPT:MAX, got {text!r}") from None
    if len(parts) == 1:
        return parts * 3
    if len(parts) == 2:
        return (parts[0], parts[0], parts[1])
    if len(parts) == 3:
        return parts
    raise argparse.ArgumentTypeError(f"expected N, MIN:MAX or MIN:OPT:MAX, got {text!r}")


def _stage_precision(text: str) -> tuple[tuple[str, str], ...]:
    """`planner=w4,denoise=int8` -> (("planner", "w4"), ("denoise", "int8")). Names and precisions are checked by
    `BuildConfig.validate` and against the model's stages before any export."""
    pairs = []
    for item in text.split(","):
        stage, sep, precision = item.strip().partition("=")
        if not sep or not stage or not precision:
            raise argparse.ArgumentTypeError(f"expected STAGE=PRECISION[,STAGE=PRECISION...], got {text!r}")
        pairs.append((stage.strip(), precision.strip()))
    return tuple(pairs)


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="compile a checkpoint (or a preset) into an engine bundle")
    _add_backbone(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=["tiny", "small"], help="seeded random weights (default: tiny)")
    src.add_argument("--checkpoint", help="a local checkpoint folder (see `init-checkpoint`)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "fp8", "w8", "w4"],
                   help="w8/w4: weight-only 8/4-bit blocks, activations float, wherever the backbone's recipe allows "
                        "(the planner's LM and the denoise step; the VAE float)")
    p.add_argument("--stage-precision", type=_stage_precision, metavar="STAGE=P[,STAGE=P...]",
                   help="per-stage precision in one bundle, e.g. planner=w4,denoise=int8 (each of fp32, int8, fp8, "
                        "w8, w4; stages not named stay fp32)")
    p.add_argument("--target", default="auto", choices=["auto", "onnxruntime", "onnxruntime-gpu", "tensorrt"])
    p.add_argument("--height", type=_range, help="pixel height range MIN:MAX or MIN:OPT:MAX")
    p.add_argument("--width", type=_range)
    p.add_argument("--frames", type=_range, help="video frame range (4k+1 values)")
    p.add_argument("--prompt-tokens", type=_range, help="planner prefix length range")
    p.add_argument("--steps", type=int, help="step count of the precomputed schedule (others are computed at run "
                                              "time)")
    p.add_argument("--seed", type=int, default=0, help="preset weights' seed")
    p.add_argument("--no-verify", action="store_true", help="skip the parity gates (not recommended)")
    p.add_argument("--lazy-weights", default="auto", choices=["auto", "on", "off"],
                   help="checkpoints: trace on the meta device and stream weights from disk into the ONNX files "
                        "(auto: when the fp32 weights exceed half the available memory)")
    p.add_argument("--recipe", help="int8/fp8: a recipe JSON file (`python -m mc_export recipe` prints the default)")
    p.add_argument("--float-bundle", help="int8/fp8: the fp32 reference bundle to calibrate against, built there "
                                           "if missing or stale (default: <out>-fp32)")
    p.add_argument("--ort-provider", default="cuda", choices=["cuda", "tensorrt"],
                   help="with --target onnxruntime-gpu: ONNX Runtime's CUDA execution provider, or its TensorRT "
                        "provider (engines built at first run, cached per GPU model)")
    p.add_argument("--export-only", action="store_true",
                   help="with --target tensorrt: no GPU needed here; write a TensorRT export (graphs, profiles, "
                        "references) that `engines` turns into a bundle on the GPU machine")
    p.add_argument("--cache", default="off", metavar="off|auto|THRESHOLD",
                   help="step caching (MagCache): auto picks the most aggressive skip schedule within "
                        "--cache-budget; a number fixes the threshold (default off)")
    p.add_argument("--cache-budget", type=float, default=30.0,
                   help="step caching's accuracy budget: worst held-out PSNR (dB) of frames vs uncached")
    p.add_argument("--cache-curve", metavar="FILE.json",
                   help='step caching: a published magnitude-ratio curve instead of measuring one: {"curve": [one '
                        'ratio per step], "source": "where it comes from"}')
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_build)


def _cmd_build(args) -> None:
    from pathlib import Path

    from metacanvas_deploy.mc_export.backbones import get
    from metacanvas_deploy.mc_export.build import BuildConfig, build

    if args.backbone is not None:
        get(args.backbone)  # an unknown name fails here, before any work
    if args.checkpoint is None and args.preset is None:
        print("no --checkpoint given: building the tiny preset (seeded random weights)", file=sys.stderr)
    overrides = tuple((k, getattr(args, k)) for k in ("height", "width", "frames", "prompt_tokens")
                      if getattr(args, k) is not None)
    recipe = None
    if args.recipe:
        import json

        from metacanvas_deploy.calib.recipes import Recipe
        from metacanvas_deploy.mc_export.errors import ConfigError

        try:
            recipe = Recipe.from_json(json.loads(Path(args.recipe).read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the recipe {args.recipe}: {e}") from e
    cfg = BuildConfig(out=Path(args.out), backbone=args.backbone, preset=args.preset,
                      checkpoint=Path(args.checkpoint) if args.checkpoint else None, precision=args.precision,
                      target=args.target, range_overrides=overrides, steps=args.steps, seed=args.seed,
                      verify=not args.no_verify, lazy_weights=args.lazy_weights,
                      recipe=recipe, float_bundle=Path(args.float_bundle) if args.float_bundle else None,
                      export_only=args.export_only, ort_provider=args.ort_provider, stage_precision=args.stage_precision or (),
                      cache=args.cache, cache_budget_db=args.cache_budget, **_cache_curve(args.cache_curve))
    resolved = cfg.validate()
    if resolved.target != args.target:
        print(f"--target auto: no usable GPU/TensorRT here, building for {resolved.target}", file=sys.stderr)
    build(cfg)


def _cache_curve(path: str | None) -> dict:
    """--cache-curve FILE: {"curve": [...], "source": "..."} -> BuildConfig fields (checked by its validate)."""
    if path is None:
        return {}
    import json
    from pathlib import Path

    from metacanvas_deploy.mc_export.errors import ConfigError

    try:
        data = json.loads(Path(path).read_text())
        curve, source = tuple(data["curve"]), str(data.get("source", ""))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--cache-curve {path}: expected a JSON object with a \"curve\" list ({e})") from None
    return {"cache_curve": curve, "cache_curve_source": source}


def _add_engines(sub) -> None:
    p = sub.add_parser("engines", help="on the GPU machine: a TensorRT export (`build --export-only`) -> a bundle "
                                       "for this GPU (no torch or checkpoint needed)")
    p.add_argument("--export", required=True, help="the folder `build --target tensorrt --export-only` wrote")
    p.add_argument("--out", required=True, help="the bundle to write")
    p.add_argument("--timing-cache-dir", help="where TensorRT's per-GPU timing caches live (default "
                                              "~/.cache/metacanvas/tensorrt)")
    p.set_defaults(func=_cmd_engines)


def _cmd_engines(args) -> None:
    from pathlib import Path

    from metacanvas_deploy.mc_export.tensorrt.target_build import build_engines

    build_engines(Path(args.export), Path(args.out),
                  timing_cache_dir=Path(args.timing_cache_dir) if args.timing_cache_dir else None)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="re-run a bundle's parity gates against its source model")
    p.add_argument("--bundle", required=True)
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> None:
    from metacanvas_deploy.mc_export.build import verify

    for line in verify(args.bundle):
        print(line)


def _add_recipe(sub) -> None:
    p = sub.add_parser("recipe", help="print a backbone's default int8/fp8 recipe as JSON (edit it, then "
                                      "`build --recipe FILE`)")
    _add_backbone(p, required=True)
    p.add_argument("--precision", required=True, choices=["int8", "fp8", "w8", "w4"])
    p.add_argument("--num-layers", type=int, help="the DiT's depth (the first and last blocks some backbones keep "
                                                  "float)")
    p.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    p.set_defaults(func=_cmd_recipe)


def _cmd_recipe(args) -> None:
    import json

    from metacanvas_deploy.mc_export.backbones import recipe_for_backbone

    recipe = recipe_for_backbone(args.backbone, args.precision, args.num_layers, args.target)
    print(json.dumps(recipe.to_json(), indent=2))


def _add_triton(sub) -> None:
    p = sub.add_parser("triton", help="write a Triton Inference Server model repository serving bundles")
    p.add_argument("--bundle", action="append", required=True, help="an engine bundle; repeatable (one model each)")
    p.add_argument("--name", action="append", default=[], help="model name per --bundle (default: its folder name)")
    p.add_argument("--instances", type=int, default=1, help="model instances (processes) per model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="instance kind (auto: gpu for TensorRT bundles, cpu for ONNX Runtime ones)")
    p.add_argument("--max-batch", type=int, default=4, help="requests one instance runs at once")
    p.add_argument("--queue-delay-us", type=int, default=1000, help="dynamic batcher's wait for more requests")
    p.add_argument("--threads", type=int,
                   help="ONNX Runtime threads per session (default: cores / (instances x max-batch))")
    p.add_argument("--low-memory", action="store_true", help="open each stage's engine only while it runs")
    p.add_argument("--no-warmup", action="store_true", help="no one-step warm-up request at load")
    p.add_argument("--out", required=True, help="the model repository (a new or empty folder, or one written "
                                                "by this command)")
    p.set_defaults(func=_cmd_triton)


def _cmd_triton(args) -> None:
    from pathlib import Path

    from metacanvas_deploy.mc_export.triton_repo import TritonConfig, write_repository

    write_repository(TritonConfig(bundles=tuple(Path(b) for b in args.bundle), out=Path(args.out),
                                  names=tuple(args.name), instances=args.instances, device=args.device,
                                  max_batch_size=args.max_batch, queue_delay_us=args.queue_delay_us,
                                  threads=args.threads, low_memory=args.low_memory, warmup=not args.no_warmup))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mc_export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    _add_engines(sub)
    # `engines` runs on GPU machines without torch; the other commands' options come from the compiler's backbone
    # registry, which imports it, so they are only added when another command (or --help) is asked for
    if argv[:1] != ["engines"]:
        _add_build(sub)
        _add_verify(sub)
        _add_init_checkpoint(sub)
        _add_reference(sub)
        _add_recipe(sub)
    _add_triton(sub)
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args))

