"""`weight-only`: each weight-only stage (the planner, the denoise step) in fp32, w8 and w4 against PyTorch eager,
in one process on the same inputs: latency (alternating runs, `timing.run_alternating`), accuracy against eager,
bytes on disk and memory (each engine loaded and run once in a fresh process: resident and private MiB).

The bundles: the fp32 one (`bundles.cached_bundle`) and a w8 and a w4 one built against it with the backbone's
shipped weight-only recipe, its held-out gate cut to one request of two steps to fit a benchmark's time (the
budget itself unchanged). Builds are cached by content key like every bundle here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.bundles import DEFAULT_CACHE, build_config, cached_bundle
from benchmarks.env import fingerprint
from benchmarks.errors import BenchmarkError
from benchmarks.timing import in_fresh_process, run_alternating, summarize

PRECISIONS = ("fp32", "w8", "w4", "w4-awq")  # w4-awq: the w4 recipe with AWQ's scales (`weight_method: awq`)
QUICK_GATE = dict(held_out_prompts=1, held_out_seeds=(1000,), evaluation_steps=2)


@dataclass(frozen=True)
class WeightOnlyConfig:
    backbone: str
    preset: str = "small"
    stages: tuple[str, ...] = ("planner", "denoise")
    runs: int = 5
    warmup: int = 1
    threads: int = 2
    cache: Path = DEFAULT_CACHE

    def validate(self) -> WeightOnlyConfig:
        if self.runs < 1 or self.warmup < 1 or self.threads < 1:
            raise BenchmarkError(f"need runs >= 1, warmup >= 1, threads >= 1; got runs={self.runs} "
                                 f"warmup={self.warmup} threads={self.threads}")
        return self


def quantized_bundles(bcfg, model, fp32: Path, log) -> dict[str, Path]:
    """precision -> bundle: the fp32 one and a w8 / w4 one calibrated against it (cached by content key)."""
    from metacanvas_deploy.mc_export.backbones import recipe_for_backbone
    from metacanvas_deploy.mc_export.build import build

    out = {"fp32": fp32}
    layers = getattr(model.transformer.config, "num_layers", None)
    for candidate in PRECISIONS[1:]:
        precision, _, method = candidate.partition("-")
        recipe = dataclasses.replace(recipe_for_backbone(model.cfg.backbone, precision, layers), **QUICK_GATE,
                                     weight_method=method or "rtn")
        cfg = dataclasses.replace(bcfg, out=Path(str(fp32) + f"-{candidate}"), precision=precision, recipe=recipe,
                                  float_bundle=fp32)
        out[candidate] = build(cfg, log=log)
    return out


def engine_memory(bundle: Path, stage: str, feeds_file: str, threads: int) -> dict:
    """Run in a fresh process: load ``stage``'s engine as the runtime does and run it once on the saved feeds.
    Resident and private MiB over the process's own before loading, after loading and at the run's peak."""
    from metacanvas_deploy.runtime.bundle import load_bundle
    from metacanvas_deploy.runtime.engine import load_engine
    from metacanvas_deploy.runtime.memory import private_mb, rss_phase

    with np.load(feeds_file) as f:
        feeds = {k: f[k] for k in f.files}
    b = load_bundle(bundle)
    base = private_mb()
    with rss_phase() as load:
        engine = load_engine(b.engine_path(stage), b.manifest.engines[stage], threads)
    loaded = private_mb()
    with rss_phase() as run:
        engine(feeds)
    files = [b.engine_path(stage), *(Path(bundle) / n for n in b.manifest.engines[stage].external_data)]
    return {"bytes": sum(p.stat().st_size for p in files), "private_load_mb": loaded - base,
            "private_run_mb": run["end_private_mb"] - base, "peak_rss_mb": max(load["peak_mb"], run["peak_mb"])}


def _accuracy(outputs: dict, reference: dict) -> dict:
    a = np.concatenate([outputs[k].astype(np.float64).ravel() for k in reference])
    b = np.concatenate([reference[k].astype(np.float64).ravel() for k in reference])
    return {"cosine": float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)),
            "max_rel": float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))}


def _stage(cfg: WeightOnlyConfig, comp, bundles: dict[str, Path], scratch: Path, log) -> list[dict]:
    """One stage's rows: every precision's engine and PyTorch eager, alternated."""
    import torch

    from metacanvas_deploy.runtime.bundle import load_bundle
    from metacanvas_deploy.runtime.engine import load_engine

    stage = comp.spec.stage
    arrays = comp.sample_inputs("opt", seed=0)
    feeds_file = scratch / f"{stage}.npz"
    np.savez(feeds_file, **arrays)
    calls = {}
    for precision, path in bundles.items():
        b = load_bundle(path)
        engine = load_engine(b.engine_path(stage), b.manifest.engines[stage], cfg.threads)
        calls[f"ort_{precision}"] = lambda e=engine: e(arrays)
    module, inputs, names = comp.module().eval(), comp.torch_inputs(arrays), comp.spec.output_names

    def eager():
        with torch.inference_mode():
            out = module(*inputs)
        return {n: o.numpy() for n, o in zip(names, out if isinstance(out, tuple) else (out,))}

    calls["torch_eager"] = eager
    log(f"weight-only: {stage}: {', '.join(calls)}, {cfg.warmup} warm-up + {cfg.runs} alternating runs")
    timed = run_alternating(calls, cfg.runs, cfg.warmup)
    reference = timed["torch_eager"].last
    eager_p50 = summarize(timed["torch_eager"].seconds)["p50_ms"]
    rows = []
    for name, t in timed.items():
        row = {"stage": stage, "candidate": name, **summarize(t.seconds), "accuracy": _accuracy(t.last, reference)}
        row["vs_eager"] = row["p50_ms"] / eager_p50
        if name.startswith("ort_"):
            row["memory"] = in_fresh_process("benchmarks.weight_only", "engine_memory", bundles[name[4:]], stage,
                                             str(feeds_file), cfg.threads)
        else:
            row["memory"] = {"bytes": sum(4 * p.numel() for p in module.parameters())}  # fp32 weights resident
        rows.append(row)
    return rows


def run_weight_only(cfg: WeightOnlyConfig, log=print) -> dict:
    """Build (or find) the bundles, then time and measure each stage. Returns the result JSON (kind
    "weight_only")."""
    import tempfile

    import torch

    from metacanvas_deploy.mc_export.build import load_model, resolve_ranges
    from metacanvas_deploy.mc_export.stages import plan_stages

    cfg = cfg.validate()
    bcfg = build_config(cfg.backbone, cfg.preset, None, cfg.cache)
    fp32 = cached_bundle(bcfg, log)
    model = load_model(bcfg)
    bundles = quantized_bundles(bcfg, model, fp32, log)
    torch.set_num_threads(cfg.threads)
    comps = plan_stages(model, resolve_ranges(model, bcfg.range_overrides))
    with tempfile.TemporaryDirectory(prefix="wo-bench-") as scratch:
        rows = [r for stage in cfg.stages for r in _stage(cfg, comps[stage], bundles, Path(scratch), log)]
    gates = {p: _gate(path) for p, path in bundles.items() if p != "fp32"}
    return {"kind": "weight_only", "env": fingerprint(cfg.threads, {p: str(b) for p, b in bundles.items()}),
            "config": {"backbone": cfg.backbone, "preset": cfg.preset, "runs": cfg.runs, "warmup": cfg.warmup,
                       "threads": cfg.threads, "stages": list(cfg.stages)},
            "rows": rows, "gates": gates}


def _gate(bundle: Path) -> dict:
    """What the build measured per quantized stage against the float bundle."""
    import json

    q = json.loads((Path(bundle) / "manifest.json").read_text())["build"]["quantization"]["stages"]
    return {s: {"layers": r["quantized_layers"], "kernels": r["integer_kernels"], **r["metrics"],
                "rounds": r.get("rounds", [])} for s, r in q.items()}


def render_weight_only(result: dict) -> str:
    """The Markdown table of a `weight-only` result."""
    c = result["config"]
    lines = [f"{c['backbone']} {c['preset']}: {c['runs']} alternating runs after {c['warmup']} warm-up, "
             f"{c['threads']} threads", "",
             "| stage | candidate | p50 | p90 | vs eager | bytes | private MiB (load / run) | cosine vs eager |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = r["memory"]
        private = (f"{mem['private_load_mb']:.0f} / {mem['private_run_mb']:.0f}" if "private_load_mb" in mem
                   else "(fp32 weights)")
        lines.append(f"| {r['stage']} | {r['candidate']} | {r['p50_ms']:.1f} ms | {r['p90_ms']:.1f} ms | "
                     f"{r['vs_eager']:.2f}x | {mem['bytes'] / 2**20:.1f} MiB | {private} | "
                     f"{r['accuracy']['cosine']:.6f} |")
    lines += ["", "Gates at build time (against the fp32 bundle):"]
    for precision, stages in result["gates"].items():
        for s, g in stages.items():
            first = (f"; round 0 (every layer at the recipe's bits): stage cosine "
                     f"{g['rounds'][0]['stage_cosine']:.5f}, {len(g['rounds'])} rounds" if g["rounds"] else "")
            lines.append(f"- {precision} {s}: {g['layers']} layers, PSNR {g['mean_psnr_db']:.1f} dB, stage cosine "
                         f"{g['stage_cosine']:.5f}{first}")
    return "\n".join(lines) + "\n"
