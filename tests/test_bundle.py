"""The engine bundle: manifest schema, atomic writing, and every refusal of `load_bundle`.

Bundles here are small but real: a MatMul ONNX model (with and without external data) that ONNX Runtime runs.
`onnx` is used only to *write* test models; the runtime reads them without it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from metacanvas_deploy.runtime.bundle import backend_compatible, load_bundle, load_manifest, sha256_file, write_bundle
from metacanvas_deploy.runtime.errors import (
    BackendVersionError,
    BundleFileError,
    BundleIntegrityError,
    BundleSecurityError,
    BundleWriteError,
    ManifestError,
    SchemaVersionError,
    ShapeError,
)
from metacanvas_deploy.runtime.manifest import DimRange, EngineEntry, Manifest, TensorSpec
from metacanvas_deploy.runtime.onnx_external_data import MalformedOnnxError, external_data_refs

REPO = Path(__file__).resolve().parents[1]


# --- builders ---

def tiny_onnx(path: Path, external: str | None = "den.data") -> None:
    """y = x @ w with w (8x8) inline or in the external file `external` next to the model."""
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8) / 64, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save_model(model, path, save_as_external_data=True, location=external, size_threshold=0)
    else:
        onnx.save_model(model, path)


def entry(**overrides) -> EngineEntry:
    fields = dict(stage="denoiser", file="den.onnx", backend="onnxruntime", backend_version=ort.__version__,
                  precision="fp32", inputs=[TensorSpec("x", "float32", ["batch", 8])],
                  outputs=[TensorSpec("y", "float32", ["batch", 8])], dims_ranges={"batch": [1, 2, 4]},
                  external_data=["den.data"])
    return EngineEntry(**{**fields, **overrides})


def manifest(**overrides) -> Manifest:
    fields = dict(backbone="sana", preset="tiny", tasks=["t2i"], engines={"denoiser": entry()},
                  files={"den.data": "", "tokenizer.json": ""},
                  ranges={"height": [256, 768], "width": [256, 768], "num_frames": [1, 1], "prompt_tokens": [1, 300]},
                  multiples={"height": 32, "width": 32, "num_frames_minus_1": 4},
                  scheduler={"name": "FlowMatchEuler", "shift": 3.0, "sigmas": [1.0, 0.5, 0.0], "plan": [[1, 2], []]},
                  canvas={"grid": [16, 16]}, defaults={"height": 512, "width": 512, "num_frames": 1, "num_inference_steps": 20,
                            "guidance_scale": 4.5, "negative_prompt": "", "seed": None},
                  build={"cache_key": "abc", "created_at": "2026-11-23T00:00:00Z", "flags": [True, False]})
    return Manifest(**{**fields, **overrides})


def populate_ok(tmp: Path) -> Manifest:
    tiny_onnx(tmp / "den.onnx")
    (tmp / "tokenizer.json").write_text('{"model": {}}')
    return manifest()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    write_bundle(out, populate_ok)
    return out


def edit_manifest(bundle_dir: Path, edit) -> None:
    """Apply `edit(dict)` to manifest.json on disk."""
    path = bundle_dir / "manifest.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def reseal(bundle_dir: Path, rel: str) -> None:
    """Update the manifest's hash of `rel` as someone who edits both would."""
    sha, size = sha256_file(bundle_dir / rel)

    def edit(obj):
        for e in obj["engines"].values():
            if e["file"] == rel:
                e["sha256"], e["size_bytes"] = sha, size
        if rel in obj["files"]:
            obj["files"][rel] = sha
    edit_manifest(bundle_dir, edit)


def set_path(obj, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    if value is KeyError:
        del obj[last]
    elif isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != f".{out.name}.lock")


# --- manifest schema ---

def test_manifest_json_round_trip_is_exact():
    trt = entry(stage="vae_decoder", file="vae.plan", backend="tensorrt", backend_version="10.8.0.43",
                precision="fp16", external_data=[], device={"gpu": "NVIDIA H100", "compute_capability": [9, 0]},
                extra={"cuda_graph": True})
    m = manifest(engines={"denoiser": entry(), "vae_decoder": trt})
    text = m.to_json()
    again = Manifest.from_json(text)
    assert again == m
    assert again.to_json() == text
    assert json.loads(text) == m.to_dict()
    assert json.loads(text)["engines"]["denoiser"]["dims_ranges"] == {"batch": [1, 2, 4]}


def test_manifest_is_deeply_frozen():
    m = manifest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.backbone = "wan"
    with pytest.raises(TypeError):
        m.scheduler["shift"] = 5.0
    with pytest.raises(TypeError):
        m.engines["denoiser"] = entry()
    assert isinstance(m.scheduler["sigmas"], tuple)


@pytest.mark.parametrize("dotted, value, field", [
    ("color", "red", "color"),
    ("engines.denoiser.inputs.0.layout", "NCHW", "engines.denoiser.inputs[0].layout"),
    ("engines.denoiser.precision", KeyError, "engines.denoiser.precision"),
    ("backbone", KeyError, "backbone"),
    ("engines.denoiser.device", KeyError, "engines.denoiser.device"),  # has a default in code, required in JSON
    ("engines.denoiser.size_bytes", "12", "engines.denoiser.size_bytes"),
    ("engines.denoiser.inputs.0.dims.1", 8.0, "engines.denoiser.inputs[0].dims[1]"),
    ("engines.denoiser.inputs.0.dtype", "float64", "engines.denoiser.inputs[0].dtype"),
    ("engines.denoiser.dims_ranges.batch", [4, 2, 1], "engines.denoiser.dims_ranges.batch"),
    ("engines.denoiser.backend", "openvino", "engines.denoiser.backend"),
    ("engines.denoiser.sha256", "XYZ", "engines.denoiser.sha256"),
    ("tasks", "t2i", "tasks"),
    ("ranges.height", [256], "ranges.height"),
    ("ranges.height", [250, 768], "ranges.height"),
    ("multiples.height", True, "multiples.height"),
    ("schema_version", "1", "schema_version"),
])
def test_bad_field_is_named(dotted, value, field):
    obj = manifest().to_dict()
    set_path(obj, dotted, value)
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(obj)
    assert info.value.field == field
    assert f"`{field}`" in str(info.value)


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    ('{"schema_version": 1, "schema_version": 1}', "appears twice"),
    ('{"schema_version": NaN}', "NaN"),
    ("[]", "top level"),
])
def test_malformed_json(text, words):
    with pytest.raises(ManifestError, match=words):
        Manifest.from_json(text)


@pytest.mark.parametrize("version, words", [(2, "newer"), (0, "older")])
def test_schema_version_checked_before_fields(version, words):
    obj = manifest().to_dict()
    obj.update(schema_version=version, field_from_the_future=1)
    with pytest.raises(SchemaVersionError, match=words):
        Manifest.from_json(json.dumps(obj))


@pytest.mark.parametrize("path", ["/etc/passwd", "../den.onnx", "a/../../den.onnx", "C:/x.onnx", "a\\b", ".hidden",
                                  "*/_ORT_MEM_ADDR_/*"])
def test_paths_must_stay_inside(path):
    with pytest.raises(BundleSecurityError) as info:
        entry(file=path)
    assert info.value.field == "file"
    obj = manifest().to_dict()
    obj["files"][path] = ""
    with pytest.raises(BundleSecurityError):
        Manifest.from_dict(obj)


@pytest.mark.parametrize("kwargs, words", [
    (dict(external_data=["other.bin"]), "no sha256 in `files`"),
    (dict(dims_ranges={}), "has no \\[min, opt, max\\]"),
    (dict(dims_ranges={"batch": [1, 1, 1], "frames": [1, 1, 1]}), "no input or output uses it"),
    (dict(backend="tensorrt"), "GPU it was built for"),
    (dict(outputs=[TensorSpec("x", "float32", [8])]), "used twice"),
])
def test_manifest_consistency(kwargs, words):
    with pytest.raises(ManifestError, match=words):
        manifest(engines={"denoiser": entry(**kwargs)})


# --- shapes ---

def test_shapes_derive_from_symbolic_dims():
    spec = TensorSpec("latents", "float16", ["batch", 16, "latent_frames", "h", "w"])
    ranges = {"batch": DimRange(1, 2, 2), "latent_frames": DimRange(1, 8, 31), "h": DimRange(8, 16, 48),
              "w": DimRange(8, 16, 80)}
    assert spec.shape_at(ranges, "min") == (1, 16, 1, 8, 8)
    assert spec.shape_at(ranges, "opt") == (2, 16, 8, 16, 16)
    assert spec.shape_at(ranges, "max") == (2, 16, 31, 48, 80)
    assert spec.check((2, 16, 5, 24, 40), ranges, np.dtype("float16")) == {"batch": 2, "latent_frames": 5, "h": 24,
                                                                          "w": 40}
    assert entry().input_shapes("max") == {"x": (4, 8)}


@pytest.mark.parametrize("shape, dtype, words", [
    ((2, 16, 5, 24), None, "rank is 4, expected 5"),
    ((2, 15, 5, 24, 40), None, "axis 1 is 15, expected 16"),
    ((2, 16, 32, 24, 40), None, r"axis 2 \(latent_frames\) is 32, outside 1..31"),
    ((2, 16, 5, 24, 40), np.dtype("float32"), "dtype is float32, expected float16"),
])
def test_shape_check_says_expected_and_got(shape, dtype, words):
    spec = TensorSpec("latents", "float16", ["batch", 16, "latent_frames", "h", "w"])
    ranges = {"batch": DimRange(1, 2, 2), "latent_frames": DimRange(1, 8, 31), "h": DimRange(8, 16, 48),
              "w": DimRange(8, 16, 80)}
    with pytest.raises(ShapeError, match=words) as info:
        spec.check(shape, ranges, dtype)
    assert "`latents`" in str(info.value) and "latent_frames=1..31" in str(info.value)
    assert str(tuple(shape)) in str(info.value)


def test_one_symbol_one_value_across_inputs():
    e = entry(inputs=[TensorSpec("x", "float32", ["batch", 8]), TensorSpec("t", "int64", ["batch"])])
    ok = {"x": np.zeros((3, 8), np.float32), "t": np.zeros(3, np.int64)}
    assert e.check_inputs(ok) == {"batch": 3}
    with pytest.raises(ShapeError, match="batch is 3 in `x` but 2 in `t`"):
        e.check_inputs({"x": np.zeros((3, 8), np.float32), "t": np.zeros(2, np.int64)})
    with pytest.raises(ShapeError, match="takes inputs"):
        e.check_inputs({"x": ok["x"]})


def test_check_request_names_range_and_rebuild():
    m = manifest()
    m.check_request(512, 768, 1, 300)
    with pytest.raises(ShapeError) as info:
        m.check_request(900, 512, 1, 20, out_dir="out/sana")
    text = str(info.value)
    assert "height 900 is outside this bundle's 256..768 (a multiple of 32)" in text
    assert "python -m mc_export build --backbone sana --preset tiny --height 256:928 --out out/sana" in text
    with pytest.raises(ShapeError, match=r"width 500 is not a multiple of 32 \(nearest: 480 or 512\)"):
        m.check_request(512, 500)
    with pytest.raises(ShapeError, match="--prompt-tokens 1:301"):
        m.check_request(512, 512, 1, 301)
    video = manifest(ranges={**m.ranges, "num_frames": [1, 121]})
    with pytest.raises(ShapeError, match=r"not 1 \+ a multiple of 4 \(nearest: 49 or 53\)"):
        video.check_request(512, 512, 50)


# --- loading ---

def test_load_ok_and_engine_runs(bundle: Path):
    b = load_bundle(bundle)
    assert b.path == bundle.resolve() and b.manifest == load_manifest(bundle)
    assert b.file_path("tokenizer.json").read_text() == '{"model": {}}'
    x = np.ones((2, 8), np.float32)
    b.manifest.engines["denoiser"].check_inputs({"x": x})
    session = ort.InferenceSession(str(b.engine_path("denoiser")), providers=["CPUExecutionProvider"])
    expected = x @ (np.arange(64, dtype=np.float32).reshape(8, 8) / 64)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-6)
    with pytest.raises(BundleFileError, match="no stage 'planner'"):
        b.engine_path("planner")


def test_bundle_reached_through_a_symlink_loads(bundle: Path, tmp_path: Path):
    (tmp_path / "current").symlink_to(bundle)
    assert load_bundle(tmp_path / "current").path == bundle.resolve()


@pytest.mark.parametrize("rel", ["den.onnx", "den.data", "tokenizer.json"])
def test_corrupt_byte_names_file_and_rebuild(bundle: Path, rel: str):
    data = bytearray((bundle / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / rel).write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError) as info:
        load_bundle(bundle)
    assert repr(rel) in str(info.value)
    assert f"python -m mc_export build --backbone sana --preset tiny --out {bundle.resolve()}" in str(info.value)
    if rel != "den.onnx":  # (a corrupt .onnx may also fail the external-data walk, which always runs)
        load_bundle(bundle, verify_hashes=False)  # documented: same-size corruption needs the hashes


def test_truncated_engine_fails_even_without_hashes(bundle: Path):
    (bundle / "den.onnx").write_bytes((bundle / "den.onnx").read_bytes()[:-1])
    with pytest.raises(BundleIntegrityError, match="truncated or replaced"):
        load_bundle(bundle, verify_hashes=False)


@pytest.mark.parametrize("rel", ["den.onnx", "den.data", "tokenizer.json"])
def test_missing_file(bundle: Path, rel: str):
    (bundle / rel).unlink()
    with pytest.raises(BundleFileError, match=f"missing '{rel}'"):
        load_bundle(bundle)


def test_missing_manifest_and_missing_dir(bundle: Path, tmp_path: Path):
    with pytest.raises(BundleFileError, match="no bundle at"):
        load_bundle(tmp_path / "nowhere")
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleFileError, match="has no manifest.json"):
        load_bundle(bundle)


@pytest.mark.parametrize("dotted, value, error, field", [
    ("engines.denoiser.size_bytes", "148", ManifestError, "engines.denoiser.size_bytes"),
    ("engines.denoiser.quantized", True, ManifestError, "engines.denoiser.quantized"),
    ("engines.denoiser.file", "/etc/passwd", BundleSecurityError, "engines.denoiser.file"),
    ("engines.denoiser.file", "../bundle/den.onnx", BundleSecurityError, "engines.denoiser.file"),
    ("engines.denoiser.sha256", "", ManifestError, "engines.denoiser.sha256"),
])
def test_edited_manifest_on_disk(bundle: Path, dotted, value, error, field):
    edit_manifest(bundle, lambda obj: set_path(obj, dotted, value))
    with pytest.raises(error) as info:
        load_bundle(bundle)
    assert info.value.field == field
    assert "python -m mc_export build" in str(info.value)


def test_manifest_that_is_not_json(bundle: Path):
    (bundle / "manifest.json").write_text('{"schema_version": 1,')
    with pytest.raises(ManifestError, match="not valid JSON.*Rebuild the bundle"):
        load_bundle(bundle)


def test_backend_version_rule(bundle: Path):
    edit_manifest(bundle, lambda obj: set_path(obj, "engines.denoiser.backend_version", "1.31.2"))
    with pytest.raises(BackendVersionError) as info:
        load_bundle(bundle)
    text = str(info.value)
    assert "1.31.2" in text and ort.__version__ in text and "same major.minor" in text
    load_bundle(bundle, backend_versions={"onnxruntime": "1.31.0+cu124"})
    with pytest.raises(BackendVersionError, match="not installed"):
        load_bundle(bundle, backend_versions={"onnxruntime": None})
    assert backend_compatible("onnxruntime", "1.32.0", "1.32.5")
    assert not backend_compatible("onnxruntime", "1.32.0", "1.33.0")
    assert not backend_compatible("onnxruntime", "1.32.0", "2.32.0")
    assert backend_compatible("tensorrt", "10.8.0.43", "10.8.0.40")
    assert not backend_compatible("tensorrt", "10.8.0", "10.8.1")
    assert not backend_compatible("tensorrt", "10.8", "10.8")  # a TensorRT version needs its patch


def test_symlink_escaping_the_bundle(bundle: Path, tmp_path: Path):
    outside = tmp_path / "secret.json"
    outside.write_bytes((bundle / "tokenizer.json").read_bytes())  # same bytes: only the path check can catch it
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleSecurityError, match="outside the bundle") as info:
        load_bundle(bundle)
    assert info.value.field == "files['tokenizer.json']"
    (bundle / "manifest.json").rename(tmp_path / "m.json")
    (bundle / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(BundleSecurityError, match="outside the bundle"):
        load_bundle(bundle)


def _set_location(onnx_path: Path, location: str) -> None:
    model = onnx.load(str(onnx_path), load_external_data=False)
    for item in model.graph.initializer[0].external_data:
        if item.key == "location":
            item.value = location
    onnx.save_model(model, str(onnx_path))


@pytest.mark.parametrize("location, words", [
    ("../outside.bin", "outside the bundle"),
    ("/tmp/outside.bin", "outside the bundle"),
    ("tokenizer.json", "does not list for this engine"),
])
def test_onnx_external_data_must_stay_listed_and_inside(bundle: Path, tmp_path: Path, location, words):
    (tmp_path / "outside.bin").write_bytes((bundle / "den.data").read_bytes())
    _set_location(bundle / "den.onnx", location)
    reseal(bundle, "den.onnx")  # the manifest agrees: hashes cannot catch this, the location check must
    with pytest.raises(BundleSecurityError, match=words) as info:
        load_bundle(bundle)
    assert "tensor 'w' of den.onnx" in str(info.value) and info.value.field == "engines.denoiser.external_data"


def test_inline_onnx_without_external_data(tmp_path: Path):
    def populate(tmp: Path) -> Manifest:
        tiny_onnx(tmp / "den.onnx", external=None)
        (tmp / "tokenizer.json").write_text("{}")
        return manifest(engines={"denoiser": entry(external_data=[])}, files={"tokenizer.json": ""})
    write_bundle(tmp_path / "b", populate)
    assert load_bundle(tmp_path / "b").manifest.engines["denoiser"].external_data == ()


def test_not_an_onnx_file(bundle: Path):
    (bundle / "den.onnx").write_bytes(b"\xff" * 64)
    reseal(bundle, "den.onnx")
    with pytest.raises(BundleIntegrityError, match="not a readable ONNX file"):
        load_bundle(bundle)


def test_wire_reader_finds_every_external_tensor(tmp_path: Path):
    def ext(name: str, location: str) -> TensorProto:
        t = numpy_helper.from_array(np.zeros(4, np.float32), name)
        set_external_data(t, location=location, offset=0, length=16)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        return t
    then = helper.make_graph([helper.make_node("Constant", [], ["a"], value=ext("in_if", "if.bin"))], "then", [],
                             [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4])])
    sparse = helper.make_sparse_tensor(ext("sp_values", "sparse.bin"), numpy_helper.from_array(np.arange(4), "i"),
                                       [8])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=ext("const", "const.bin")),
         helper.make_node("If", ["cond"], ["a"], then_branch=then, else_branch=then)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4])],
        [ext("init", "init.bin"), numpy_helper.from_array(np.ones(2, np.float32), "inline")],
        sparse_initializer=[sparse])
    func = helper.make_function("local", "f", [], ["z"], [helper.make_node("Constant", [], ["z"],
                                value=ext("in_func", "func.bin"))], [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, functions=[func], opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    found = sorted((r.tensor, r.location) for r in external_data_refs(path))
    assert found == sorted([("init", "init.bin"), ("const", "const.bin"), ("in_if", "if.bin"), ("in_if", "if.bin"),
                            ("sp_values", "sparse.bin"), ("in_func", "func.bin")])
    path.write_bytes(model.SerializeToString()[:-3])
    with pytest.raises(MalformedOnnxError):
        external_data_refs(path)


def test_sha256_streams_large_files(tmp_path: Path):
    data = os.urandom((3 << 20) + 12345)
    (tmp_path / "big.bin").write_bytes(data)
    assert sha256_file(tmp_path / "big.bin") == (hashlib.sha256(data).hexdigest(), len(data))


# --- writing ---

def test_write_seals_hashes_and_writes_manifest_last(bundle: Path):
    m = load_bundle(bundle).manifest
    assert m.engines["denoiser"].sha256 == sha256_file(bundle / "den.onnx")[0]
    assert m.engines["denoiser"].size_bytes == (bundle / "den.onnx").stat().st_size
    assert m.files["den.data"] == sha256_file(bundle / "den.data")[0]
    assert siblings(bundle) == ["bundle"]
    assert oct((bundle).stat().st_mode & 0o777) != "0o700"  # not tempfile.mkdtemp's private mode


def _failing(tmp: Path) -> Manifest:
    tiny_onnx(tmp / "den.onnx")
    raise RuntimeError("export failed halfway")


def test_failed_populate_leaves_nothing(tmp_path: Path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="halfway"):
        write_bundle(out, _failing)
    assert siblings(out) == []
    with pytest.raises(BundleFileError):
        load_bundle(out)


def test_failed_populate_keeps_the_previous_bundle(bundle: Path):
    before = load_bundle(bundle).manifest
    with pytest.raises(RuntimeError):
        write_bundle(bundle, _failing)
    assert load_bundle(bundle).manifest == before
    assert siblings(bundle) == ["bundle"]


def test_rewrite_replaces_the_bundle(bundle: Path):
    def populate(tmp: Path) -> Manifest:
        tiny_onnx(tmp / "den.onnx")
        (tmp / "tokenizer.json").write_text('{"v": 2}')
        return manifest(preset="small")
    write_bundle(bundle, populate)
    assert load_bundle(bundle).manifest.preset == "small"
    assert siblings(bundle) == ["bundle"]


def test_killed_write_leaves_old_bundle_and_next_write_cleans(bundle: Path):
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from metacanvas_deploy.runtime.bundle import write_bundle\n"
            "def populate(tmp):\n    (tmp / 'den.onnx').write_bytes(b'partial')\n    os._exit(9)\n"
            "write_bundle(sys.argv[2], populate)\n")
    result = subprocess.run([sys.executable, "-c", code, str(REPO), str(bundle)], capture_output=True)
    assert result.returncode == 9
    assert any(".tmp-" in name for name in siblings(bundle))  # the stale temp dir...
    load_bundle(bundle)  # ...is ignored by the loader
    write_bundle(bundle, populate_ok)
    assert siblings(bundle) == ["bundle"]  # ...and cleaned by the next write


def test_crash_between_renames_is_recovered(bundle: Path):
    aside = bundle.parent / ".bundle.old-deadbeef"
    bundle.rename(aside)  # what a kill between the two renames leaves
    with pytest.raises(BundleFileError, match="interrupted"):
        load_bundle(bundle)
    with pytest.raises(RuntimeError):
        write_bundle(bundle, _failing)
    load_bundle(bundle)  # the old bundle was put back before the failed write started
    assert siblings(bundle) == ["bundle"]


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path: Path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(BundleWriteError, match="not a bundle"):
        write_bundle(out, populate_ok)
    assert (out / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_bundle(empty, populate_ok)
    load_bundle(empty)


def _populate_with(extra):
    def populate(tmp: Path):
        result = populate_ok(tmp)
        return extra(tmp, result)
    return populate


@pytest.mark.parametrize("extra, words", [
    (lambda tmp, m: ((tmp / "notes.txt").write_text("x"), m)[1], "does not list"),
    (lambda tmp, m: ((tmp / "tokenizer.json").unlink(), m)[1], "did not write"),
    (lambda tmp, m: ((tmp / "link").symlink_to("/etc/hostname"), m)[1], "symlinks are not allowed"),
    (lambda tmp, m: ((tmp / "manifest.json").write_text("{}"), m)[1], "write_bundle writes it"),
    (lambda tmp, m: m.to_dict(), "must return a Manifest"),
    (lambda tmp, m: manifest(files={"den.data": "0" * 64, "tokenizer.json": ""}), "hashes to"),
])
def test_write_refuses_a_sloppy_populate(tmp_path: Path, extra, words):
    out = tmp_path / "bundle"
    with pytest.raises(BundleWriteError, match=words):
        write_bundle(out, _populate_with(extra))
    assert siblings(out) == []


def test_write_refuses_external_data_outside(tmp_path: Path):
    def populate(tmp: Path) -> Manifest:
        m = populate_ok(tmp)
        _set_location(tmp / "den.onnx", "../outside.bin")
        return m
    with pytest.raises(BundleSecurityError, match="outside the bundle"):
        write_bundle(tmp_path / "bundle", populate)
    assert siblings(tmp_path / "bundle") == []


def test_concurrent_write_to_same_out_is_refused(tmp_path: Path):
    out = tmp_path / "bundle"
    fd = os.open(tmp_path / ".bundle.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(BundleWriteError, match="another build is writing"):
            write_bundle(out, populate_ok)
    finally:
        os.close(fd)
    write_bundle(out, populate_ok)


def test_verifying_a_bundle_needs_no_onnx_torch_or_compiler(bundle: Path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from metacanvas_deploy.runtime.bundle import load_bundle\n"
            "load_bundle(sys.argv[2])\n"
            "print(sorted(m for m in ('onnx', 'torch', 'transformers', 'diffusers', 'metacanvas_deploy.mc_export') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO), str(bundle)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
