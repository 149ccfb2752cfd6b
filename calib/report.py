"""`python -m calib report --bundle DIR`: a quantized bundle's accuracy against its float bundle, measured now
on held-out prompts and seeds (per quantized stage, then end to end), beside what the build recorded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metacanvas_deploy.calib import capture as cap
from metacanvas_deploy.calib.errors import BundleMismatchError
from metacanvas_deploy.calib.quantize import psnr, update_cosine
from metacanvas_deploy.calib.recipes import Recipe


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


@dataclass(frozen=True)
class Report:
    """A quantized bundle measured against its float bundle: the Markdown lines, and every budget it misses
    (empty: it meets them all)."""

    lines: list[str]
    misses: list[str]

    @property
    def passed(self) -> bool:
        return not self.misses


def report(bundle: str | Path, float_bundle: str | Path | None = None, threads: int | None = None) -> Report:
    """Measure ``bundle`` now against its float bundle (default: the one the build recorded) on held-out
    prompts and seeds, per quantized stage (update cosine) and end to end (PSNR), against the recipe's budget."""
    from metacanvas_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=threads)
    quant = pipe.manifest.build.get("quantization")
    if not quant:
        raise BundleMismatchError(f"{bundle} is a {pipe.manifest.build.get('precision', '?')} bundle, not a quantized one")
    if quant.get("mode") == "streamed":  # weight-only straight from the checkpoint: gated against PyTorch
        return _streamed_report(pipe.manifest, quant)
    ref = Pipeline.load(float_bundle or quant["float_bundle"], threads=threads)
    if ref.manifest.build.get("cache_key") != quant["float_cache_key"]:
        raise BundleMismatchError(f"{ref.bundle.path} is not the float bundle {bundle} was calibrated against "
                          "(cache keys differ); rebuild both, or pass --float with the right one")
    lines = [f"# {pipe.manifest.backbone} {pipe.manifest.build['precision']} vs fp32 ({ref.bundle.path})", ""]
    stages = quant["stages"]
    for stage, rec in stages.items():
        recipe = Recipe.from_json(rec["recipe"])
        lines += [f"## stage `{stage}`: recipe {recipe.name} ({rec['recipe_sha256'][:12]}), "
                  f"{rec['quantized_layers']} layers in {rec.get('precision', recipe.format)}, "
                  f"{len(rec['kept_float'])} kept float, "
                  f"{len(rec['fallback'])} moved back by the fallback loop", ""]
    recipe = Recipe.from_json(next(iter(stages.values()))["recipe"])
    reqs = cap.requests(tuple(pipe.manifest.tasks), recipe.held_out_prompts, recipe.held_out_seeds, "held_out")
    steps = recipe.evaluation_steps
    lines += ["| stage | output | cosine | max-rel |", "|---|---|---|---|"]
    misses = []
    for stage in stages:
        worst = _stage_worst(pipe, ref, stage, reqs[:1], steps)
        lines += [f"| {stage} | {n}{' (update)' if n == 'next_sample' else ''} | {c:.6f} | {r:.3e} |"
                  for n, (c, r) in worst.items()]
        cosine = min(c for c, _ in worst.values())
        budget = Recipe.from_json(stages[stage]["recipe"]).budget.min_stage_cosine
        if cosine < budget:
            misses.append(f"stage {stage}: cosine {cosine:.6f} < budget {budget}")
    values = [psnr(cap.run(pipe, r, steps).frames, cap.run(ref, r, steps).frames) for r in reqs]
    b = recipe.budget
    mean = float(np.mean(values))
    verdict = "meets" if mean >= b.min_psnr_db else f"misses by {b.min_psnr_db - mean:.2f} dB"
    if mean < b.min_psnr_db:
        misses.append(f"end to end: mean PSNR {mean:.2f} dB < budget {b.min_psnr_db} dB")
    lines += ["", f"End to end, {len(reqs)} held-out request{'' if len(reqs) == 1 else 's'} ({steps} steps): PSNR "
              f"mean {mean:.2f} dB, min {min(values):.2f} dB; budget {b.min_psnr_db} dB: {verdict}.",
              "Recorded at build time: " + ", ".join(f"{s}: {r['metrics']['mean_psnr_db']:.2f} dB, cosine "
                                                     f"{r['metrics']['stage_cosine']:.6f}" for s, r in stages.items())]
    return Report(lines, misses)


def _stage_worst(pipe, ref, stage: str, reqs, steps: int) -> dict[str, tuple[float, float]]:
    """Per output of ``stage``: the worst (cosine, max-rel) of the quantized engine against the float one on
    the float pipeline's own inputs (the update's cosine for the step's next sample)."""
    worst: dict[str, tuple[float, float]] = {}
    for f in cap.capture(ref, stage, reqs, steps):
        ours, theirs = pipe.engines[stage](f), ref.engines[stage](f)
        for name in ours:
            if name == "next_sample":
                c, r = update_cosine(f, ours[name], theirs[name])
            else:
                c = _cosine(ours[name], theirs[name])
                r = float(np.max(np.abs(ours[name] - theirs[name])) / max(1e-12, np.max(np.abs(theirs[name]))))
            old = worst.get(name, (1.0, 0.0))
            worst[name] = (min(old[0], c), max(old[1], r))
    return worst


def _streamed_report(manifest, quant) -> Report:
    """A bundle whose weight-only stages were built straight from the checkpoint (no float bundle): what their
    gates against the PyTorch fp32 stages measured at build time (`python -m mc_export verify` runs them again)."""
    lines = [f"# {manifest.backbone}: weight-only stages built from the checkpoint, gated against PyTorch fp32 "
             "(no float bundle; `python -m mc_export verify --bundle DIR` re-runs the gates)", "",
             "| stage | precision | layers | output | case | cosine | max-rel | tolerance |",
             "|---|---|---|---|---|---|---|---|"]
    for stage, rec in quant["stages"].items():
        tol = rec["gate"]["tolerance"]
        lines += [f"| {stage} | {rec['precision']} | {rec['quantized_layers']} | {r['output']} | {r['case']} | "
                  f"{r['cosine']:.6f} | {r['max_rel']:.3e} | cosine >= {tol['min_cosine']}, max-rel <= "
                  f"{tol['max_rel']} |" for r in rec["gate"]["rows"]]
    return Report(lines, [])
