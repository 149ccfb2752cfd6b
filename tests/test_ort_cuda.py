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
from metacanvas_deploy.mc_export.errors import BuildError, ConfigError
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


@pytest.mark.parametrize("precision", ["bf16", "int8", "fp8"])
def test_onnxruntime_gpu_builds_fp32_and_fp16_and_says_what_works(tmp_path, precision):
    cfg = BuildConfig(out=tmp_path / "b", backbone="sana", target="onnxruntime-gpu", precision=precision)
    with pytest.raises(BuildError, match=rf"--precision {precision} cannot be built for onnxruntime-gpu yet.*"
                                         r"fp32, fp16 \(onnxruntime-gpu\).*--target tensorrt"):
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


# --- the TensorRT execution provider --------------------------------------------------------------------------

def test_tensorrt_provider_sessions_list_tensorrt_then_cuda_with_the_engine_cache(tmp_path):
    cache = tmp_path / "c"
    assert ort_cuda._providers("cuda", 1, False, cache, fp16=True) == [
        (ort_cuda.TRT_PROVIDER, {"device_id": "1", "trt_engine_cache_enable": "True",
                                 "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True",
                                 "trt_timing_cache_path": str(cache), "trt_fp16_enable": "True"}),
        (CUDA_PROVIDER, {"device_id": "1"}), "CPUExecutionProvider"]
    assert ort_cuda._providers("cuda", 0, True) == [(CUDA_PROVIDER, {"device_id": "0", "enable_cuda_graph": "1",
                                                                      "use_tf32": "0"})]  # fp32: no TF32
    assert ort_cuda._providers("cpu", 0, False, cache) == ["CPUExecutionProvider"]


def test_engine_cache_is_keyed_by_gpu_model_onnxruntime_and_file(bundles, tmp_path):
    entry = dataclasses.replace(load_bundle(bundles["sana"]).manifest.engines["denoise"],
                                device={**IDENTITY, "provider": ort_cuda.TRT_PROVIDER})
    here = ort_cuda.engine_cache_dir(entry, tmp_path)
    assert here == tmp_path / "nvidia-h200-sm9.0-ort1.32.0" / entry.sha256[:16]
    assert ort_cuda.engine_cache_dir(entry, tmp_path) == here  # the same engine, the same folder
    other_gpu = dataclasses.replace(entry, device={**entry.device, "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    other_file = dataclasses.replace(entry, sha256="0" * 64)
    assert len({here, ort_cuda.engine_cache_dir(other_gpu, tmp_path),
                ort_cuda.engine_cache_dir(other_file, tmp_path)}) == 3
    assert is_cuda_entry(entry) and ort_cuda.entry_provider(entry) == ort_cuda.TRT_PROVIDER


def test_a_tensorrt_provider_bundle_without_the_provider_is_a_clear_error(bundles, monkeypatch):
    import onnxruntime as ort

    bundle = load_bundle(bundles["sana"])
    entry = dataclasses.replace(bundle.manifest.engines["denoise"],
                                device={**IDENTITY, "provider": ort_cuda.TRT_PROVIDER})
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, "CPUExecutionProvider"])
    for load in (lambda: OrtCudaEngine(bundle.engine_path("denoise"), entry),
                 lambda: load_engine(bundle.engine_path("denoise"), entry, on_demand=True)):
        with pytest.raises(BundleError, match=r"TensorrtExecutionProvider \(built with --ort-provider tensorrt\).*"
                                              r"tensorrt-cu12.*or rebuild with --ort-provider cuda"):
            load()


def test_ort_provider_is_checked_before_any_work(tmp_path, monkeypatch):
    import onnxruntime as ort

    with pytest.raises(ConfigError, match="--ort-provider tensorrt .* needs --target onnxruntime-gpu"):
        BuildConfig(out=tmp_path / "b", backbone="sana", target="onnxruntime", ort_provider="tensorrt").validate()
    with pytest.raises(ConfigError, match="--ort-provider must be cuda or tensorrt"):
        BuildConfig(out=tmp_path / "b", backbone="sana", target="onnxruntime-gpu", ort_provider="rocm").validate(
            cuda_available=True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, "CPUExecutionProvider"])
    with pytest.raises(BuildError, match="--ort-provider tensorrt needs ONNX Runtime's TensorrtExecutionProvider"):
        BuildConfig(out=tmp_path / "b", backbone="sana", target="onnxruntime-gpu", ort_provider="tensorrt").validate()
    assert not (tmp_path / "b").exists()


# --- fp16 graphs (mc_export.ort_gpu) ------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sana", "wan"])
def fp16_stage(request, tmp_path_factory):
    """A tiny backbone's denoise stage: its raw export, and the fp16 file the onnxruntime-gpu build makes of it
    (optimised for the CPU provider here: the CUDA provider's fusions need a GPU)."""
    from metacanvas_deploy.mc_export.build import resolve_ranges
    from metacanvas_deploy.mc_export.export.onnx_export import export_component
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
    from metacanvas_deploy.mc_export.ort_gpu import prepare
    from metacanvas_deploy.mc_export.stages import plan_stages

    model = MetaCanvas.from_preset(request.param, "tiny", seed=0, random_canvas=True)
    comp = plan_stages(model, resolve_ranges(model, ()))["denoise"]
    tmp = tmp_path_factory.mktemp(f"fp16-{request.param}")
    raw, fp32, fp16 = tmp / "denoise.raw.onnx", tmp / "denoise.fp32.onnx", tmp / "denoise.onnx"
    export_component(comp, raw)
    prepare(raw, fp32, "fp32", tmp, providers=("CPUExecutionProvider",))
    prepare(raw, fp16, "fp16", tmp, providers=("CPUExecutionProvider",))
    return comp, raw, fp32, fp16


def test_fp16_graph_is_half_inside_and_float32_at_its_edges(fp16_stage):
    """Weights of the weight layers in fp16; the graph's I/O, the timestep embedding's sin/cos (prologue) and the
    scheduler update that writes next_sample (epilogue) in float32."""
    import onnx

    from metacanvas_deploy.calib.graph import fold_weight_transposes
    from metacanvas_deploy.mc_export.ort_gpu import float32_nodes, weight_nodes

    comp, raw, _, fp16 = fp16_stage
    model = onnx.load(str(fp16))
    f32 = onnx.TensorProto.FLOAT
    assert all(v.type.tensor_type.elem_type == f32 for v in [*model.graph.input, *model.graph.output]
               if v.type.tensor_type.elem_type in (f32, onnx.TensorProto.FLOAT16))
    converted = onnx.load(str(raw.with_name("denoise.raw.fp16.onnx")))  # before ONNX Runtime's fusions
    half = {t.name for t in converted.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    weights = weight_nodes(converted.graph)
    assert weights and all(n.input[1] in half for n in converted.graph.node if n.name in weights)

    graph = fold_weight_transposes(onnx.load(str(raw))).graph
    keep = set(float32_nodes(graph))
    assert weight_nodes(graph) == weights
    by_output = {o: n for n in graph.node for o in n.output}
    assert by_output["next_sample"].name in keep  # the scheduler update
    trig = [n.name for n in graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and set(trig) <= keep  # the timestep embedding
    assert weights and not (weights & keep)


def test_fp16_stage_passes_the_fp16_gate_and_is_not_the_fp32_graph(fp16_stage):
    """Against the PyTorch reference at fp16's tolerance (the one TensorRT's fp16 engines meet), run by the CUDA
    engine class on the CPU provider. The CPU computes the half nodes its own way (ONNX Runtime casts around
    kernels it lacks in fp16), so this checks the conversion, not the GPU's numbers."""
    from metacanvas_deploy.mc_export.export.onnx_export import parity_gate
    from metacanvas_deploy.mc_export.ort_gpu import cuda_runner
    from metacanvas_deploy.mc_export.tensorrt.precision import GATE_TOLERANCE

    comp, _, fp32, fp16 = fp16_stage
    entry = comp.spec.engine_entry(fp16.name, "onnxruntime", "1.32.0", "fp16")
    half = parity_gate(comp, cuda_runner(fp16, entry, device="cpu"), tolerance=GATE_TOLERANCE["fp16"])
    full = parity_gate(comp, fp32)
    assert max(r.max_rel for r in half) > 10 * max(r.max_rel for r in full)  # fp16 rounding is there


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
