"""`--target onnxruntime-gpu` (runtime.ort_cuda): provider selection and its errors, the build's refusal without
CUDA, and the IO-binding step loop run on the CPU provider, bit-identical to the per-step host loop. Nothing
here is a GPU result: the CPU machine has the CPU onnxruntime. GPU tests (`-m gpu`) skip without onnxruntime-gpu
and a visible GPU; scripts/gpu_check.sh runs them."""

from __future__ import annotations

import dataclasses
import subprocess
import types

import numpy as np
import pytest

from metacanvas_deploy.mc_export.build import BuildConfig
from metacanvas_deploy.mc_export.errors import BuildError
from metacanvas_deploy.runtime import ort_cuda
from metacanvas_deploy.runtime.bundle import load_bundle
from metacanvas_deploy.runtime.engine import OnDemandEngine, OrtEngine, load_engine
from metacanvas_deploy.runtime.errors import BundleError, ShapeError
from metacanvas_deploy.runtime.ort_cuda import CUDA_PROVIDER, OrtCudaEngine, cuda_usable, is_cuda_entry
from metacanvas_deploy.runtime.pipeline import Pipeline

IDENTITY = {"provider": CUDA_PROVIDER, "gpu": "NVIDIA H200", "compute_capability": "9.0", "cuda_runtime": "12.9",
            "cuda_driver": "575.57.08", "onnxruntime": "1.32.0"}
STATE = {"next_sample": "sample", "next_last_sample": "last_sample", "next_history": "history"}


def _cuda_entry(entry):
    return dataclasses.replace(entry, device=IDENTITY)


# --- provider selection and its errors ----------------------------------------------------------------------

def test_a_cuda_entry_is_recognised_by_its_provider(bundles):
    entry = load_bundle(bundles["sana"]).manifest.engines["denoise"]
    assert not is_cuda_entry(entry) and is_cuda_entry(_cuda_entry(entry))
    assert not is_cuda_entry(dataclasses.replace(entry, device={"provider": "CPUExecutionProvider"}))


@pytest.mark.skipif(cuda_usable(), reason="this machine has onnxruntime-gpu")
def test_a_cuda_bundle_without_onnxruntime_gpu_is_a_clear_error(bundles):
    bundle = load_bundle(bundles["sana"])
    entry, path = _cuda_entry(bundle.manifest.engines["denoise"]), bundle.engine_path("denoise")
    for load in (lambda: load_engine(path, entry), lambda: load_engine(path, entry, on_demand=True)):
        with pytest.raises(BundleError, match=r"CUDAExecutionProvider.*pip uninstall -y onnxruntime && "
                                              r"pip install onnxruntime-gpu==1.32.0.*--target onnxruntime"):
            load()


def test_a_session_that_fell_back_to_the_cpu_is_refused(bundles, monkeypatch):
    """onnxruntime-gpu present but no usable device: ONNX Runtime quietly runs on the CPU; we refuse."""
    import onnxruntime as ort

    bundle = load_bundle(bundles["sana"])
    entry, path = _cuda_entry(bundle.manifest.engines["denoise"]), bundle.engine_path("denoise")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, "CPUExecutionProvider"])
    monkeypatch.setattr(ort_cuda, "_providers", lambda *a: ["CPUExecutionProvider"])  # what a fallback leaves
    with pytest.raises(BundleError, match="could not place the graph on CUDAExecutionProvider"):
        OrtCudaEngine(path, entry)
    assert isinstance(OnDemandEngine(path, entry), OnDemandEngine)  # the pre-check passes; the open would fail


def test_cuda_identity_reads_nvidia_smi_and_onnxruntime(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, "CPUExecutionProvider"])
    monkeypatch.setattr(ort_cuda.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    seen = []

    def smi(cmd, **kw):
        seen.append(cmd)
        return types.SimpleNamespace(stdout="NVIDIA H200, 9.0, 575.57.08\n")
    monkeypatch.setattr(ort_cuda.subprocess, "run", smi)
    got = ort_cuda.cuda_identity()
    assert {k: got[k] for k in ("provider", "gpu", "compute_capability", "cuda_driver")} == {
        "provider": CUDA_PROVIDER, "gpu": "NVIDIA H200", "compute_capability": "9.0", "cuda_driver": "575.57.08"}
    assert got["onnxruntime"] == ort.__version__ and "--id=0" in seen[0]

    def missing(cmd, **kw):
        raise subprocess.CalledProcessError(9, cmd)
    monkeypatch.setattr(ort_cuda.subprocess, "run", missing)
    with pytest.raises(BundleError, match="no NVIDIA GPU 0 is visible.*--target onnxruntime"):
        ort_cuda.cuda_identity()


# --- the build's checks -------------------------------------------------------------------------------------

def test_build_for_onnxruntime_gpu_without_cuda_is_refused_before_any_work(tmp_path):
    cfg = BuildConfig(out=tmp_path / "b", backbone="sana", target="onnxruntime-gpu")
    if not cuda_usable():
        with pytest.raises(BuildError, match=r"--target onnxruntime-gpu needs onnxruntime-gpu.*pip uninstall -y "
                                             r"onnxruntime.*--target onnxruntime \(or auto\)"):
            cfg.validate()
    assert cfg.validate(cuda_available=True).target == "onnxruntime-gpu"
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "fp8"])
def test_onnxruntime_gpu_is_fp32_only_and_says_what_works(tmp_path, precision):
    cfg = BuildConfig(out=tmp_path / "b", backbone="sana", target="onnxruntime-gpu", precision=precision)
    with pytest.raises(BuildError, match=rf"--precision {precision} cannot be built for onnxruntime-gpu yet.*"
                                         r"fp32 \(onnxruntime-gpu\).*--target tensorrt"):
        cfg.validate(cuda_available=True)


# --- the IO-binding loop on the CPU provider ----------------------------------------------------------------

def _recorded_loop(pipe: Pipeline, **request):
    """(feeds of step 0, per-step inputs, outputs of the last step) of a real request, step by step on the host."""
    calls = []
    with pipe.observe("denoise", lambda feeds, outs: calls.append(({k: np.array(v) for k, v in feeds.items()},
                                                                   {k: np.array(v) for k, v in outs.items()}))):
        pipe("a red fox", seed=5, **request)
    per_step = [{n: feeds[n] for n in ("timestep", "coefficients")} for feeds, _ in calls]
    first = {n: a for n, a in calls[0][0].items() if n not in per_step[0]}
    return first, per_step, calls[-1][1]


@pytest.mark.parametrize("backbone", ["sana", "wan"])  # Euler (one state tensor) and UniPC (three)
def test_io_binding_loop_equals_the_host_loop_bit_for_bit(bundles, backbone):
    bundle = load_bundle(bundles[backbone])
    pipe = Pipeline(bundle, threads=1)
    feeds, per_step, expected = _recorded_loop(pipe, num_inference_steps=4)
    entry, path = _cuda_entry(bundle.manifest.engines["denoise"]), bundle.engine_path("denoise")
    state = {o: i for o, i in STATE.items() if o in {s.name for s in entry.outputs}}
    engine = OrtCudaEngine(path, entry, threads=1, device="cpu")
    for _ in range(2):  # the second run reuses the signature's buffers
        got = engine.run_steps(feeds, state, per_step)
        assert sorted(got) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert engine.calls == 2 * len(per_step) == 8
    odd = engine.run_steps(feeds, state, per_step[:3])  # an odd count ends in the other buffer of each pair
    ref = OrtEngine(path, entry, threads=1)
    host = dict(feeds)
    for step in per_step[:3]:
        out = ref({**host, **step})
        host.update({i: out[o] for o, i in state.items()})
    for name in out:
        np.testing.assert_array_equal(odd[name], out[name], err_msg=name)
    engine.close()


def test_pipeline_runs_the_device_loop_for_a_cuda_entry(bundles):
    bundle = load_bundle(bundles["wan"])
    pipe = Pipeline(bundle, threads=1)
    entry, path = _cuda_entry(bundle.manifest.engines["denoise"]), bundle.engine_path("denoise")
    engine = OrtCudaEngine(path, entry, threads=1, device="cpu")
    plain = pipe("a red fox", seed=2, num_inference_steps=3)
    looped = pipe("a red fox", seed=2, num_inference_steps=3, engines={"denoise": engine})
    assert engine.calls == 3 and looped.calls["denoise"] == 3
    np.testing.assert_array_equal(looped.latents, plain.latents)
    np.testing.assert_array_equal(looped.frames, plain.frames)


def test_loop_arguments_are_checked(bundles):
    bundle = load_bundle(bundles["sana"])
    entry, path = _cuda_entry(bundle.manifest.engines["denoise"]), bundle.engine_path("denoise")
    engine = OrtCudaEngine(path, entry, threads=1, device="cpu")
    with pytest.raises(ShapeError, match="at least one step"):
        engine.run_steps({}, {"next_sample": "sample"}, [])
    with pytest.raises(ShapeError, match="must map an output to a non-per-step input"):
        engine.run_steps({}, {"next_sample": "timestep"}, [{"timestep": np.zeros(1, np.float32)}])


# --- on a GPU -------------------------------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(not cuda_usable(), reason="needs an NVIDIA GPU with onnxruntime-gpu "
                                                        "(scripts/gpu_check.sh installs it)")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("backbone", ["sana", "wan"])
def test_cuda_graph_loop_equals_the_plain_cuda_loop_and_the_cpu(bundles, backbone):
    bundle = load_bundle(bundles[backbone])
    feeds, per_step, expected = _recorded_loop(Pipeline(bundle, threads=1), num_inference_steps=4)
    entry, path = _cuda_entry(bundle.manifest.engines["denoise"]), bundle.engine_path("denoise")
    state = {o: i for o, i in STATE.items() if o in {s.name for s in entry.outputs}}
    engine = load_engine(path, entry)
    assert isinstance(engine, OrtCudaEngine)
    plain = engine.run_steps(feeds, state, per_step, use_cuda_graph=False)
    graphed = [engine.run_steps(feeds, state, per_step) for _ in range(2)]  # capture, then replay
    for name in expected:
        for got in graphed:
            np.testing.assert_array_equal(got[name], plain[name], err_msg=name)
        np.testing.assert_allclose(plain[name], expected[name], rtol=1e-3, atol=1e-4, err_msg=name)
