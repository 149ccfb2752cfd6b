"""`python -m benchmarks`: latency of a bundle, ONNX Runtime vs PyTorch, size sweeps, Markdown reports.

    latency --bundle DIR [--runs N --warmup K --threads T --steps S --task T] [--out JSON]
    compare --backbone B [--preset small|tiny | --checkpoint DIR] [--bundle DIR] [--int8-bundle DIR] [--out JSON]
    sweep   (--bundle DIR | --backbone B [--preset P | --checkpoint DIR]) [--points N] [--out JSON] [--plot PNG]
    report  A.json [B.json]
    step-cache (--backbone B [--preset small] | --bundle DIR | --published) [--steps N --runs R] [--out JSON]

A thin CLI: it parses, builds a frozen config, calls one function, prints the Markdown report and writes the
JSON. Exit codes: 0 done, 1 a check failed (the planner did not run exactly once per request), 2 the benchmark
could not run (the message says why). Target misses are measurements, not failures: they exit 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.errors import BenchmarkError
from metacanvas_deploy.runtime.backbones import BACKBONES  # the same names as the compiler's registry (torch-free)


def _common(p: argparse.ArgumentParser, runs: int, warmup: int) -> None:
    p.add_argument("--runs", type=int, default=runs, help=f"timed runs (default {runs})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up runs (default {warmup})")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime (and torch) threads (default 2)")
    p.add_argument("--out", type=Path, help="write the result JSON here")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", choices=BACKBONES)
    p.add_argument("--preset", choices=["tiny", "small"], help="default: small (unless --checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint folder instead of a preset")
    p.add_argument("--cache", type=Path, help="where bundles built for benchmarks go (default "
                                              "$XDG_CACHE_HOME/metacanvas-bench)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("latency", help="per-stage and end-to-end latency, memory and overhead of a bundle")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--steps", type=int, help="denoising steps per request (default: the bundle's)")
    p.add_argument("--task", help="default: the bundle's first task")
    _common(p, runs=10, warmup=2)
    p = sub.add_parser("compare", help="denoise step: ONNX Runtime engines vs PyTorch eager and torch.compile")
    _model_args(p)
    p.add_argument("--bundle", type=Path, help="the fp32 bundle of this model (default: built into the cache)")
    p.add_argument("--int8-bundle", type=Path, help="a second bundle to time beside it (labelled by precision)")
    p.add_argument("--torch", nargs="*", default=["eager", "compile"], choices=["eager", "compile"],
                   help="PyTorch modes to time (default: eager compile)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n x n peak GEMMs (default 2048)")
    p.add_argument("--profile-runs", type=int, default=3, help="runs in each ONNX Runtime op profile (default 3)")
    _common(p, runs=10, warmup=2)
    p = sub.add_parser("sweep", help="denoise-step latency against latent tokens, within a bundle's ranges")
    _model_args(p)
    p.add_argument("--bundle", type=Path, help="default: the model's bundle, built into the cache")
    p.add_argument("--points", type=int, default=4, help="sizes per swept axis (default 4)")
    p.add_argument("--task", help="default: the bundle's first task")
    p.add_argument("--plot", type=Path, help="PNG path (default: --out with .png, else sweep.png)")
    _common(p, runs=5, warmup=1)
    p = sub.add_parser("step-cache", help="step caching: DiT and end-to-end time cached vs uncached, with PSNR; "
                                          "the published MagCache curves' masks")
    p.add_argument("--backbone", choices=BACKBONES)
    p.add_argument("--preset", choices=["tiny", "small"], help="default: small")
    p.add_argument("--bundle", type=Path, help="a bundle built with --cache (default: built into the cache)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per request (default 8)")
    p.add_argument("--runs", type=int, default=2, help="held-out requests, each uncached and cached (default 2)")
    p.add_argument("--budget", type=float, default=30.0, help="the build's PSNR budget in dB (default 30)")
    p.add_argument("--published", action="store_true", help="only the published curves' masks (no model)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    p.add_argument("--cache", type=Path, help="where benchmark bundles go")
    p.add_argument("--out", type=Path, help="write the result JSON here")
    p = sub.add_parser("weight-only", help="planner and denoise step in fp32, w8, w4, w4 with AWQ vs PyTorch eager: "
                                           "latency, memory, bytes, accuracy")
    p.add_argument("--backbone", choices=BACKBONES, required=True)
    p.add_argument("--preset", choices=["tiny", "small"], default="small", help="default: small")
    p.add_argument("--cache", type=Path, help="where benchmark bundles go")
    _common(p, runs=5, warmup=1)
    p = sub.add_parser("report", help="Markdown from one result JSON, or B compared with A")
    p.add_argument("results", type=Path, nargs="+", metavar="RESULT.json")
    return parser


def _latency(args) -> dict:
    from benchmarks.latency import LatencyConfig, run_latency

    return run_latency(LatencyConfig(bundle=args.bundle, runs=args.runs, warmup=args.warmup, threads=args.threads,
                                     steps=args.steps, task=args.task), log=_log)


def _cache(args) -> dict:
    return {"cache": args.cache} if args.cache else {}


def _compare(args) -> dict:
    from benchmarks.compare import CompareConfig, run_compare

    return run_compare(CompareConfig(
        backbone=args.backbone, preset=args.preset, checkpoint=args.checkpoint, bundle=args.bundle,
        int8_bundle=args.int8_bundle, runs=args.runs, warmup=args.warmup, threads=args.threads,
        torch_modes=tuple(args.torch), peak_size=args.peak_size, profile_runs=args.profile_runs, **_cache(args)),
        log=_log)


def _sweep(args) -> dict:
    from benchmarks.sweep import SweepConfig, run_sweep

    if args.bundle is None and args.backbone is None and args.checkpoint is None:
        raise BenchmarkError("sweep needs --bundle DIR, or --backbone B (with --preset) / --checkpoint DIR")
    return run_sweep(SweepConfig(bundle=args.bundle, backbone=args.backbone, preset=args.preset,
                                 checkpoint=args.checkpoint, runs=args.runs, warmup=args.warmup,
                                 threads=args.threads, points=args.points, task=args.task, **_cache(args)), log=_log)


def _plot(args, result: dict) -> None:
    """The sweep's PNG (after its JSON is written: a missing matplotlib loses the plot only)."""
    from benchmarks.sweep import plot_sweep

    path = args.plot or (args.out.with_suffix(".png") if args.out else Path("sweep.png"))
    try:
        _log(f"wrote {plot_sweep(result, path)}")
    except ImportError as e:
        raise BenchmarkError(f"the sweep plot needs matplotlib ({e}): pip install 'metacanvas-deploy[bench]'") from e


def _step_cache(args) -> dict:
    from benchmarks.step_cache import StepCacheConfig, run_step_cache

    return run_step_cache(StepCacheConfig(backbone=args.backbone, preset=args.preset, bundle=args.bundle,
                                          steps=args.steps, runs=args.runs, threads=args.threads,
                                          budget_db=args.budget, published=args.published, **_cache(args)), log=_log)


def _weight_only(args) -> dict:
    from benchmarks.weight_only import WeightOnlyConfig, run_weight_only

    return run_weight_only(WeightOnlyConfig(backbone=args.backbone, preset=args.preset, runs=args.runs,
                                            warmup=args.warmup, threads=args.threads, **_cache(args)), log=_log)


def _log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _write(result: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        _log(f"wrote {out}")


def _report(args) -> str:
    from benchmarks.report import load_result, render, render_comparison

    if len(args.results) > 2:
        raise BenchmarkError(f"report takes one or two result files, got {len(args.results)}")
    results = [load_result(p) for p in args.results]
    return render(results[0]) if len(results) == 1 else render_comparison(*results)


def main(argv: list[str] | None = None) -> int:
    from metacanvas_deploy.mc_export.errors import MetaCanvasError
    from metacanvas_deploy.runtime.errors import MetaCanvasRuntimeError

    args = _parser().parse_args(argv)
    try:
        if args.command == "report":
            print(_report(args), end="")
            return 0
        result = {"latency": _latency, "compare": _compare, "sweep": _sweep,
                  "step-cache": _step_cache, "weight-only": _weight_only}[args.command](args)
        _write(result, args.out)
        if args.command == "weight-only":
            from benchmarks.weight_only import render_weight_only

            print(render_weight_only(result), end="")
            return 0
        if args.command == "step-cache":
            from benchmarks.step_cache import render_step_cache

            print(render_step_cache(result), end="")
            return 0
        if args.command == "sweep":
            _plot(args, result)
    except (BenchmarkError, MetaCanvasRuntimeError, MetaCanvasError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from benchmarks.report import render

    print(render(result), end="")
    if not result.get("checks", {}).get("planner_once", True):
        print("error: the planner did not run exactly once per request", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
