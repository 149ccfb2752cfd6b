"""Compiled step caching, the runtime's half: the bundle's schedule (`CacheSchedule`, the manifest's
``scheduler.cache``) and the per-step mask it gives for any step count (`magcache_mask`). numpy-free, pure.

A cached bundle has two step engines: ``denoise`` (FULL: the step as always, also writing the transformer blocks'
residual) and ``denoise_cached`` (CACHED: the residual FULL wrote last added instead of running the blocks).
MagCache's decision depends only on the step index: a per-model magnitude-ratio curve (the ratio of the residual's
norm at step i to step i - 1, ~1 in the middle of sampling), a threshold on the error accumulated over consecutive
skipped steps, a cap on consecutive skips and a share of early steps always computed. So the mask is derived here
from the curve for whatever step count a request asks for (the curve resampled to it, as MagCache's reference code
does), the same every time: nothing depends on the data, no host synchronisation is needed to follow it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metacanvas_deploy.runtime.limits import MAX_STEPS
from metacanvas_deploy.runtime.manifest_fields import fail

FULL_STAGE, CACHED_STAGE, RESIDUAL = "denoise", "denoise_cached", "residual"
MAX_THRESHOLD = 1.0  # accumulated |1 - ratio| beyond this skips steps whose residual changed by 100%
MAX_SKIPS = 16  # consecutive CACHED steps; MagCache publishes 2-4
MIN_RATIO, MAX_RATIO = 1e-3, 1e3  # a magnitude ratio outside these is not a measurement
METHOD = "magcache"
_KEYS = {"method", "curve", "threshold", "max_skips", "retain", "source", "budget_db", "measured"}


def resample(curve: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """The curve at ``steps`` points by nearest neighbour over the same span (MagCache's ``nearest_interp``)."""
    if steps == len(curve):
        return tuple(curve)
    if steps == 1:
        return (curve[-1],)
    scale = (len(curve) - 1) / (steps - 1)
    return tuple(curve[int(math.floor(i * scale + 0.5))] for i in range(steps))


def magcache_mask(curve, steps: int, threshold: float, max_skips: int, retain: float) -> tuple[bool, ...]:
    """True = FULL (compute the blocks), False = CACHED, for each of ``steps`` steps. Steps before
    ``round(retain * steps)`` (and step 0 always) are FULL; after that a step is CACHED while the error accumulated
    since the last FULL step, sum over skipped steps of |1 - product of ratios|, stays within ``threshold`` and at
    most ``max_skips`` steps in a row are skipped (MagCache, Algorithm 1)."""
    ratios = resample(tuple(curve), steps)
    first = max(1, int(retain * steps + 0.5))
    mask, acc_ratio, acc_err, run = [], 1.0, 0.0, 0
    for i in range(steps):
        if i < first:
            mask.append(True)
            continue
        acc_ratio *= ratios[i]
        acc_err += abs(1.0 - acc_ratio)
        run += 1
        if acc_err <= threshold and run <= max_skips:
            mask.append(False)
        else:
            mask.append(True)
            acc_ratio, acc_err, run = 1.0, 0.0, 0
    return tuple(mask)


def check_threshold(value: Any, error: type[Exception], name: str = "cache threshold") -> float:
    """A threshold as a finite float in (0, MAX_THRESHOLD], or ``error`` naming it."""
    if isinstance(value, (bool, bytes)) or value is None:
        raise error(f"{name} must be a number in (0, {MAX_THRESHOLD:g}], got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be 'off', 'auto' or a number in (0, {MAX_THRESHOLD:g}], got {value!r}") from None
    if not (math.isfinite(v) and 0.0 < v <= MAX_THRESHOLD):
        raise error(f"{name} must be in (0, {MAX_THRESHOLD:g}], got {value!r}")
    return v


@dataclass(frozen=True)
class CacheSchedule:
    """The manifest's ``scheduler.cache``: curve (one ratio per step of the calibration step count; the first is
    1.0, step 0 has no predecessor), threshold, max consecutive skips, always-computed early share, where the curve
    came from, the accuracy budget and what the build measured (opaque figures)."""

    curve: tuple[float, ...]
    threshold: float
    max_skips: int
    retain: float
    source: str
    budget_db: float
    measured: Mapping[str, Any]

    def mask(self, steps: int, threshold: float | None = None) -> tuple[bool, ...]:
        """The mask for a ``steps``-step request (``threshold``: a runtime override of the bundle's)."""
        t = self.threshold if threshold is None else threshold
        return magcache_mask(self.curve, steps, t, self.max_skips, self.retain)

    def to_dict(self) -> dict:
        return {"method": METHOD, "curve": list(self.curve), "threshold": self.threshold,
                "max_skips": self.max_skips, "retain": self.retain, "source": self.source,
                "budget_db": self.budget_db, "measured": dict(self.measured)}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "scheduler.cache") -> CacheSchedule:
        """Validated and bounded; ManifestError naming the field otherwise."""
        if not isinstance(obj, Mapping):
            raise fail(where, f"expected an object, got {type(obj).__name__}")
        if set(obj) != _KEYS:
            raise fail(where, f"expected exactly the keys {', '.join(sorted(_KEYS))}, got {', '.join(sorted(obj))}")
        if obj["method"] != METHOD:
            raise fail(f"{where}.method", f"expected {METHOD!r}, got {obj['method']!r}")
        curve = obj["curve"]
        if not curve_ok(curve):
            raise fail(f"{where}.curve", f"expected 2..{MAX_STEPS} magnitude ratios in [{MIN_RATIO:g}, "
                                         f"{MAX_RATIO:g}]")
        if not (_real(obj["threshold"]) and 0.0 < obj["threshold"] <= MAX_THRESHOLD):
            raise fail(f"{where}.threshold", f"expected a number in (0, {MAX_THRESHOLD:g}]")
        skips = obj["max_skips"]
        if isinstance(skips, bool) or not isinstance(skips, int) or not 1 <= skips <= MAX_SKIPS:
            raise fail(f"{where}.max_skips", f"expected an integer in 1..{MAX_SKIPS}")
        if not (_real(obj["retain"]) and 0.0 <= obj["retain"] <= 1.0):
            raise fail(f"{where}.retain", "expected a share in [0, 1]")
        if not (_real(obj["budget_db"]) and 0.0 < obj["budget_db"] <= 200.0):
            raise fail(f"{where}.budget_db", "expected a PSNR budget in (0, 200] dB")
        if not isinstance(obj["source"], str) or len(obj["source"]) > 1000:
            raise fail(f"{where}.source", "expected a string of at most 1000 characters")
        if not isinstance(obj["measured"], Mapping):
            raise fail(f"{where}.measured", "expected an object")
        return cls(curve=tuple(float(v) for v in curve), threshold=float(obj["threshold"]), max_skips=skips,
                   retain=float(obj["retain"]), source=obj["source"], budget_db=float(obj["budget_db"]),
                   measured=obj["measured"])


def curve_ok(curve) -> bool:
    """A magnitude-ratio curve: 2..MAX_STEPS finite ratios in [MIN_RATIO, MAX_RATIO]."""
    return (isinstance(curve, (list, tuple)) and 2 <= len(curve) <= MAX_STEPS
            and all(_real(v) and MIN_RATIO <= v <= MAX_RATIO for v in curve))


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def bundle_schedule(manifest) -> CacheSchedule | None:
    """The bundle's schedule, or None for a bundle without step caching."""
    cache = manifest.scheduler.get("cache")
    return None if cache is None else CacheSchedule.from_dict(cache)


def check_cache_arg(cache, error: type[Exception]):
    """A step-caching choice: "auto" (the bundle's schedule), "off", a threshold in (0, MAX_THRESHOLD] (a number
    or its text) that replaces the bundle's, or an explicit mask (a tuple of bools, True = FULL: the build's
    schedule picker and benchmarks); ``error`` naming the fix otherwise."""
    if isinstance(cache, str) and cache in ("auto", "off"):
        return cache
    if isinstance(cache, (tuple, list)):
        if not cache or len(cache) > MAX_STEPS or not all(isinstance(m, bool) for m in cache) or not cache[0]:
            raise error(f"cache: a mask is 1..{MAX_STEPS} bools (True = FULL), the first True (step 0 computes the "
                        f"residual the next steps reuse), got {list(cache)[:8]!r}")
        return tuple(cache)
    return check_threshold(cache, error, "cache")


def request_mask(manifest, steps: int, cache, error: type[Exception]) -> tuple[bool, ...] | None:
    """The mask a request follows: None when nothing is cached (``cache="off"``, a bundle without the CACHED
    stage, or a mask that computes every step). ``cache``: "auto"/None (the bundle's threshold), "off", or a
    threshold (a number, or its text) that replaces the bundle's. ``error`` for a bad value."""
    cache = "auto" if cache is None else check_cache_arg(cache, error)
    if cache == "off":
        return None
    if isinstance(cache, tuple):
        if len(cache) != steps:
            raise error(f"cache: the mask has {len(cache)} entries for a {steps}-step request")
        if CACHED_STAGE not in manifest.engines:
            raise error(f"cache: this bundle has no {CACHED_STAGE!r} stage to follow a mask with; rebuild it with "
                        "`python -m mc_export build ... --cache auto`")
        return None if all(cache) else cache
    threshold = None if cache == "auto" else cache
    schedule = bundle_schedule(manifest)
    if schedule is None:
        if threshold is not None:
            raise error(f"cache={cache!r}: this bundle was built without step caching (no {CACHED_STAGE!r} "
                        "stage); rebuild it with `python -m mc_export build ... --cache auto`, or pass cache='off'")
        return None
    mask = schedule.mask(steps, threshold)
    return None if all(mask) else mask


def check_manifest_cache(manifest) -> None:
    """Manifest-level consistency: a schedule only with both step stages, and the residual they exchange."""
    cache = manifest.scheduler.get("cache")
    if cache is None:
        return
    CacheSchedule.from_dict(cache)
    engines = manifest.engines
    if FULL_STAGE not in engines or CACHED_STAGE not in engines:
        raise fail("scheduler.cache", f"a step-cache schedule needs the {FULL_STAGE!r} and {CACHED_STAGE!r} stages")
    out = [s for s in engines[FULL_STAGE].outputs if s.name == RESIDUAL]
    inp = [s for s in engines[CACHED_STAGE].inputs if s.name == RESIDUAL]
    if not out or not inp or out[0].dims != inp[0].dims:
        raise fail("scheduler.cache", f"{FULL_STAGE!r} must output and {CACHED_STAGE!r} take the same {RESIDUAL!r}")
