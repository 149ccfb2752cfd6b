"""The TensorRT target, as far as a machine without a GPU can check it, plus the GPU checks that skip here.

CPU: the precision table's decisions and messages; optimisation profiles against the specs and the runtime's
shape binding; device identity checks; that a CPU machine never needs tensorrt, cuda-python or polygraphy;
the graph checks TensorRT needs (on a raw SANA step export and on a bundle's ORT-optimised files); and the
step loop's logic (`TrtEngine.run_steps`: per-step table, state copies, CUDA-graph capture and replay) on a
test double of TensorRT and the CUDA runtime that executes with ONNX Runtime, against the host loop.

GPU (`-m gpu`, skipped without TensorRT and a CUDA device): build an fp32 engine from the raw SANA step, parity
against ONNX Runtime within the spec's tolerance, CUDA-graph replay bit-identical to plain execution.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import trt_doubles as doubles
from trt_doubles import H100, FakeBuilderTRT, FakeCudart, FakeTensorRT, gpu_ready

from metacanvas_deploy.mc_export.build import resolve_ranges
from metacanvas_deploy.mc_export.components.denoise import STATE_INPUTS, STATE_OUTPUTS
from metacanvas_deploy.mc_export.errors import BuildError, ConfigError, ExportError
from metacanvas_deploy.mc_export.tensorrt.builder import (
    BuildOptions,
    _parseable,
    check_onnx,
    lower_sequences,
    timing_cache_path,
)
from metacanvas_deploy.mc_export.tensorrt.precision import (
    DEVICE_CLASSES,
    PRECISIONS,
    RULES,
    buildable,
    check_precision,
    parse_sm,
)
from metacanvas_deploy.mc_export.tensorrt.profiles import pinned_dims, profile_shapes
from metacanvas_deploy.runtime.backbones.common import shape_of
from metacanvas_deploy.runtime.bundle import load_bundle
from metacanvas_deploy.runtime.engine import OrtEngine
from metacanvas_deploy.runtime.errors import BundleError
from metacanvas_deploy.runtime.schedulers import make_plan
from metacanvas_deploy.runtime.tensor_spec import DimRange
from metacanvas_deploy.runtime.trt_engine import TrtEngine, check_device, make_identity

ROOT = Path(__file__).parents[1]
STATE = {"next_sample": "sample", **dict(zip(STATE_OUTPUTS, STATE_INPUTS))}  # output -> input it feeds


def gpu(name: str = "NVIDIA T4", cc: str = "7.5") -> dict:
    return {"gpu": name, "compute_capability": cc}


# --- the precision table --------------------------------------------------------------------------------------

def test_fp8_on_turing_is_refused_naming_what_it_can_build():
    with pytest.raises(BuildError,
                       match=r"fp8 needs compute capability >= 8\.9.*can build: fp32, fp16, int8, w8, w4$"):
        check_precision("fp8", gpu("NVIDIA T4", "7.5"))


def test_bf16_needs_ampere():
    with pytest.raises(BuildError, match=r"bf16 needs compute capability >= 8\.0"):
        check_precision("bf16", gpu("NVIDIA T4", "7.5"))
    check_precision("bf16", gpu("NVIDIA A100", "8.0"))


def test_fp8_on_ada_is_accepted():
    check_precision("fp8", gpu("NVIDIA L4", "8.9"))


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_jetson_orin_takes_fp32_fp16_int8_only(precision):
    with pytest.raises(BuildError, match=r"Jetson Orin.*fp32, fp16, int8 only.*can build: fp32, fp16, int8"):
        check_precision(precision, gpu("Orin", "8.7"))
    for ok in ("fp32", "fp16", "int8"):
        check_precision(ok, gpu("Orin", "8.7"))


@pytest.mark.parametrize("device", [H100, gpu("NVIDIA Thor", "10.1"), gpu("NVIDIA Thor", "11.0"),
                                    gpu("NVIDIA B200", "10.0"), gpu("NVIDIA GeForce RTX 5090", "12.0")])
def test_hopper_blackwell_and_thor_take_every_precision(device):
    for precision in PRECISIONS:
        check_precision(precision, device)


def test_a_gpu_newer_than_the_table_follows_the_thresholds_and_an_older_one_is_refused():
    assert buildable("13.0") == PRECISIONS
    with pytest.raises(BuildError, match="older than the SM 7.5.*--target onnxruntime"):
        check_precision("fp32", gpu("Tesla V100", "7.0"))
    with pytest.raises(BuildError, match="unknown precision 'int4'"):
        check_precision("int4", H100)
    with pytest.raises(BuildError, match="must look like '8.9'"):
        parse_sm("sm90")


def test_the_table_is_consistent():
    sms = [cc for c in DEVICE_CLASSES for cc in c.compute_capabilities]
    assert len(sms) == len(set(sms)), "a compute capability in two classes"
    assert all(parse_sm(cc) for cc in sms)
    assert all(set(c.precisions or PRECISIONS) <= set(PRECISIONS) for c in DEVICE_CLASSES)
    assert set(RULES) == set(PRECISIONS)


def test_network_mode_of_each_precision():
    """int8/fp8 come from Q/DQ graphs in a strongly typed network; fp16/bf16 are builder flags on a weakly typed
    one (strong typing forbids them); fp32 is strongly typed with TF32 off, so fp32 means fp32."""
    assert all(RULES[p].strongly_typed and RULES[p].needs_qdq and not RULES[p].builder_flags for p in ("int8", "fp8"))
    assert [RULES[p].builder_flags for p in ("fp16", "bf16")] == [("FP16",), ("BF16",)]
    assert not RULES["fp16"].strongly_typed and not RULES["bf16"].strongly_typed
    assert RULES["fp32"].strongly_typed and not RULES["fp32"].tf32 and not RULES["fp32"].builder_flags


def test_build_options_rules():
    assert BuildOptions(precision="fp8", weight_streaming=True).validate() is RULES["fp8"]
    with pytest.raises(BuildError, match="weight streaming needs a strongly typed network"):
        BuildOptions(precision="fp16", weight_streaming=True).validate()
    with pytest.raises(ConfigError, match="optimization level must be 0..5"):
        BuildOptions(optimization_level=7).validate()
    with pytest.raises(ConfigError, match="positive number of bytes"):
        BuildOptions(workspace_bytes=0).validate()


def test_timing_cache_is_keyed_by_the_device(tmp_path):
    path = timing_cache_path(H100, tmp_path)
    assert path == tmp_path / "nvidia-h100-80gb-hbm3-sm9.0-trt10.16.1.11.cache"
    assert timing_cache_path({**H100, "gpu": "NVIDIA L4", "compute_capability": "8.9"}, tmp_path) != path


# --- profiles -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def components():
    """backbone -> stage -> component of the tiny presets, as a build plans them (no export)."""
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
    from metacanvas_deploy.mc_export.stages import plan_stages

    out = {}
    for backbone in ("sana", "flux", "wan"):
        model = MetaCanvas.from_preset(backbone, "tiny", seed=0, random_canvas=True)
        out[backbone] = plan_stages(model, resolve_ranges(model, ()))
    return out


def test_profiles_are_the_specs_shapes_and_the_runtimes_binding(components):
    for backbone, stages in components.items():
        for stage, comp in stages.items():
            spec, profile = comp.spec, profile_shapes(comp.spec)
            assert list(profile) == spec.input_names, (backbone, stage)
            for k, which in enumerate(("min", "opt", "max")):
                bindings = {sym: r.at(which) for sym, r in spec.dims.items()}
                for t in spec.inputs:
                    assert profile[t.name][k] == spec.shapes(which)[t.name] == shape_of(t, bindings), \
                        (backbone, stage, t.name, which)


def test_a_static_profile_pins_every_symbol(components):
    spec = components["sana"]["denoise"].spec
    assert all(lo == opt == hi == spec.shapes("opt")[n] for n, (lo, opt, hi) in profile_shapes(spec, {}).items())
    pinned = profile_shapes(spec, {"h_tok": 8, "w_tok": 12, "rows": 1})
    assert pinned["sample"] == ((1, 4, 8, 12),) * 3
    assert pinned["canvas"][0] == pinned["canvas"][2] == (1, 1, 8, 12, spec.inputs[2].dims[-1])
    assert pinned_dims(spec, {"h_tok": 8})["prompt_tokens"] == DimRange(96, 96, 96)
    with pytest.raises(ConfigError, match="no dim 'frames' to pin"):
        profile_shapes(spec, {"frames": 3})
    with pytest.raises(ConfigError, match="cannot pin h_tok=64, the build covers 8..32"):
        profile_shapes(spec, {"h_tok": 64})


# --- device identity ------------------------------------------------------------------------------------------

def test_make_identity_formats_versions():
    ident = make_identity("Orin", 8, 7, "10.7.0", 12060, 12020, True)
    assert ident == {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.7.0", "cuda_runtime": "12.6",
                     "cuda_driver": "12.2", "jetson": True}


def test_same_device_passes():
    check_device(H100, dict(H100))


@pytest.mark.parametrize("field,value,words", [
    ("gpu", "NVIDIA L4", "GPU NVIDIA H100 80GB HBM3 (engine) vs NVIDIA L4 (here)"),
    ("compute_capability", "8.9", "compute capability 9.0 (engine) vs 8.9 (here)"),
    ("tensorrt", "10.16.0.72", "TensorRT 10.16.1.11 (engine) vs 10.16.0.72 (here)"),
])
def test_device_mismatch_names_what_differs_and_the_rebuild_command(field, value, words):
    with pytest.raises(BundleError) as e:
        check_device(H100, {**H100, field: value}, precision="fp16")
    assert words in str(e.value)
    assert "python -m mc_export build ... --target tensorrt --precision fp16" in str(e.value)


def test_every_difference_is_listed_at_once():
    with pytest.raises(BundleError, match="GPU .*; compute capability .*; TensorRT "):
        check_device(H100, make_identity("Orin", 8, 7, "10.7.0", 12060, 12020, True))


# --- a CPU machine never needs the GPU stack -------------------------------------------------------------------

def test_cpu_machine_never_imports_tensorrt_cuda_or_polygraphy(bundles):
    code = textwrap.dedent(f"""
        import dataclasses, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('tensorrt', 'cuda', 'polygraphy'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import metacanvas_deploy.mc_export.tensorrt.builder, metacanvas_deploy.mc_export.tensorrt.precision
        import metacanvas_deploy.mc_export.tensorrt.profiles, metacanvas_deploy.runtime.trt_engine
        from metacanvas_deploy.runtime.bundle import load_bundle
        from metacanvas_deploy.runtime.engine import load_engine
        from metacanvas_deploy.runtime.errors import BundleError
        from metacanvas_deploy.runtime.pipeline import Pipeline
        out = Pipeline.load({str(bundles['sana'])!r})('a fox', num_inference_steps=2)
        print('generated', out.frames.shape)
        bundle = load_bundle({str(bundles['sana'])!r})
        entry = dataclasses.replace(bundle.manifest.engines['denoise'], backend='tensorrt',
                                    backend_version='10.16.1.11', device={{'gpu': 'NVIDIA L4'}})
        try:
            load_engine(bundle.engine_path('denoise'), entry)
        except BundleError as e:
            print('refused:', e)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generated (1, 64, 64, 3)" in res.stdout
    assert "refused:" in res.stdout and "NVIDIA GPU with TensorRT" in res.stdout
    assert "--target onnxruntime" in res.stdout


# --- graph checks TensorRT needs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_step(components, tmp_path_factory):
    """(component, path): the SANA step exported as a build exports it, before ONNX Runtime's optimisation
    (the graph TensorRT builds from; ~25 s)."""
    from metacanvas_deploy.mc_export.export.onnx_export import export_component

    comp = components["sana"]["denoise"]
    path = tmp_path_factory.mktemp("trt_raw") / "denoise.onnx"
    export_component(comp, path, fused_attention=False)  # as a TensorRT build exports
    return comp, path


def test_the_raw_step_export_is_what_tensorrt_parses(raw_step):
    _, path = raw_step
    check_onnx(path, RULES["fp32"])
    model = onnx.load(str(path), load_external_data=False)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {20}
    with pytest.raises(BuildError, match="quantized ONNX.*Quantize it with calib/"):
        check_onnx(path, RULES["int8"])


def test_an_ort_optimised_bundle_graph_is_refused(bundles):
    path = load_bundle(bundles["sana"]).engine_path("denoise")
    with pytest.raises(BuildError, match=r"non-standard ops \['com\.microsoft\..*raw export"):
        check_onnx(path, RULES["fp32"])


def test_opset_double_and_external_data_problems_are_refused(raw_step, tmp_path):
    _, path = raw_step
    model = onnx.load(str(path))
    model.opset_import[0].version = 25
    onnx.save(model, str(tmp_path / "new_opset.onnx"))
    with pytest.raises(BuildError, match="opset 25; TensorRT 10's parser reads up to 24"):
        check_onnx(tmp_path / "new_opset.onnx", RULES["fp32"])

    model = onnx.load(str(path))
    (tmp_path / "ext").mkdir()
    onnx.save(model, str(tmp_path / "ext" / "step.onnx"), save_as_external_data=True, location="step.onnx.data",
              size_threshold=0)
    check_onnx(tmp_path / "ext" / "step.onnx", RULES["fp32"])  # weights beside the file: fine
    (tmp_path / "ext" / "step.onnx.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(BuildError, match=r"weights in \['step\.onnx\.data'\], which are not files in its dir"):
        check_onnx(tmp_path / "ext" / "step.onnx", RULES["fp32"])

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [2])
    cast = onnx.helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.DOUBLE, name="to_double")
    graph = onnx.helper.make_graph([cast], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]), str(tmp_path / "d.onnx"))
    with pytest.raises(ExportError, match="DOUBLE tensors"):
        check_onnx(tmp_path / "d.onnx", RULES["fp32"])


def _ort(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_sequences_are_lowered_to_split_exactly(raw_step, tmp_path):
    """TensorRT's parser has no SplitToSequence/SequenceAt (onnx-tensorrt operators.md); SANA's step (exported
    without onnxscript's optimizer) holds 4 and 12 of them. Lowered, ONNX Runtime gives the same bits."""
    comp, path = raw_step
    model = onnx.load(str(path))
    assert lower_sequences(model) == 4
    assert not {n.op_type for n in model.graph.node} & {"SplitToSequence", "SequenceAt"}
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "lowered.onnx"))
    feeds = comp.sample_inputs("opt", seed=5, overrides={"h_tok": 8, "w_tok": 12})
    np.testing.assert_array_equal(_ort(tmp_path / "lowered.onnx", feeds)[0], _ort(path, feeds)[0])


def test_lowering_keeps_external_weights_and_cleans_up(raw_step, tmp_path):
    comp, path = raw_step
    onnx.save(onnx.load(str(path)), str(tmp_path / "step.onnx"), save_as_external_data=True,
              location="step.onnx.data", size_threshold=0)
    feeds = comp.sample_inputs("min", seed=6)
    with _parseable(tmp_path / "step.onnx") as lowered:
        assert lowered != tmp_path / "step.onnx" and lowered.parent == tmp_path
        np.testing.assert_array_equal(_ort(lowered, feeds)[0], _ort(path, feeds)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.onnx", "step.onnx.data"]


def _sequence_graph(split_input: bool, keepdims: int, position: int):
    """x (3, 2) -> SplitToSequence(axis 0) -> SequenceAt(position) -> y; with a dynamic split size if asked."""
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 2])
    ins = [x] + ([h.make_tensor_value_info("n", onnx.TensorProto.INT64, [])] if split_input else [])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    pos = h.make_node("Constant", [], ["pos"], value=h.make_tensor("p", onnx.TensorProto.INT64, [], [position]))
    split = h.make_node("SplitToSequence", ["x", "n"] if split_input else ["x"], ["seq"], axis=0, keepdims=keepdims)
    at = h.make_node("SequenceAt", ["seq", "pos"], ["y"])
    graph = h.make_graph([pos, split, at], "g", ins, [y])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 20)])


@pytest.mark.parametrize("keepdims,position", [(0, -1), (1, 1)])
def test_lowering_size_one_parts_keeps_or_drops_the_axis_like_onnx(tmp_path, keepdims, position):
    model = _sequence_graph(False, keepdims, position)
    onnx.save(model, str(tmp_path / "seq.onnx"))
    lower_sequences(model)
    onnx.save(model, str(tmp_path / "split.onnx"))
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    want, got = _ort(tmp_path / "seq.onnx", {"x": x})[0], _ort(tmp_path / "split.onnx", {"x": x})[0]
    assert want.shape == got.shape and np.array_equal(want, got)


def test_a_dynamic_split_cannot_be_lowered():
    with pytest.raises(BuildError, match="sizes are not static"):
        lower_sequences(_sequence_graph(True, 1, 0))


def test_sizes_computed_at_run_time_lower_to_a_split_that_takes_them(tmp_path):
    """FLUX's joint attention splits text from image tokens by the request's lengths: sizes a 1-D tensor of static
    length (the part count) whose values come at run time. Lowered to `Split(x, sizes)`; ONNX Runtime gives the
    same parts as the sequence ops, for any sizes."""
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 2])
    sizes = h.make_tensor_value_info("sizes", onnx.TensorProto.INT64, [2])
    outs = [h.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None) for i in range(2)]
    nodes = [h.make_node("SplitToSequence", ["x", "sizes"], ["seq"], axis=0),
             *(h.make_node("Constant", [], [f"p{i}"], value=h.make_tensor(f"p{i}", onnx.TensorProto.INT64, [], [i]))
               for i in range(2)),
             *(h.make_node("SequenceAt", ["seq", f"p{i}"], [f"y{i}"]) for i in range(2))]
    model = h.make_model(h.make_graph(nodes, "g", [x, sizes], outs), opset_imports=[h.make_opsetid("", 20)])
    onnx.save(model, str(tmp_path / "seq.onnx"))
    assert lower_sequences(model) == 1
    assert [(n.op_type, list(n.input)) for n in model.graph.node if n.op_type == "Split"] == [("Split", ["x", "sizes"])]
    onnx.save(model, str(tmp_path / "split.onnx"))
    for n, cut in ((5, [2, 3]), (7, [7, 0])):
        feeds = {"x": np.arange(2 * n, dtype=np.float32).reshape(n, 2), "sizes": np.array(cut, np.int64)}
        for want, got in zip(_ort(tmp_path / "seq.onnx", feeds), _ort(tmp_path / "split.onnx", feeds), strict=True):
            assert want.shape == got.shape and np.array_equal(want, got)


def test_polygraphy_lint_passes_on_the_graph_tensorrt_parses(raw_step, tmp_path):
    """ONNX checker + ONNX Runtime node by node on the lowered step, at the spec's opt shapes (CPU only)."""
    pytest.importorskip("polygraphy", reason="polygraphy 0.53.6 + onnx-graphsurgeon 0.6.1 (test extras)")
    comp, path = raw_step
    model = onnx.load(str(path))
    lower_sequences(model)
    onnx.save(model, str(tmp_path / "lowered.onnx"))
    shapes = [f"{n}:[{','.join(map(str, opt))}]" for n, (_, opt, _) in profile_shapes(comp.spec).items()]
    report = tmp_path / "lint.json"
    cmd = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())", "check", "lint",
           str(tmp_path / "lowered.onnx"), "--input-shapes", *shapes, "-o", str(report)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads(report.read_text())["summary"]["failing"] == []


# --- the step loop's logic, on a test double of TensorRT + the CUDA runtime ------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """Install the doubles as `tensorrt` and `cuda.bindings.runtime`; returns a factory of (trt, cudart)."""
    def install(fail_capture: bool = False):
        cudart = FakeCudart()
        trt = FakeTensorRT(cudart, fail_capture)
        doubles.install(monkeypatch, trt, cudart)
        return trt, cudart
    return install


def _trt_entry(entry, device=None):
    return dataclasses.replace(entry, backend="tensorrt", backend_version=H100["tensorrt"],
                               device=device or make_identity("Fake GPU", 9, 0, H100["tensorrt"], 12090, 12090, False))


def _loop_inputs(comp, scheduler_config, steps: int, task: str | None = None):
    """(static feeds with the step-0 state, state map, per-step inputs) of a real plan of ``steps`` steps."""
    feeds = comp.sample_inputs("opt", seed=3, **({"task": task} if task else {}))
    plan = make_plan(dict(scheduler_config), steps)
    coefficients = plan.coefficient_array().astype(np.float32)
    per_step = [{"timestep": np.array([plan.timesteps[i]], np.float32), "coefficients": coefficients[i]}
                for i in range(steps)]
    state = {o: i for o, i in STATE.items() if o in comp.spec.output_names}
    return {n: a for n, a in feeds.items() if n not in per_step[0]}, state, per_step


def _host_loop(engine, feeds, state, per_step):
    """The reference: one host call per step, outputs fed back on the host (as `Pipeline.denoise` does)."""
    feeds = dict(feeds)
    for step in per_step:
        out = engine({**feeds, **step})
        feeds.update({i: out[o] for o, i in state.items()})
    return out


@pytest.mark.parametrize("backbone", ["sana", "wan"])  # Euler (one state tensor) and UniPC (three)
def test_step_loop_matches_the_host_loop(fake_gpu, bundles, components, backbone):
    bundle = load_bundle(bundles[backbone])  # built before the doubles exist: a build would take them for a GPU
    _, cudart = fake_gpu()
    entry, path = bundle.manifest.engines["denoise"], bundle.engine_path("denoise")
    feeds, state, per_step = _loop_inputs(components[backbone]["denoise"], bundle.manifest.scheduler["config"], 4,
                                          task="t2v" if backbone == "wan" else None)
    expected = _host_loop(OrtEngine(path, entry, threads=1), feeds, state, per_step)

    engine = TrtEngine(path, _trt_entry(entry))
    got = engine.run_steps(feeds, state, per_step)
    assert (cudart.captures, cudart.launches, engine.calls) == (1, 3, 4)  # step 0 plain, steps 1..3 replayed
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    plain = engine.run_steps(feeds, state, per_step, use_cuda_graph=False)
    assert (cudart.captures, cudart.launches) == (1, 3)
    np.testing.assert_array_equal(plain["next_sample"], expected["next_sample"])
    one = engine({**feeds, **per_step[0]})  # a plain call after the loop rebinds nothing it needs
    np.testing.assert_array_equal(one["next_sample"], OrtEngine(path, entry, threads=1)({**feeds, **per_step[0]})[
        "next_sample"])
    engine.close()
    assert not cudart.blocks, "every device buffer is freed"


def test_an_uncapturable_step_falls_back_with_a_warning(fake_gpu, bundles, components):
    bundle = load_bundle(bundles["sana"])
    _, cudart = fake_gpu(fail_capture=True)
    entry, path = bundle.manifest.engines["denoise"], bundle.engine_path("denoise")
    feeds, state, per_step = _loop_inputs(components["sana"]["denoise"], bundle.manifest.scheduler["config"], 3)
    expected = _host_loop(OrtEngine(path, entry, threads=1), feeds, state, per_step)
    with pytest.warns(RuntimeWarning, match="cannot be captured as a CUDA graph"):
        got = TrtEngine(path, _trt_entry(entry)).run_steps(feeds, state, per_step)
    assert cudart.launches == 0
    np.testing.assert_array_equal(got["next_sample"], expected["next_sample"])


def test_a_foreign_engine_is_refused_before_deserializing(fake_gpu, bundles):
    bundle = load_bundle(bundles["sana"])
    trt, _ = fake_gpu()
    entry = _trt_entry(bundle.manifest.engines["denoise"], device=H100)  # the double says "Fake GPU"
    with pytest.raises(BundleError, match="GPU NVIDIA H100 80GB HBM3 \\(engine\\) vs Fake GPU \\(here\\)"):
        TrtEngine(bundle.engine_path("denoise"), entry)
    assert trt.deserialized == 0


def test_low_memory_mode_loads_on_first_use_and_frees_on_release(fake_gpu, bundles, components):
    from metacanvas_deploy.runtime.engine import OnDemandEngine

    bundle = load_bundle(bundles["sana"])
    trt, cudart = fake_gpu()
    engine = OnDemandEngine(bundle.engine_path("denoise"), _trt_entry(bundle.manifest.engines["denoise"]))
    assert trt.deserialized == 0, "nothing is loaded before the first call"
    feeds, state, per_step = _loop_inputs(components["sana"]["denoise"], bundle.manifest.scheduler["config"], 3)
    engine.run_steps(feeds, state, per_step)
    engine({**feeds, **per_step[0]})
    assert (trt.deserialized, engine.calls) == (1, 4) and cudart.blocks
    engine.release()
    assert not cudart.blocks, "release frees every device buffer"
    engine({**feeds, **per_step[0]})
    assert trt.deserialized == 2


def test_step_loop_arguments_are_checked(fake_gpu, bundles, components):
    from metacanvas_deploy.runtime.errors import ShapeError

    bundle = load_bundle(bundles["sana"])
    fake_gpu()
    engine = TrtEngine(bundle.engine_path("denoise"), _trt_entry(bundle.manifest.engines["denoise"]))
    feeds, state, per_step = _loop_inputs(components["sana"]["denoise"], bundle.manifest.scheduler["config"], 2)
    with pytest.raises(ShapeError, match="at least one step"):
        engine.run_steps(feeds, state, [])
    with pytest.raises(ShapeError, match="must map an output to a non-per-step input"):
        engine.run_steps(feeds, {"next_sample": "timestep"}, per_step)
    with pytest.raises(ShapeError, match="step 1 gives"):
        engine.run_steps(feeds, state, [per_step[0], {"timestep": per_step[1]["timestep"]}])


# --- the builder's calls, on a test double of TensorRT's builder ----------------------------------------------

@pytest.fixture
def fake_builder(monkeypatch):
    cudart = FakeCudart()
    trt = FakeBuilderTRT(cudart)
    doubles.install(monkeypatch, trt, cudart)
    return trt


def test_build_engine_makes_the_calls_the_precision_asks_for(fake_builder, raw_step, tmp_path):
    from metacanvas_deploy.mc_export.tensorrt.builder import build_engine

    comp, path = raw_step
    logs, cache = [], tmp_path / "timing.cache"
    options = BuildOptions(precision="fp32", timing_cache=cache, workspace_bytes=1 << 30, optimization_level=4)
    identity = build_engine(path, comp.spec, options, tmp_path / "denoise.plan", log=logs.append)
    r = fake_builder.record
    assert identity["gpu"] == "Fake GPU" and identity["compute_capability"] == "9.0"
    assert r["network_flags"] == 1 and r["flags"] == set() and r["cleared"] == {"TF32"}  # strongly typed fp32
    assert r["profile"] == profile_shapes(comp.spec) and r["pools"] == {"WORKSPACE": 1 << 30} and r["level"] == 4
    assert Path(r["parsed"]).name == ".denoise.tensorrt.onnx" and not Path(r["parsed"]).exists()  # lowered copy
    assert (tmp_path / "denoise.plan").read_bytes() == b"fake engine" and cache.read_bytes() == b"fake timings"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["denoise.plan", "timing.cache"]  # no temp files left
    assert logs == ["  tensorrt: building (fake)"]

    cache.write_bytes(b"timings of another GPU")
    build_engine(path, comp.spec, BuildOptions(precision="fp16", timing_cache=cache), tmp_path / "fp16.plan",
                 log=logs.append)
    assert r["network_flags"] == 0 and r["flags"] == {"FP16"} and r["cleared"] == set()  # weakly typed fp16
    assert r["caches"][-2:] == [b"timings of another GPU", b""] and "another GPU or TensorRT" in logs[-2]


def test_parser_errors_and_unservable_precisions_are_build_errors(fake_builder, raw_step, tmp_path):
    from metacanvas_deploy.mc_export.tensorrt.builder import build_engine

    comp, path = raw_step
    fake_builder.unsupported = {"Gelu"}
    with pytest.raises(BuildError, match="parser rejected denoise.onnx: No importer registered for op: Gelu"):
        build_engine(path, comp.spec, BuildOptions(), tmp_path / "x.plan")
    with pytest.raises(BuildError, match="quantized ONNX"):
        build_engine(path, comp.spec, BuildOptions(precision="fp8"), tmp_path / "x.plan")
    assert not (tmp_path / "x.plan").exists()


# --- on a GPU -------------------------------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(not gpu_ready(), reason="needs an NVIDIA GPU with TensorRT 10 and cuda-python "
                                                       "(scripts/gpu_check.sh installs them)")


@pytest.fixture(scope="module")
def fp32_engine(raw_step, tmp_path_factory):
    """(component, raw ONNX, engine path, manifest entry, timing cache): the SANA step built in fp32 here."""
    import tensorrt as trt

    from metacanvas_deploy.mc_export.tensorrt.builder import build_engine

    comp, onnx_path = raw_step
    out = tmp_path_factory.mktemp("trt_engine")
    cache = out / "timing.cache"
    identity = build_engine(onnx_path, comp.spec, BuildOptions(precision="fp32", timing_cache=cache),
                            out / "denoise.plan")
    entry = comp.spec.engine_entry("denoise.plan", "tensorrt", trt.__version__, "fp32", device=identity)
    return comp, onnx_path, out / "denoise.plan", entry, cache


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", [{"which": "opt", "seed": 11}, {"which": "min", "seed": 12},
                                  {"which": "max", "seed": 13},
                                  {"which": "opt", "seed": 14, "overrides": {"rows": 1, "h_tok": 8, "w_tok": 12}}])
def test_engine_matches_onnx_runtime(fp32_engine, case):
    """fp32 with TF32 off differs from ONNX Runtime only in summation order: the spec's own tolerance (the
    build's parity gate: max_rel <= 1e-4, cosine >= 0.99999) holds for every output."""
    import onnxruntime as ort

    from metacanvas_deploy.mc_export.export.onnx_export import compare

    comp, onnx_path, plan, entry, cache = fp32_engine
    assert cache.stat().st_size > 0, "the timing cache was saved"
    feeds = comp.sample_inputs(**case)
    engine = TrtEngine(plan, entry)
    ours = engine(feeds)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    tol = comp.spec.tolerance
    for name, r in zip(comp.spec.output_names, ref):
        row = compare("denoise", case["which"], name, ours[name], r)
        assert row.max_rel <= tol.max_rel and row.cosine >= tol.min_cosine, row.fmt()
    engine.close()


@pytest.mark.gpu
@gpu_only
def test_cuda_graph_replay_is_bit_identical_to_plain_execution(fp32_engine):
    """The same kernels on the same inputs: the graph loop, the loop without a graph and one host call per step
    give the same bits; all three stay within the spec's tolerance of ONNX Runtime's host loop."""
    comp, onnx_path, plan, entry, _ = fp32_engine
    feeds, state, per_step = _loop_inputs(comp, comp.config, 5)
    engine = TrtEngine(plan, entry)
    graph = engine.run_steps(feeds, state, per_step)
    plain = engine.run_steps(feeds, state, per_step, use_cuda_graph=False)
    host = _host_loop(engine, feeds, state, per_step)
    np.testing.assert_array_equal(graph["next_sample"], plain["next_sample"])
    np.testing.assert_array_equal(graph["next_sample"], host["next_sample"])
    ort_entry = comp.spec.engine_entry(onnx_path.name, "onnxruntime", "1.0", "fp32")
    ref = _host_loop(OrtEngine(onnx_path, ort_entry, threads=1), feeds, state, per_step)
    from metacanvas_deploy.mc_export.export.onnx_export import compare

    row = compare("denoise", "loop", "next_sample", graph["next_sample"], ref["next_sample"])
    assert row.max_rel <= comp.spec.tolerance.max_rel and row.cosine >= comp.spec.tolerance.min_cosine, row.fmt()
    engine.close()


@pytest.mark.gpu
@gpu_only
def test_an_engine_for_another_gpu_is_refused_before_deserializing(fp32_engine):
    _, _, plan, entry, _ = fp32_engine
    foreign = dataclasses.replace(entry, device={**entry.device, "gpu": "Some Other GPU"})
    with pytest.raises(BundleError, match="Some Other GPU \\(engine\\).*--target tensorrt --precision fp32"):
        TrtEngine(plan, foreign)
