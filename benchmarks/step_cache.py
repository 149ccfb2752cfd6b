"""`python -m benchmarks step-cache`: what compiled step caching (`build --cache`) buys and costs.

With a model (``--backbone B [--preset small]``): its bundle is built with ``--cache auto`` (the schedule picked on
the build's held-out requests, `mc_export.step_cache_build`), then requests run alternately uncached
(``cache="off"``) and cached (the bundle's schedule), on prompts of calib's held-out split with seeds the build
did not use; reported per mode: DiT seconds per request (the denoise stages' engine time), end to end, steps
computed, and the PSNR of the cached frames against the uncached ones of the same request.

With ``--published``: the magnitude-ratio curves MagCache publishes for Wan2.2-TI2V-5B and FLUX.1-Kontext-dev
(`PUBLISHED`, with where each comes from) through the same mask rule, at 50 and 28 steps: the masks a build taking
the curve from a recipe would compile. No model runs; no PSNR (there are no weights here to measure it on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bundles import DEFAULT_CACHE
from benchmarks.env import fingerprint
from benchmarks.errors import BenchmarkError

# MagCache's published curves. Wan: per step [cond, uncond] interleaved (50 steps x 2 CFG rows), averaged here per
# step (our curve is averaged over CFG rows); Kontext: 28 steps, no CFG (guidance-distilled).
PUBLISHED = {
    "Wan2.2-TI2V-5B": {
        "source": "SUPPORTED_MODELS_MAG_RATIOS['wan2.2_ti2v_5B'] in nodes.py of ComfyUI-MagCache (MagCache's "
                  "ComfyUI nodes; read from the wzgrx/ComfyUI-MagCache fork); setting E006K2R02 from "
                  "Zehong-Ma/MagCache MagCache4Wan2.2/README.md",
        "threshold": 0.06, "max_skips": 2, "retain": 0.2, "interleaved_rows": 2,
        "ratios": [1.0] * 2 + [
            0.99505, 0.99389, 0.99441, 0.9957, 0.99558, 0.99551, 0.99499, 0.9945, 0.99534, 0.99548, 0.99468, 0.9946,
            0.99463, 0.99458, 0.9946, 0.99453, 0.99408, 0.99404, 0.9945, 0.99441, 0.99409, 0.99398, 0.99403, 0.99397,
            0.99382, 0.99377, 0.99349, 0.99343, 0.99377, 0.99378, 0.9933, 0.99328, 0.99303, 0.99301, 0.99217, 0.99216,
            0.992, 0.99201, 0.99201, 0.99202, 0.99133, 0.99132, 0.99112, 0.9911, 0.99155, 0.99155, 0.98958, 0.98957,
            0.98959, 0.98958, 0.98838, 0.98835, 0.98826, 0.98825, 0.9883, 0.98828, 0.98711, 0.98709, 0.98562, 0.98561,
            0.98511, 0.9851, 0.98414, 0.98412, 0.98284, 0.98282, 0.98104, 0.98101, 0.97981, 0.97979, 0.97849, 0.97849,
            0.97557, 0.97554, 0.97398, 0.97395, 0.97171, 0.97166, 0.96917, 0.96913, 0.96511, 0.96507, 0.96263, 0.96257,
            0.95839, 0.95835, 0.95483, 0.95475, 0.94942, 0.94936, 0.9468, 0.94678, 0.94583, 0.94594, 0.94843, 0.94872,
            0.96949, 0.97015]},
    "FLUX.1-Kontext-dev": {
        "source": "mag_ratios and setting (E005K4R02) in Zehong-Ma/MagCache "
                  "MagCache4FLUX_Kontext/magcache_flux_kontext.py (its extra rule forcing step 11 of 28 is not "
                  "applied)",
        "threshold": 0.05, "max_skips": 4, "retain": 0.2, "interleaved_rows": 1,
        "ratios": [1.0, 1.19531, 1.07812, 1.02344, 1.03125, 1.00781, 1.02344, 1.01562, 1.01562, 1.0, 1.01562, 1.0,
                   1.00781, 1.0, 1.00781, 1.0, 1.00781, 0.99609, 1.01562, 0.99219, 1.0, 0.99219, 0.98438, 0.99609,
                   0.96484, 0.96094, 0.9375, 0.93359]},
}
PUBLISHED_STEPS = (50, 28)


@dataclass(frozen=True)
class StepCacheConfig:
    backbone: str | None = None
    preset: str | None = None
    bundle: Path | None = None  # a bundle built with --cache (default: built into the cache folder)
    steps: int = 8
    runs: int = 2
    threads: int = 2
    budget_db: float = 30.0
    published: bool = False
    cache: Path = DEFAULT_CACHE


def published_masks() -> list[dict]:
    """Each published curve (rows averaged) at `PUBLISHED_STEPS`, at its published setting and at every threshold
    of the build's grid (with the published cap and early share)."""
    from metacanvas_deploy.mc_export.step_cache_build import THRESHOLDS
    from metacanvas_deploy.runtime.step_cache import magcache_mask

    out = []
    for model, p in PUBLISHED.items():
        rows, ratios = p["interleaved_rows"], p["ratios"]
        curve = tuple(sum(ratios[i:i + rows]) / rows for i in range(0, len(ratios), rows))
        for steps in PUBLISHED_STEPS:
            for t in sorted({p["threshold"], *THRESHOLDS}):
                mask = magcache_mask(curve, steps, t, p["max_skips"], p["retain"])
                out.append({"model": model, "steps": steps, "threshold": t, "max_skips": p["max_skips"],
                            "retain": p["retain"], "published_setting": t == p["threshold"],
                            "mask": "".join("F" if m else "C" for m in mask), "computed": sum(mask),
                            "source": p["source"]})
    return out


def _bundle(cfg: StepCacheConfig, log) -> Path:
    from metacanvas_deploy.mc_export.build import BuildConfig, build

    if cfg.bundle is not None:
        return cfg.bundle
    if cfg.backbone is None:
        raise BenchmarkError("step-cache needs --bundle DIR (built with --cache), --backbone B, or --published")
    preset = cfg.preset or "small"
    out = Path(cfg.cache) / f"{cfg.backbone}-{preset}-cache{cfg.steps}"
    return build(BuildConfig(out=out, backbone=cfg.backbone, preset=preset, steps=cfg.steps, cache="auto",
                             cache_budget_db=cfg.budget_db), log=log)


def run_step_cache(cfg: StepCacheConfig, log=print) -> dict:
    """The result JSON (module docstring)."""
    result = {"kind": "step_cache", "env": fingerprint(cfg.threads), "published": published_masks()}
    if cfg.published and cfg.backbone is None and cfg.bundle is None:
        return result
    from metacanvas_deploy.calib.capture import requests
    from metacanvas_deploy.calib.quantize import psnr
    from metacanvas_deploy.runtime.manifest_fields import thaw
    from metacanvas_deploy.runtime.media import synthetic_media
    from metacanvas_deploy.runtime.pipeline import Pipeline

    bundle = _bundle(cfg, log)
    pipe = Pipeline.load(bundle, threads=cfg.threads)
    m = pipe.manifest
    if "cache" not in m.scheduler:
        raise BenchmarkError(f"{bundle} was built without --cache: nothing to compare")
    d = m.defaults
    reqs = requests(m.tasks, cfg.runs, (2000,), "held_out")

    def call(req, cache):
        media = synthetic_media(req.task, d["height"], d["width"], d["num_frames"], req.seed)
        start = time.perf_counter()
        out = pipe(req.prompt, task=req.task, num_inference_steps=cfg.steps, seed=req.seed, cache=cache, **media)
        return out, time.perf_counter() - start

    warm = reqs[0]  # both step engines once (ONNX Runtime's first run allocates)
    pipe(warm.prompt, task=warm.task, num_inference_steps=2, seed=1, cache=(True, False),
         **synthetic_media(warm.task, d["height"], d["width"], d["num_frames"], 1))
    runs = []
    for req in reqs:
        ref, ref_s = call(req, "off")
        ours, ours_s = call(req, "auto")
        runs.append({"prompt": req.prompt, "seed": req.seed, "psnr_db": round(psnr(ours.frames, ref.frames), 2),
                     "uncached": _figures(ref, ref_s), "cached": _figures(ours, ours_s)})
        log(f"  {req.prompt[:40]!r}: DiT {runs[-1]['uncached']['dit_s']} -> {runs[-1]['cached']['dit_s']} s, "
            f"PSNR {runs[-1]['psnr_db']} dB")
    schedule = thaw(m.scheduler["cache"])  # plain JSON values (the manifest's are frozen)
    result.update(bundle=str(bundle), backbone=m.backbone, preset=m.preset, steps=cfg.steps,
                  schedule={k: v for k, v in schedule.items() if k != "measured"},
                  build_measured=schedule["measured"], runs=runs)
    return result


def _figures(out, seconds: float) -> dict:
    full, cached = out.timings.get("denoise", 0.0), out.timings.get("denoise_cached", 0.0)
    return {"dit_s": round(full + cached, 3), "end_to_end_s": round(seconds, 3), "computed": out.steps_computed,
            "cached": out.steps_cached, "full_step_s": round(full / max(1, out.steps_computed), 3),
            "cached_step_s": round(cached / out.steps_cached, 3) if out.steps_cached else None}


def render_step_cache(result: dict) -> str:
    """Markdown: the measured rows (if a model ran) and the published curves' masks."""
    lines = ["# step_cache", ""]
    if "runs" in result:
        s = result["schedule"]
        lines += [f"{result['backbone']} {result['preset']}, {result['steps']} steps, threshold {s['threshold']}, "
                  f"max skips {s['max_skips']}, early share {s['retain']} (budget {s['budget_db']} dB; build's "
                  f"mask {result['build_measured']['mask']})", "",
                  "| request | DiT s off | DiT s cached | e2e s off | e2e s cached | steps computed | PSNR dB |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["runs"]:
            u, c = r["uncached"], r["cached"]
            lines.append(f"| {r['prompt'][:32]} (seed {r['seed']}) | {u['dit_s']} | {c['dit_s']} | "
                         f"{u['end_to_end_s']} | {c['end_to_end_s']} | {c['computed']}/{u['computed']} | "
                         f"{r['psnr_db']} |")
        lines.append("")
    lines += ["| model | steps | threshold | skips | early | mask (F computed, C cached) | computed |",
              "|---|---|---|---|---|---|---|"]
    for p in result["published"]:
        mark = " (published)" if p["published_setting"] else ""
        lines.append(f"| {p['model']} | {p['steps']} | {p['threshold']}{mark} | {p['max_skips']} | {p['retain']} | "
                     f"`{p['mask']}` | {p['computed']} |")
    return "\n".join(lines) + "\n"
