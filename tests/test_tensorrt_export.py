"""Export here, build on the target: `build --target tensorrt --export-only` on a machine without a GPU, then
`engines` on the GPU machine, without torch or the checkpoint.

CPU, up to the engine build: the export folder of the tiny SANA (fp32, fp16, bf16): its files and index, the
16-bit weights (each one the fp32 export's value rounded to nearest even, checked against torch's rounding; every
other tensor and the graph's I/O unchanged), the profiles a direct TensorRT build would use, the references equal
to the PyTorch reference, verification and tampering. The target build against the TensorRT/CUDA test double
(tests/trt_doubles.py: the "engine" is the stored ONNX run by ONNX Runtime; nothing here is a GPU result): the
bundle has the device identity, every engine passed its gate against the stored references, and it generates; a
GPU the precision table refuses, a missed gate, a machine without TensorRT; the whole build with torch, onnx,
transformers and diffusers unimportable.

GPU (`-m gpu`, skipped without TensorRT and a CUDA device; scripts/gpu_check.sh runs it): real engines from an
fp16 export, gated against its references, generating.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import trt_doubles as doubles
from onnx import numpy_helper
from trt_doubles import FakeBuilderTRT, FakeCudart, gpu_ready

from metacanvas_deploy.mc_export.build import BuildConfig, build, resolve_ranges
from metacanvas_deploy.mc_export.cli import main
from metacanvas_deploy.mc_export.errors import BuildError, ConfigError, ExportFolderError, StageParityError
from metacanvas_deploy.mc_export.tensorrt.export_folder import INDEX_NAME, read_export
from metacanvas_deploy.mc_export.tensorrt.half_weights import HALF, WEIGHT_SLOTS
from metacanvas_deploy.mc_export.tensorrt.profiles import profile_shapes
from metacanvas_deploy.runtime.bundle import load_bundle

ROOT = Path(__file__).parents[1]
STEPS = 3
CASES = {"opt": {"which": "opt", "seed": 101}, "min": {"which": "min", "seed": 102}}  # parity_gate's own cases


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """precision -> the tiny SANA's TensorRT export (seed 0, random canvas layers, as the `bundles` fixture)."""
    root = tmp_path_factory.mktemp("trt_exports")
    return {p: build(BuildConfig(out=root / p, backbone="sana", steps=STEPS, precision=p, target="tensorrt",
                                 export_only=True), log=lambda *a: None) for p in ("fp32", "fp16", "bf16")}


@pytest.fixture(scope="module")
def lazy_exports(tmp_path_factory):
    """precision -> the same model's export from its checkpoint folder with lazy weights (streamed from the
    checkpoint into the file as it is written, as a full-size export runs)."""
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas

    root = tmp_path_factory.mktemp("trt_lazy_exports")
    MetaCanvas.from_preset("sana", "tiny", seed=0, random_canvas=True).save_pretrained(root / "ckpt")
    return {p: build(BuildConfig(out=root / p, checkpoint=root / "ckpt", steps=STEPS, precision=p, target="tensorrt",
                                 export_only=True, lazy_weights="on"), log=lambda *a: None) for p in ("fp32", "bf16")}


@pytest.fixture(scope="module")
def components():
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
    from metacanvas_deploy.mc_export.stages import plan_stages

    model = MetaCanvas.from_preset("sana", "tiny", seed=0, random_canvas=True)
    return plan_stages(model, resolve_ranges(model, ()))


# --- the export folder ----------------------------------------------------------------------------------------

def test_the_folder_holds_what_the_gpu_machine_needs(exports, components):
    for precision, path in exports.items():
        export = read_export(path)
        index = json.loads((path / INDEX_NAME).read_text())
        assert (export.precision, index["weights_dtype"]) == (precision, {"fp32": "float32", "fp16": "float16",
                                                                          "bf16": "bfloat16"}[precision])
        assert list(export.stages) == list(components) == ["planner", "denoise", "vae_decoder"]
        files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        refs = {f"references/{s}.{c}.{k}.npz" for s in components for c in CASES for k in ("inputs", "outputs")}
        assert files == {INDEX_NAME, "tokenizer.json", *(f"{s}.onnx" for s in components), *refs}
        assert set(index["files"]) == files - {INDEX_NAME}
        skeleton = export.skeleton
        assert "engines" not in skeleton and skeleton["build"]["target"] == "tensorrt"
        assert skeleton["build"]["precision"] == precision and "tensorrt" not in skeleton["build"]["tools"]
        assert skeleton["scheduler"]["plans"][str(STEPS)] and skeleton["files"] == {"tokenizer.json": ""}
        for stage, s in export.stages.items():
            assert s.gate == "passed" and s.spec.input_names == components[stage].spec.input_names
            graph = onnx.load(str(path / s.onnx), load_external_data=False).graph
            ops = {n.op_type for n in graph.node}
            assert not ops & {"MultiHeadAttention", "SplitToSequence", "SequenceAt"}, (precision, stage)
            assert all(n.domain in ("", "ai.onnx") for n in graph.node), "no ONNX Runtime-only ops"


def test_profiles_are_those_a_direct_tensorrt_build_uses(exports, components):
    for path in exports.values():
        for stage, s in read_export(path).stages.items():
            assert dict(s.profile) == profile_shapes(components[stage].spec), stage


def test_references_are_the_pytorch_outputs_of_the_gate_cases(exports, components):
    for path in exports.values():
        export = read_export(path)
        for stage, comp in components.items():
            got = export.references(stage)
            assert [case for case, _, _ in got] == list(CASES)
            for case, inputs, outputs in got:
                expected_in = comp.sample_inputs(**CASES[case])
                assert sorted(inputs) == sorted(expected_in)
                for name, value in expected_in.items():
                    np.testing.assert_array_equal(inputs[name], value, err_msg=f"{stage} {case} {name}")
                for name, value in comp.reference(inputs).items():
                    np.testing.assert_array_equal(outputs[name], value, err_msg=f"{stage} {case} {name}")


@pytest.mark.parametrize("kind, precision", [("exports", "fp16"), ("exports", "bf16"), ("lazy_exports", "bf16")])
def test_16_bit_weights_are_the_fp32_export_rounded(request, kind, precision):
    """Each 16-bit initializer equals the fp32 export's tensor rounded by torch to that type (bit for bit); its
    Cast gives the graph back the original name; every other initializer, node and the graph's I/O are those of
    the fp32 export; only weights (>= 2 dims, feeding weight slots) were converted; the weights' bytes halve. The
    same with lazy weights, whose 16-bit values are computed as each is read from the checkpoint."""
    np_type, onnx_type, suffix, _ = HALF[precision]
    torch_type = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    exports = request.getfixturevalue(kind)
    ours, reference = read_export(exports[precision]), read_export(exports["fp32"])
    for stage, s in ours.stages.items():
        assert s.gate == "passed", (kind, stage)
        half = onnx.load(str(ours.path / s.onnx))
        full = onnx.load(str(reference.path / reference.stages[stage].onnx))
        fp32 = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
        casts = [n for n in half.graph.node if n.op_type == "Cast" and n.input[0].endswith(suffix)
                 and n.input[0] == n.output[0] + suffix]
        assert len(casts) == s.weights["converted"] > 0, stage
        converted = {n.output[0] for n in casts}
        for t in half.graph.initializer:
            value = numpy_helper.to_array(t)
            if t.name.endswith(suffix) and t.name[: -len(suffix)] in converted:
                original = fp32[t.name[: -len(suffix)]]
                assert t.data_type == onnx_type and value.dtype == np_type and original.ndim >= 2
                rounded = torch.from_numpy(original.copy()).to(torch_type).view(torch.int16).numpy()
                np.testing.assert_array_equal(value.view(np.int16), rounded, err_msg=t.name)
            else:
                np.testing.assert_array_equal(value, fp32[t.name], err_msg=t.name)
                assert value.dtype == fp32[t.name].dtype
        assert converted | {t.name for t in half.graph.initializer} >= set(fp32)
        assert [n for n in half.graph.node if n not in casts] == list(full.graph.node)
        assert half.graph.input == full.graph.input and half.graph.output == full.graph.output
        for node in full.graph.node:  # what was converted is read as a weight only
            for i, name in enumerate(node.input):
                if name in converted and node.op_type not in ("Transpose", "Reshape", "Shape"):
                    assert i in WEIGHT_SLOTS[node.op_type], (stage, node.op_type, name)
        assert s.weights["bytes_after"] < 0.6 * s.weights["bytes_before"], (stage, dict(s.weights))


def test_a_weight_16_bits_cannot_hold_is_refused_by_name(tmp_path):
    """fp16 tops out at 65504: a weight past it is refused, naming the weight and bf16, when the file is
    written (the values are read only then); bf16 holds it. Biases (1-D) stay float32 whatever they hold."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from metacanvas_deploy.calib.weight_only_graph import save
    from metacanvas_deploy.mc_export.errors import ExportError
    from metacanvas_deploy.mc_export.tensorrt.half_weights import store_weights

    w = np.full((4, 3), 7e4, np.float32)
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(3, 1e6, np.float32), "b")]))
    model = ir.from_proto(proto)
    assert store_weights(model, "fp16")["converted"] == 1
    with pytest.raises(ExportError, match=r"weight w holds values fp16 cannot store.*--precision bf16"):
        save(model, tmp_path / "fp16.onnx")
    model = ir.from_proto(proto)
    store_weights(model, "bf16")
    save(model, tmp_path / "bf16.onnx")
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "bf16.onnx")).graph.initializer}
    assert set(stored) == {"w_bf16", "b"} and stored["b"].dtype == np.float32
    np.testing.assert_array_equal(stored["w_bf16"].astype(np.float32), torch.tensor(w).bfloat16().float().numpy())


def test_the_export_verifies_and_a_changed_folder_is_refused(exports, tmp_path):
    src = exports["fp16"]
    for change, words in [
        (lambda p: _flip_byte(p / "denoise.onnx"), r"\['denoise.onnx'\] changed after the export"),
        (lambda p: _flip_byte(p / "references/planner.opt.outputs.npz"), r"planner.opt.outputs.npz'\] changed"),
        (lambda p: (p / "notes.txt").write_text("x"), r"files its export.json does not list: \['notes.txt'\]"),
        (lambda p: (p / "tokenizer.json").unlink(), "missing 'tokenizer.json'"),
        (lambda p: _edit_index(p, version=99), "export version 99; this mc_export reads version 1"),
        (lambda p: _edit_index(p, format="metacanvas-bundle"), "not a TensorRT export index"),
        (lambda p: (p / INDEX_NAME).unlink(), "holds no export.json: not a TensorRT export"),
    ]:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, copy)
        read_export(copy)
        change(copy)
        with pytest.raises(ExportFolderError, match=words):
            read_export(copy)


def test_an_up_to_date_export_is_not_written_again(exports):
    logs = []
    before = (exports["fp16"] / INDEX_NAME).stat().st_mtime_ns
    build(BuildConfig(out=exports["fp16"], backbone="sana", steps=STEPS, precision="fp16", target="tensorrt",
                      export_only=True), log=logs.append)
    assert "up to date" in logs[0] and (exports["fp16"] / INDEX_NAME).stat().st_mtime_ns == before


@pytest.mark.parametrize("args,words", [
    (["--target", "onnxruntime"], "--export-only writes a TensorRT export for a GPU machine to build; --target "
                                  "onnxruntime builds for this machine: give --target tensorrt"),
    (["--target", "auto"], "--target auto picks the target by this machine: give --target tensorrt"),
    (["--target", "tensorrt", "--precision", "int8"], "--export-only writes fp32, fp16, bf16 exports; --precision "
                                                      "int8 needs calibration"),
])
def test_export_only_misuse_is_one_clear_line(tmp_path, capsys, args, words):
    assert main(["build", "--backbone", "sana", "--export-only", *args, "--out", str(tmp_path / "x")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_config_rule_lives_in_validate():
    with pytest.raises(ConfigError, match="--target onnxruntime builds for this machine"):
        BuildConfig(out=Path("x"), backbone="sana", target="onnxruntime", export_only=True).validate(False)
    cfg = BuildConfig(out=Path("x"), backbone="sana", target="tensorrt", export_only=True).validate(False)
    assert cfg.target == "tensorrt" and cfg.preset == "tiny"  # no GPU needed for an export


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _edit_index(path: Path, **changes) -> None:
    index = json.loads((path / INDEX_NAME).read_text())
    index.update(changes)
    (path / INDEX_NAME).write_text(json.dumps(index))


# --- the build on the target, on the TensorRT/CUDA test double ------------------------------------------------

@pytest.fixture
def fake_target(monkeypatch):
    """A GPU machine of test doubles whose builder's engines run (the stored graph, with ONNX Runtime)."""
    cudart = FakeCudart()
    trt = FakeBuilderTRT(cudart, unsupported=(), runnable=True)
    doubles.install(monkeypatch, trt, cudart)
    return trt, cudart


def test_the_target_build_gives_a_bundle_for_this_gpu(fake_target, exports, tmp_path):
    from metacanvas_deploy.mc_export.tensorrt.target_build import build_engines
    from metacanvas_deploy.runtime.pipeline import Pipeline
    from metacanvas_deploy.runtime.trt_engine import device_identity

    trt, _ = fake_target
    export = read_export(exports["fp16"])
    logs = []
    out = build_engines(exports["fp16"], tmp_path / "bundle", log=logs.append, timing_cache_dir=tmp_path / "cache")
    m = load_bundle(out).manifest
    assert set(m.engines) == set(export.stages)
    for stage, entry in m.engines.items():
        assert (entry.backend, entry.precision, entry.file) == ("tensorrt", "fp16", f"{stage}.plan")
        assert dict(entry.device) == device_identity() and entry.device["gpu"] == "Fake GPU"
        assert m.build["stages"][stage]["engine_build_s"] >= 0 and "export_s" in m.build["stages"][stage]
    assert dict(m.build["parity"]) == {s: "passed" for s in export.stages}
    assert dict(m.build["export"]["parity"]) == {s: "passed" for s in export.stages}
    assert m.build["tools"]["tensorrt"] == device_identity()["tensorrt"] and m.build["target"] == "tensorrt"
    assert m.build["command"] == f"python -m mc_export engines --export {export.path} --out {tmp_path / 'bundle'}"
    assert m.build["export"]["cache_key"] == export.cache_key and m.files.keys() == {"tokenizer.json"}
    r = trt.record  # the last engine: weakly typed with the FP16 flag, the stored profile, a timing cache
    last = dict(export.stages["vae_decoder"].profile)
    assert (r["network_flags"], r["flags"]) == (0, {"FP16"}) and {k: r["profile"][k] for k in last} == last
    assert Path(r["parsed"]) == export.path / "vae_decoder.onnx"  # parsed as stored: no lowered copy
    assert sum("engine parity ok against PyTorch" in line for line in logs) == 3
    assert list((tmp_path / "cache").glob("fake-gpu-sm9.0-trt*.cache"))
    out_frames = Pipeline.load(out)("a fox", num_inference_steps=2).frames
    assert out_frames.shape == (1, 64, 64, 3)

    logs.clear()
    build_engines(exports["fp16"], out, log=logs.append, timing_cache_dir=tmp_path / "cache")
    assert "up to date" in logs[0]


def test_a_precision_this_gpu_cannot_take_is_refused_before_building(fake_target, exports, tmp_path, monkeypatch):
    from metacanvas_deploy.mc_export.tensorrt.target_build import build_engines

    _, cudart = fake_target
    monkeypatch.setattr(cudart, "cudaGetDeviceProperties", lambda device: (0, doubles.types.SimpleNamespace(
        name=b"Orin\0", major=8, minor=7, integrated=1)))
    with pytest.raises(BuildError, match=r"--precision bf16 cannot be built on Orin \(SM 8.7, Jetson Orin\).*"
                                         r"fp32, fp16, int8 only"):
        build_engines(exports["bf16"], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_an_engine_that_misses_its_gate_writes_nothing(fake_target, exports, tmp_path, monkeypatch):
    from metacanvas_deploy.mc_export.tensorrt.target_build import build_engines
    from metacanvas_deploy.runtime import trt_engine

    call = trt_engine.TrtEngine.__call__
    monkeypatch.setattr(trt_engine.TrtEngine, "__call__",
                        lambda self, feeds: {k: v + 0.5 for k, v in call(self, feeds).items()})
    with pytest.raises(StageParityError, match=r"stage 'planner': the engine misses the tolerance \(max_rel <= 0.02"):
        build_engines(exports["fp16"], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_without_tensorrt_the_target_build_names_what_to_install(exports, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    code = main(["engines", "--export", str(exports["fp16"]), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "needs TensorRT 10 and cuda-python" in err and "pip install tensorrt-cu12==" in err
    assert "JetPack" in err and not (tmp_path / "b").exists()


def test_the_target_build_runs_without_torch_onnx_or_the_checkpoint(exports, tmp_path):
    """A fresh interpreter where torch, transformers, diffusers, accelerate, onnx, onnxscript, onnx_ir and
    safetensors cannot be imported: the CLI's `engines` builds, gates and writes the bundle (on the doubles)."""
    blocked = ("torch", "transformers", "diffusers", "accelerate", "onnx", "onnxscript", "onnx_ir", "safetensors")
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {blocked!r}:
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import types, trt_doubles as d
        cudart = d.FakeCudart()
        trt = d.FakeBuilderTRT(cudart, unsupported=(), runnable=True)
        bindings = types.ModuleType('cuda.bindings'); bindings.runtime = cudart
        sys.modules.update({{'tensorrt': trt, 'cuda': types.ModuleType('cuda'), 'cuda.bindings': bindings,
                            'cuda.bindings.runtime': cudart}})
        from metacanvas_deploy.mc_export.cli import main
        code = main(['engines', '--export', {str(exports['fp16'])!r}, '--out', {str(tmp_path / 'bundle')!r},
                     '--timing-cache-dir', {str(tmp_path / 'cache')!r}])
        from metacanvas_deploy.runtime.bundle import load_bundle
        print('exit', code, sorted(load_bundle({str(tmp_path / 'bundle')!r}).manifest.build['parity'].values()))
        print('loaded', sorted(m for m in sys.modules if m.split('.')[0] in {blocked!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exit 0 ['passed', 'passed', 'passed']" in res.stdout and "loaded []" in res.stdout


# --- on a GPU -------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not gpu_ready(), reason="needs an NVIDIA GPU with TensorRT 10 and cuda-python "
                                             "(scripts/gpu_check.sh installs them)")
def test_real_engines_from_an_fp16_export(exports, tmp_path):
    """The fp16 export -> real engines on this GPU, each gated against the export's PyTorch references at
    GATE_TOLERANCE["fp16"]; the bundle verifies and generates."""
    from metacanvas_deploy.mc_export.tensorrt.target_build import build_engines
    from metacanvas_deploy.runtime.pipeline import Pipeline

    out = build_engines(exports["fp16"], tmp_path / "bundle", timing_cache_dir=tmp_path / "cache")
    m = load_bundle(out).manifest
    assert set(m.build["parity"].values()) == {"passed"}
    assert Pipeline.load(out)("a fox", num_inference_steps=2).frames.shape == (1, 64, 64, 3)
