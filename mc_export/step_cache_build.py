"""Step caching at build time (`build --cache auto|<threshold>`): the gate between the two step graphs, the model's
magnitude-ratio curve measured on calibration prompts, and the schedule picked against an accuracy budget on
held-out prompts and seeds. The result is the manifest's ``scheduler.cache`` (`runtime.step_cache.CacheSchedule`);
the runtime derives each request's mask from it.

The picker: every candidate (threshold x max consecutive skips x always-computed early share) gives a mask at the
build's step count; distinct masks are measured from the most aggressive (fewest FULL steps) on, each by the PSNR
of its decoded frames against the uncached bundle's (the same requests, prompts and seeds: `calib.quantize.psnr`,
the quantization gate's measure), and the first whose worst request reaches the budget wins, with the most
conservative parameters that give it (smallest threshold and skip cap, largest early share: the mask they derive
at other step counts is then the safest).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metacanvas_deploy.calib.capture import requests
from metacanvas_deploy.calib.quantize import psnr
from metacanvas_deploy.mc_export.errors import BuildError
from metacanvas_deploy.mc_export.export.parity import check_rows, compare
from metacanvas_deploy.runtime.media import synthetic_media
from metacanvas_deploy.runtime.step_cache import CACHED_STAGE, FULL_STAGE, RESIDUAL, CacheSchedule, magcache_mask

THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.18, 0.25, 0.35, 0.5, 0.7, 1.0)
MAX_SKIPS = (1, 2, 3, 4)
RETAIN = (0.3, 0.2, 0.1)
DEFAULT_SKIPS, DEFAULT_RETAIN = 2, 0.2  # MagCache's published Wan2.2 setting (E006K2R02) for a given threshold


@dataclass(frozen=True)
class CacheRequests:
    """Who the curve is measured on and who judges the schedule (disjoint prompts and seeds)."""

    calibration_prompts: int = 2
    held_out_prompts: int = 2
    calibration_seeds: tuple[int, ...] = (0,)
    held_out_seeds: tuple[int, ...] = (1000,)


def cache_gate(full, cached, full_file: Path, cached_file: Path, seeds=(211, 212)) -> list:
    """The export's step-cache gate: the CACHED ONNX graph fed the FULL graph's residual for the same inputs gives
    FULL's outputs within the stage's tolerance (they differ by one rounding of the hidden state: the head sees
    ``x + (y - x)`` for ``y``). StageParityError with the table otherwise."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in (full_file, cached_file)]
    names = full.base.spec.output_names
    rows = []
    for seed, which in zip(seeds, ("opt", "min")):
        feeds = full.sample_inputs(which, seed=seed)
        ref = dict(zip([*names, RESIDUAL], sessions[0].run([*names, RESIDUAL], feeds)))
        ours = dict(zip(names, sessions[1].run(names, {**feeds, RESIDUAL: ref[RESIDUAL]})))
        rows += [compare(CACHED_STAGE, f"{which}+res", n, ours[n], ref[n]) for n in names]
    return check_rows(CACHED_STAGE, rows, cached.spec.tolerance)


def _generate(pipe, req, steps: int, cache, observe=None):
    d = pipe.manifest.defaults
    media = synthetic_media(req.task, d["height"], d["width"], d["num_frames"], req.seed)
    if observe is None:
        return pipe(req.prompt, task=req.task, num_inference_steps=steps, seed=req.seed, cache=cache, **media)
    with pipe.observe(FULL_STAGE, observe):
        return pipe(req.prompt, task=req.task, num_inference_steps=steps, seed=req.seed, cache=cache, **media)


def measure_curve(pipe, reqs, steps: int) -> tuple[float, ...]:
    """MagCache's calibration: at every step, the mean over target tokens of |residual_i| / |residual_{i-1}| (norms
    over the hidden width), averaged over CFG rows and requests; 1.0 at step 0."""
    sums = np.zeros(steps)
    for req in reqs:
        norms = []
        _generate(pipe, req, steps, "off", lambda feeds, out: norms.append(np.linalg.norm(out[RESIDUAL], axis=-1)))
        if len(norms) != steps:
            raise BuildError(f"measuring the step-cache curve: {len(norms)} FULL calls for {steps} steps")
        for i in range(1, steps):
            ratio = norms[i] / np.maximum(norms[i - 1], 1e-12)  # (rows, T, h, w)
            sums[i] += float(ratio.reshape(ratio.shape[0], -1).mean(axis=1).mean())
    curve = sums / len(reqs)
    curve[0] = 1.0
    return tuple(round(float(v), 5) for v in curve)


def candidates(curve, steps: int, threshold: float | None) -> dict[tuple[bool, ...], tuple[float, int, float]]:
    """Distinct mask -> the most conservative (threshold, max skips, retain) giving it. A given ``threshold`` is
    taken with MagCache's published skip cap and early share."""
    grid = ([(threshold, DEFAULT_SKIPS, DEFAULT_RETAIN)] if threshold is not None
            else itertools.product(THRESHOLDS, MAX_SKIPS, RETAIN))
    out: dict[tuple[bool, ...], tuple[float, int, float]] = {}
    for t, k, r in grid:  # in order: smaller thresholds and caps, larger early shares first
        out.setdefault(magcache_mask(curve, steps, t, k, r), (t, k, r))
    return out


def pick_schedule(pipe, curve, steps: int, threshold: float | None, budget_db: float, held, log) -> dict:
    """The most aggressive mask whose worst held-out PSNR reaches ``budget_db``; returns its parameters and
    figures. BuildError when a given ``threshold`` misses the budget."""
    refs = [_generate(pipe, req, steps, "off").frames for req in held]
    tried = []
    for mask, (t, k, r) in sorted(candidates(curve, steps, threshold).items(), key=lambda kv: sum(kv[0])):
        if all(mask):
            return {"threshold": t, "max_skips": k, "retain": r, "psnr_db": math.inf, "mask": mask, "tried": tried}
        worst = min(psnr(_generate(pipe, req, steps, mask).frames, ref) for req, ref in zip(held, refs))
        tried.append({"mask": _text(mask), "threshold": t, "max_skips": k, "retain": r, "psnr_db": _db(worst)})
        log(f"  step cache: {_text(mask)} (threshold {t}, skips {k}, retain {r}): worst PSNR {worst:.1f} dB")
        if worst >= budget_db:
            return {"threshold": t, "max_skips": k, "retain": r, "psnr_db": worst, "mask": mask, "tried": tried}
        if threshold is not None:
            raise BuildError(f"--cache {threshold}: the mask {_text(mask)} reaches {worst:.1f} dB on held-out "
                             f"prompts, below the {budget_db:g} dB budget; give a smaller threshold, --cache auto, "
                             "or a lower --cache-budget")
    least = tried[-1] if tried else {"mask": "-", "psnr_db": "-"}
    raise BuildError(f"no step-cache schedule reaches the {budget_db:g} dB budget on held-out prompts: the least "
                     f"aggressive, {least['mask']}, reaches {least['psnr_db']} dB; lower --cache-budget or build "
                     "without --cache")


def compile_schedule(pipe, steps: int, threshold: float | None, budget_db: float, log,
                     who: CacheRequests = CacheRequests(), curve=None, source: str = "") -> CacheSchedule:
    """Curve (measured, or a published ``curve`` from ``source``), picked schedule and its figures for the bundle
    ``pipe`` runs (uncached and cached per request)."""
    tasks = pipe.manifest.tasks
    calib = requests(tasks, who.calibration_prompts, who.calibration_seeds, "calibration")
    held = requests(tasks, who.held_out_prompts, who.held_out_seeds, "held_out")
    if curve is None:
        curve = measure_curve(pipe, calib, steps)
        source = (f"measured: {len(calib)} calibration request(s) x CFG rows, prompts from calib's 'calibration' "
                  f"split, seeds {list(who.calibration_seeds)}")
    else:
        curve, source, calib = tuple(float(v) for v in curve), f"given: {source or 'no source named'}", []
    log(f"  step cache: magnitude-ratio curve ({len(curve)} steps): {', '.join(f'{v:.3f}' for v in curve)}")
    best = pick_schedule(pipe, curve, steps, threshold, budget_db, held, log)
    mask = best["mask"]
    measured = {"steps": steps, "mask": _text(mask), "computed": sum(mask), "cached": steps - sum(mask),
                "psnr_db": _db(best["psnr_db"]), "held_out_requests": len(held),
                "held_out_seeds": list(who.held_out_seeds), "calibration_requests": len(calib),
                "tried": best["tried"]}
    log(f"  step cache: {_text(mask)} ({sum(mask)} of {steps} steps computed, worst held-out PSNR "
        f"{best['psnr_db']:.1f} dB; budget {budget_db:g} dB)")
    return CacheSchedule(curve=curve, threshold=best["threshold"], max_skips=best["max_skips"],
                         retain=best["retain"], source=source, budget_db=budget_db, measured=measured)


def _text(mask) -> str:
    """F = FULL, C = CACHED, one letter per step."""
    return "".join("F" if m else "C" for m in mask)


def _db(value: float) -> float | str:
    return "inf" if math.isinf(value) else round(float(value), 2)


def bundle_schedule(cfg, components, tmp: Path, manifest, steps: int, log) -> CacheSchedule:
    """The build's step: gate CACHED against FULL on the written ONNX files, then measure and pick on the bundle
    being written (``tmp`` with its unsealed ``manifest``)."""
    from metacanvas_deploy.runtime.bundle import Bundle
    from metacanvas_deploy.runtime.pipeline import Pipeline

    rows = cache_gate(components[FULL_STAGE], components[CACHED_STAGE], tmp / f"{FULL_STAGE}.onnx",
                      tmp / f"{CACHED_STAGE}.onnx")
    worst = max(rows, key=lambda r: r.max_rel)
    log(f"  {CACHED_STAGE}: fed {FULL_STAGE}'s residual, equals it (worst {worst.output} max_rel "
        f"{worst.max_rel:.2e}, cosine {min(r.cosine for r in rows):.7f})")
    pipe = Pipeline(Bundle(path=Path(tmp), manifest=manifest), verify_hashes=False)
    threshold = None if cfg.cache == "auto" else float(cfg.cache)
    return compile_schedule(pipe, steps, threshold, cfg.cache_budget_db, log, curve=cfg.cache_curve,
                            source=cfg.cache_curve_source)
