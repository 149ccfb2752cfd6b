"""`python -m runtime generate --bundle DIR --prompt ... --out FILE`: generate from a bundle (no torch)."""

from __future__ import annotations

import argparse

from metacanvas_deploy.runtime.errors import RuntimeInputError, run_cli
from metacanvas_deploy.runtime.limits import MAX_FRAMES, check_int, max_threads
from metacanvas_deploy.runtime.step_cache import check_cache_arg


def _generate(args) -> None:
    """Every input is checked before the bundle's engines are opened: numbers, the output path (suffix for the
    request's frame count, a writable folder) and the media (size and frame count from headers and streaming
    decode)."""
    from metacanvas_deploy.runtime.bundle import load_manifest
    from metacanvas_deploy.runtime.media import check_output, read_image, read_video, write_media
    from metacanvas_deploy.runtime.pipeline import Pipeline

    if args.threads is not None:
        check_int("--threads", args.threads, 1, max_threads(), RuntimeInputError)
    cache = check_cache_arg(args.cache, RuntimeInputError)
    manifest = load_manifest(args.bundle, verify_hashes=False)  # the JSON alone: cheap, checked again by load
    frames = args.frames if args.frames is not None else manifest.defaults["num_frames"]
    check_output(args.out, check_int("--frames", frames, 1, MAX_FRAMES, RuntimeInputError))
    max_video = manifest.ranges["num_frames"][1]
    image = read_image(args.image) if args.image else None
    video = read_video(args.video, max_frames=max_video) if args.video else None
    references = [read_image(r) for r in args.reference] or None
    pipe = Pipeline.load(args.bundle, threads=args.threads, low_memory=args.low_memory, cache=cache)
    out = pipe(args.prompt, args.negative_prompt, task=args.task, image=image, video=video,
               reference_images=references, height=args.height, width=args.width, num_frames=args.frames,
               num_inference_steps=args.steps, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg,
               seed=args.seed, progress=True)
    write_media(args.out, out.frames)
    stages = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in out.timings.items())
    print(f"wrote {args.out} ({stages})")
    print(f"steps: {out.steps_computed} computed, {out.steps_cached} cached")


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """A request's media and numbers, shared by `generate` and the compiler's `reference` (one set of names)."""
    p.add_argument("--image", help="input image (edit, i2v)")
    p.add_argument("--video", help="input video file or folder of frames (v2v)")
    p.add_argument("--reference", action="append", default=[], help="reference image (r2v); repeatable")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="generate an image or video from a bundle")
    p.add_argument("--bundle", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--task", choices=["t2i", "edit", "t2v", "i2v", "v2v", "r2v"],
                   help="default: inferred from the backbone and the inputs given")
    add_request_arguments(p)
    p.add_argument("--true-cfg", type=float, default=1.0, help="FLUX-Kontext true CFG scale (> 1 enables it)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--low-memory", action="store_true",
                   help="open each stage's engine only while it runs (one stage resident at a time), its "
                        "weights memory-mapped from the bundle instead of copied")
    p.add_argument("--cache", default="auto", metavar="auto|off|THRESHOLD",
                   help="step caching of a bundle built with --cache: auto follows the bundle's schedule, off "
                        "computes every step, a number replaces its threshold (smaller: stricter)")
    p.add_argument("--out", required=True, help=".png for images, .mp4 or .gif for video")
    p.set_defaults(func=_generate)
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args))

