"""Compiled step caching (issue 16): the FULL/CACHED step graphs, the mask, the schedule picker, the runtime's
host and device loops, and the refusals. One tiny SANA bundle is built with --cache auto (the graphs exported and
gated, the curve measured, the schedule picked) and shared by the module; the other backbones' graphs are checked
in PyTorch (an export each would take tens of seconds)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import trt_doubles as doubles
from trt_doubles import FakeCudart, FakeTensorRT

from metacanvas_deploy.calib.capture import requests
from metacanvas_deploy.calib.quantize import psnr
from metacanvas_deploy.mc_export import backbones
from metacanvas_deploy.mc_export.build import BuildConfig, build, load_model, resolve_ranges
from metacanvas_deploy.mc_export.cli import main as compiler_main
from metacanvas_deploy.mc_export.components.step_cache import cache_stages
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.stages import plan_stages
from metacanvas_deploy.mc_export.step_cache_build import cache_gate, candidates
from metacanvas_deploy.runtime.bundle import load_bundle
from metacanvas_deploy.runtime.cached_steps import cached_loop
from metacanvas_deploy.runtime.cli import main as runtime_main
from metacanvas_deploy.runtime.errors import ManifestError, RuntimeInputError
from metacanvas_deploy.runtime.manifest import Manifest
from metacanvas_deploy.runtime.ort_cuda import OrtCudaEngine
from metacanvas_deploy.runtime.pipeline import Pipeline
from metacanvas_deploy.runtime.step_cache import CACHED_STAGE, FULL_STAGE, magcache_mask, request_mask, resample
from metacanvas_deploy.runtime.trt_engine import TrtEngine, make_identity

STEPS = 6
KONTEXT_28 = (1.0, 1.19531, 1.07812, 1.02344, 1.03125, 1.00781, 1.02344, 1.01562, 1.01562, 1.0, 1.01562, 1.0, 1.00781,
              1.0, 1.00781, 1.0, 1.00781, 0.99609, 1.01562, 0.99219, 1.0, 0.99219, 0.98438, 0.99609, 0.96484, 0.96094,
              0.9375, 0.93359)  # MagCache4FLUX_Kontext/magcache_flux_kontext.py (Zehong-Ma/MagCache)


@pytest.fixture(scope="module")
def cached_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("step_cache") / "sana"
    return build(BuildConfig(out=out, backbone="sana", steps=STEPS, cache="auto"), log=lambda *a: None)


@pytest.fixture(scope="module")
def pipe(cached_bundle):
    return Pipeline.load(cached_bundle, threads=1)


# --- the graphs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["wan", "flux", "sana"])
def test_cached_step_with_the_full_steps_residual_is_the_full_step(backbone):
    """Oracle: the FULL PyTorch step (itself bit-identical to the uncached step) on the same inputs; CACHED fed
    FULL's residual differs by one float rounding of the hidden state (x + (y - x) for y)."""
    model = load_model(BuildConfig(out="unused", backbone=backbone).validate())
    stages = cache_stages(plan_stages(model, resolve_ranges(model, ())), backbones.get(backbone).cache_layout)
    full, cached = stages[FULL_STAGE], stages[CACHED_STAGE]
    feeds = full.sample_inputs("opt", seed=3)  # wan: r2v at opt (reference frames before the target's)
    ref, plain = full.reference(feeds), full.base.reference(feeds)
    got = cached.reference({**feeds, "residual": ref["residual"]})
    assert ref["residual"].shape == feeds["canvas"].shape and np.abs(ref["residual"]).max() > 0
    for name in full.base.spec.output_names:
        np.testing.assert_array_equal(ref[name], plain[name])
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-5 * max(1.0, np.abs(ref[name]).max()))
    blocks = {n for n, _ in cached.module().named_parameters() if ".transformer_blocks." in n or ".blocks." in n}
    assert not blocks, "the CACHED graph holds no block weights"


def test_the_exported_graphs_pass_the_cache_gate(cached_bundle):
    """Oracle: the FULL ONNX graph; the gate the build ran, run again on the bundle's files."""
    model = load_model(BuildConfig(out="unused", backbone="sana").validate())
    stages = cache_stages(plan_stages(model, resolve_ranges(model, ())), backbones.get("sana").cache_layout)
    rows = cache_gate(stages[FULL_STAGE], stages[CACHED_STAGE], cached_bundle / "denoise.onnx",
                      cached_bundle / "denoise_cached.onnx", seeds=(5, 6))
    assert rows and max(r.max_rel for r in rows) < 1e-5
    parity = load_bundle(cached_bundle).manifest.build["parity"]
    assert parity[FULL_STAGE] == parity[CACHED_STAGE] == "passed"


# --- the mask and the picker -------------------------------------------------------------------------------------

def test_mask_follows_magcache_rule():
    """Oracle: MagCache's algorithm worked by hand on a flat curve and on the published Kontext curve."""
    flat = (1.0,) + (0.99,) * 9
    # retain 0.2 of 10: steps 0, 1 FULL; then |1-0.99| = 0.01, 0.01 + |1-0.9801| = 0.0299 > 0.025 -> FULL, ...
    assert magcache_mask(flat, 10, 0.025, 4, 0.2) == (True, True, False, True, False, True, False, True, False, True)
    assert magcache_mask(flat, 10, 1.0, 2, 0.0) == (True, False, False, True, False, False, True, False, False, True)
    assert all(magcache_mask(flat, 10, 1e-4, 4, 0.0))
    assert resample(KONTEXT_28, 28) == KONTEXT_28 and len(resample(KONTEXT_28, 50)) == 50
    mask = magcache_mask(KONTEXT_28, 28, 0.05, 4, 0.2)  # the published Kontext setting (E005K4R02)
    assert all(mask[:6]) and mask.count(False) > 0


def test_schedule_picker_meets_its_budget_on_held_out_prompts(pipe):
    """Oracle: the uncached bundle's frames (cache='off') on held-out prompts and seeds the picker never saw."""
    cache = pipe.manifest.scheduler["cache"]
    measured = cache["measured"]
    assert cache["budget_db"] == 30.0 and measured["steps"] == STEPS and measured["cached"] > 0
    assert measured["psnr_db"] == "inf" or measured["psnr_db"] >= 30.0
    mask = request_mask(pipe.manifest, STEPS, "auto", RuntimeInputError)
    assert "".join("F" if m else "C" for m in mask) == measured["mask"]
    # the picked mask is the most aggressive candidate: every mask computing fewer steps missed the budget
    tried = {t["mask"]: t["psnr_db"] for t in measured["tried"]}
    fewer = [m for m in tried if m.count("F") < measured["computed"]]
    assert all(tried[m] < 30.0 for m in fewer)
    for req in requests(pipe.manifest.tasks, 2, (77,), "held_out"):  # seeds the build did not use
        ours = pipe(req.prompt, num_inference_steps=STEPS, seed=req.seed)
        ref = pipe(req.prompt, num_inference_steps=STEPS, seed=req.seed, cache="off")
        assert (ours.steps_computed, ours.steps_cached) == (measured["computed"], measured["cached"])
        assert (ref.steps_computed, ref.steps_cached) == (STEPS, 0)
        assert ours.calls == {**ours.calls, "denoise": measured["computed"], "denoise_cached": measured["cached"]}
        assert psnr(ours.frames, ref.frames) >= 30.0


def test_an_all_full_mask_is_todays_loop_bit_for_bit(pipe, bundles):
    """Oracle: the plain loop (cache='off') of the same bundle, and the uncached bundle of the same weights."""
    plain = pipe("a red fox", num_inference_steps=4, seed=3, cache="off")
    explicit = pipe("a red fox", num_inference_steps=4, seed=3, cache=(True,) * 4)
    np.testing.assert_array_equal(explicit.latents, plain.latents)
    uncached = Pipeline.load(bundles["sana"], threads=1)("a red fox", num_inference_steps=4, seed=3)
    np.testing.assert_array_equal(uncached.latents, plain.latents)
    np.testing.assert_array_equal(uncached.frames, plain.frames)
    # the cached loop itself, given an all-FULL mask, is the plain loop too
    run = pipe.request_engines()
    feeds, per_step, sample = _step_inputs(pipe, 4)
    got = cached_loop(run, feeds, {"sample": sample}, per_step, (True,) * 4, {"next_sample": "sample"}, False,
                      per_step)
    np.testing.assert_array_equal(got, plain.latents)


def _step_inputs(pipe, steps):
    calls = []
    with pipe.observe(FULL_STAGE, lambda feeds, outs: calls.append({k: np.array(v) for k, v in feeds.items()})):
        pipe("a red fox", num_inference_steps=steps, seed=3, cache="off")
    per_step = [{n: c[n] for n in ("timestep", "coefficients")} for c in calls]
    feeds = {n: a for n, a in calls[0].items() if n not in per_step[0] and n != "sample"}
    return feeds, per_step, calls[0]["sample"]


# --- the device loops, on the CPU provider and on the TensorRT/CUDA double -------------------------------------

def _host_reference(pipe, mask):
    return pipe("a red fox", num_inference_steps=len(mask), seed=4, cache=tuple(mask))


MASK = (True, False, False, True, False, True)


def test_io_binding_loop_follows_the_mask_bit_for_bit(pipe, cached_bundle):
    """Oracle: the host loop of the same request and mask (ONNX Runtime's CPU provider runs the IO-binding loop)."""
    expected = _host_reference(pipe, MASK)
    m = pipe.manifest
    identity = {"provider": "CUDAExecutionProvider", "gpu": "test"}
    engines = {s: OrtCudaEngine(pipe.bundle.engine_path(s), dataclasses.replace(m.engines[s], device=identity),
                                threads=1, device="cpu") for s in (FULL_STAGE, CACHED_STAGE)}
    got = pipe("a red fox", num_inference_steps=len(MASK), seed=4, cache=MASK, engines=engines)
    np.testing.assert_array_equal(got.latents, expected.latents)
    assert (engines[FULL_STAGE].calls, engines[CACHED_STAGE].calls) == (3, 3)
    assert got.calls["denoise"] == 3 and got.calls["denoise_cached"] == 3


def test_tensorrt_loop_replays_one_graph_per_step_kind(pipe, monkeypatch):
    """Oracle: the host loop. The TensorRT/CUDA double executes with ONNX Runtime: loop logic, not a GPU result."""
    expected = _host_reference(pipe, MASK)
    cudart = FakeCudart()
    doubles.install(monkeypatch, FakeTensorRT(cudart), cudart)
    device = make_identity("Fake GPU", 9, 0, doubles.H100["tensorrt"], 12090, 12090, False)
    m = pipe.manifest
    engines = {s: TrtEngine(pipe.bundle.engine_path(s), dataclasses.replace(
        m.engines[s], backend="tensorrt", backend_version=doubles.H100["tensorrt"], device=device))
        for s in (FULL_STAGE, CACHED_STAGE)}
    got = pipe("a red fox", num_inference_steps=len(MASK), seed=4, cache=MASK, engines=engines)
    np.testing.assert_array_equal(got.latents, expected.latents)
    # FULL at 0 (plain, then captured), 3, 5 replayed; CACHED at 1 (plain, captured), 2, 4 replayed
    assert (cudart.captures, cudart.launches) == (2, 4)
    assert (engines[FULL_STAGE].calls, engines[CACHED_STAGE].calls) == (3, 3)
    for e in engines.values():
        e.close()


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache, words", [
    (1.5, "must be in \\(0, 1\\]"), ("fast", "'off', 'auto' or a number"), (0, "must be in"),
    ((False, True), "the first True"), ((True,) * 5, "5 entries for a 6-step request")])
def test_bad_runtime_cache_values_are_one_line(pipe, cache, words):
    with pytest.raises(RuntimeInputError, match=words):
        pipe("a red fox", num_inference_steps=STEPS, cache=cache)


def test_a_threshold_on_an_uncached_bundle_is_refused_at_load(bundles):
    with pytest.raises(RuntimeInputError, match="built without step caching"):
        Pipeline.load(bundles["sana"], cache=0.1)
    assert runtime_main(["generate", "--bundle", str(bundles["sana"]), "--prompt", "x", "--cache", "2",
                         "--out", "unused.png"]) == 2


@pytest.mark.parametrize("extra, words", [
    ({"cache": "1.5"}, "must be in"), ({"cache": "fast"}, "'off', 'auto' or a number"),
    ({"cache": "auto", "verify": False}, "--no-verify"), ({"cache": "auto", "precision": "int8"}, "--precision int8"),
    ({"cache": "auto", "target": "tensorrt", "export_only": True}, "--export-only"),
    ({"cache": "auto", "cache_budget_db": 0.0}, "--cache-budget")])
def test_bad_build_cache_options_are_refused_before_work(tmp_path, extra, words):
    cfg = BuildConfig(out=tmp_path / "b", backbone="sana", **extra)
    with pytest.raises(ConfigError, match=words):
        cfg.validate(gpu_available=False, cuda_available=False)
    assert not (tmp_path / "b").exists()


def test_the_cli_refuses_a_bad_cache_with_exit_2(tmp_path, capsys):
    assert compiler_main(["build", "--backbone", "sana", "--cache", "-1", "--out", str(tmp_path / "b")]) == 2
    assert "--cache must be in (0, 1]" in capsys.readouterr().err


def test_manifest_cache_section_is_validated_and_bounded(cached_bundle):
    text = (cached_bundle / "manifest.json").read_text()
    good = json.loads(text)
    for path, value, words in [(("threshold",), 7.0, "threshold"), (("curve",), [1.0], "curve"),
                               (("curve",), [1.0] * 1001, "curve"), (("max_skips",), 99, "max_skips"),
                               (("retain",), -0.1, "retain"), (("method",), "teacache", "method")]:
        bad = json.loads(text)
        bad["scheduler"]["cache"][path[0]] = value
        with pytest.raises(ManifestError, match=words):
            Manifest.from_dict(bad)
    bad = json.loads(text)
    del bad["engines"]["denoise_cached"]
    with pytest.raises(ManifestError, match="needs the 'denoise' and 'denoise_cached' stages"):
        Manifest.from_dict(bad)
    Manifest.from_dict(good)


def test_candidates_keep_the_most_conservative_parameters_per_mask():
    masks = candidates((1.0,) + (0.995,) * 5, STEPS, None)
    assert len(masks) > 1 and all(m[0] for m in masks)
    for mask, (t, k, r) in masks.items():
        assert magcache_mask((1.0,) + (0.995,) * 5, STEPS, t, k, r) == mask


def test_published_curves_give_the_published_speedups():
    """Oracle: MagCache's reported speed-ups (~2x on Wan2.2-TI2V-5B at 50 steps, 2.0x on FLUX.1-Kontext at 28):
    their curves at their settings compute about half the steps here too."""
    from benchmarks.step_cache import published_masks

    rows = {(r["model"], r["steps"]): r for r in published_masks() if r["published_setting"]}
    assert rows["Wan2.2-TI2V-5B", 50]["computed"] == 25
    assert rows["FLUX.1-Kontext-dev", 28]["computed"] == 14
    assert all(r["mask"].startswith("F" * 6) for r in rows.values())


def test_a_published_curve_is_taken_as_given_and_still_judged_by_the_budget(pipe):
    """Oracle: the uncached bundle's frames, as for a measured curve; the curve is stored as given."""
    from metacanvas_deploy.mc_export.step_cache_build import compile_schedule

    schedule = compile_schedule(pipe, STEPS, None, 30.0, lambda *a: None, curve=KONTEXT_28, source="MagCache Kontext")
    assert schedule.curve == KONTEXT_28 and schedule.source == "given: MagCache Kontext"
    assert schedule.measured["calibration_requests"] == 0
    assert schedule.measured["psnr_db"] == "inf" or schedule.measured["psnr_db"] >= 30.0
    assert schedule.mask(STEPS) == tuple(c == "F" for c in schedule.measured["mask"])


def test_a_bad_cache_curve_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"curve": [1.0, -2.0]}')
    assert compiler_main(["build", "--backbone", "sana", "--cache", "auto", "--cache-curve", str(tmp_path / "c.json"),
                          "--out", str(tmp_path / "b")]) == 2
    assert "--cache-curve: expected 2..1000 magnitude ratios" in capsys.readouterr().err
    (tmp_path / "d.json").write_text('{"curv": []}')
    assert compiler_main(["build", "--backbone", "sana", "--cache-curve", str(tmp_path / "d.json"),
                          "--out", str(tmp_path / "b")]) == 2
    assert 'expected a JSON object with a "curve" list' in capsys.readouterr().err
    with pytest.raises(ConfigError, match="add --cache auto"):
        BuildConfig(out=tmp_path / "b", backbone="sana", cache_curve=(1.0, 1.0)).validate(gpu_available=False)
    assert not (tmp_path / "b").exists()
