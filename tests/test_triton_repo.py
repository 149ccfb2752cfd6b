"""`python -m mc_export triton` without a server: the repository it writes, the request tensors' decoding
(`runtime.serving`), and the served model (`mc_export/triton_model.py`) driven by a stand-in for Triton's
`triton_python_backend_utils`. tests/test_triton.py runs the same repository in a real tritonserver."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metacanvas_deploy.mc_export.cli import main
from metacanvas_deploy.mc_export.triton_repo import INDEX_NAME, TritonConfig, _warmup_inputs, write_repository
from metacanvas_deploy.runtime import serving
from metacanvas_deploy.runtime.errors import (
    BundleIntegrityError,
    RuntimeInputError,
    ShapeError,
)
from metacanvas_deploy.runtime.media import synthetic_image


def _png(seed: int = 0, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(size, size, seed)).save(buf, format="PNG")
    return buf.getvalue()


def _tensors(**values) -> dict:
    """Wire tensors as a client sends them: batch dimension 1, BYTES as object arrays."""
    out = {}
    for name, v in values.items():
        dtype = serving.NUMPY_TYPES[{w.name: w for w in serving.INPUTS}[name].data_type]
        out[name] = np.array([v if isinstance(v, list) else [v]], dtype=dtype)
    return out


@pytest.fixture(scope="module")
def repo(bundles, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(TritonConfig(bundles=(bundles["wan"],), out=out, threads=1), log=lambda *a: None)
    return out


def test_repository_layout_is_self_contained(repo, bundles):
    model = repo / "wan"
    assert (model / "1" / "model.py").read_text() == (Path(__file__).parents[1] / "mc_export" /
                                                       "triton_model.py").read_text()
    assert (model / "1" / "metacanvas_deploy" / "runtime" / "pipeline.py").is_file()
    assert not list((model / "1").rglob("__pycache__"))
    bundle_files = sorted(p.name for p in (model / "1" / "bundle").iterdir())
    assert bundle_files == sorted(p.name for p in Path(bundles["wan"]).iterdir())
    index = json.loads((repo / INDEX_NAME).read_text())
    assert set(index["files"]) == {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()} - {
        INDEX_NAME}
    text = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in text and "kind: KIND_CPU" in text and "model_warmup" in text
    assert all(f'name: "{w.name}"' in text for w in serving.INPUTS + serving.OUTPUTS)


def test_warmup_inputs_decode_for_every_media_task(bundles, tmp_path):
    """The warm-up request's files hold what the served model decodes: an image for i2v, a GIF for v2v."""
    from metacanvas_deploy.runtime.bundle import load_manifest

    manifest = load_manifest(bundles["wan"])
    d = manifest.defaults
    for task in ("i2v", "v2v", "r2v", "t2v"):
        warm = _warmup_inputs(replace(manifest, tasks=(task,)))
        get = {k: _raw_to_array(t, raw) for k, (t, dims, raw) in warm.items()}.get
        kwargs = serving.request_kwargs(get, tmp_path, max_video_frames=d["num_frames"])
        assert kwargs["task"] == task and kwargs["num_inference_steps"] == 1
        media = {"i2v": "image", "v2v": "video", "r2v": "reference_images"}.get(task)
        if media == "video":
            assert kwargs["video"].shape == (d["num_frames"], d["height"], d["width"], 3)
        elif media:
            first = kwargs[media][0] if media == "reference_images" else kwargs[media]
            assert first.shape == (d["height"], d["width"], 3)
        assert {"image", "video", "reference_images"} & set(kwargs) == ({media} if media else set())


def _raw_to_array(data_type: str, raw: bytes) -> np.ndarray:
    """Triton's warm-up file layout read back (what the server does with `input_data_file`)."""
    if data_type != "TYPE_STRING":
        return np.frombuffer(raw, serving.NUMPY_TYPES[data_type]).reshape(1, -1)
    values, at = [], 0
    while at < len(raw):
        n = int.from_bytes(raw[at:at + 4], "little")
        values.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    return np.array([values], dtype=np.object_)


def test_request_tensors_become_pipeline_arguments(tmp_path):
    kwargs = serving.request_kwargs(_tensors(prompt=b"a fox", seed=7, guidance_scale=1.5, image=_png(),
                                             reference_images=[_png(1), _png(2)]).get, tmp_path, 17)
    assert kwargs["prompt"] == "a fox" and kwargs["seed"] == 7 and type(kwargs["seed"]) is int
    assert kwargs["guidance_scale"] == 1.5 and kwargs["image"].shape == (64, 64, 3)
    assert len(kwargs["reference_images"]) == 2 and not list(tmp_path.iterdir())  # media files removed


@pytest.mark.parametrize("values, message", [
    ({"prompt": b"\xff\xfe"}, "input `prompt` is not UTF-8 text"),
    ({"prompt": b"x", "image": b"not an image"}, "cannot read image input `image`: cannot identify image file"),
    ({"prompt": b"x", "image": b""}, "input `image` is empty"),
    ({"prompt": b"x", "video": b"GIF89a garbage"}, "cannot read video input `video`"),
    ({"prompt": b"x", "reference_images": []}, "input `reference_images` holds no images"),
    ({"seed": 1}, "input `prompt` is required"),
])
def test_undecodable_request_tensors_are_input_errors(tmp_path, values, message):
    with pytest.raises(RuntimeInputError, match="^" + message.replace("[", r"\[").replace("(", r"\(")) as e:
        serving.request_kwargs(_tensors(**values).get, tmp_path, 17)
    assert str(tmp_path) not in str(e.value)  # the message names the input, not a temp file


def test_a_batch_of_two_in_one_request_is_refused(tmp_path):
    two = {"prompt": np.array([[b"a"], [b"b"]], dtype=np.object_)}
    with pytest.raises(RuntimeInputError, match=r"input `prompt` has shape \[2, 1\]; expected \[1, 1\]"):
        serving.request_kwargs(two.get, tmp_path, 17)


def test_error_codes():
    assert serving.error_code(RuntimeInputError("x")) == "INVALID_ARG"
    assert serving.error_code(ShapeError("x")) == "INVALID_ARG"
    assert serving.error_code(BundleIntegrityError("x")) == "INTERNAL"
    assert serving.error_code(KeyError("x")) == "INTERNAL"


# --- the served model with a stand-in for Triton's Python backend utilities ---------------------------------------

def _fake_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")

    class TritonError(Exception):
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code=None):
            super().__init__(message)
            self.code = code

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs, self.error = {t.name: t.array for t in output_tensors}, error

    pb.TritonError, pb.Tensor, pb.InferenceResponse = TritonError, Tensor, InferenceResponse
    pb.get_input_tensor_by_name = lambda request, name: Tensor(name, request[name]) if name in request else None
    pb.Logger = types.SimpleNamespace(log_error=lambda message: None)
    return pb


def _served_model(version: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    monkeypatch.setattr(sys, "path", list(sys.path))  # the model puts its folder first; undone after the test
    spec = importlib.util.spec_from_file_location("served_model_under_test", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = {"max_batch_size": 4, "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
              "parameters": {"threads": {"string_value": "1"}}}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_name": "wan", "model_instance_kind": "CPU"})
    return model


def test_the_served_model_answers_each_request_of_a_batch(repo, bundles, monkeypatch):
    """A batch of four: the good requests get the Pipeline's frames, the bad ones their own error."""
    from metacanvas_deploy.runtime.pipeline import Pipeline

    model = _served_model(repo / "wan" / "1", monkeypatch)
    try:
        requests = [_tensors(prompt=b"a fox", seed=1, num_frames=1), _tensors(prompt=b" "),
                    _tensors(prompt=b"a fox", height=4096), _tensors(prompt=b"a fox", seed=2, num_frames=5)]
        responses = model.execute(requests)
    finally:
        model.finalize()
    assert [r.error is None for r in responses] == [True, False, False, True]
    assert str(responses[1].error) == "prompt must be a non-empty string" and responses[1].error.code == "INVALID_ARG"
    assert "height 4096 is outside this bundle's" in str(responses[2].error)
    assert "--out BUNDLE" in str(responses[2].error) and str(repo) not in str(responses[2].error)
    pipe = Pipeline.load(bundles["wan"], threads=1)
    for response, (seed, frames) in zip([responses[0], responses[3]], [(1, 1), (2, 5)]):
        expected = pipe("a fox", seed=seed, num_frames=frames).frames
        np.testing.assert_array_equal(response.outputs["frames"][0], expected)
        assert "total" in json.loads(response.outputs["timings"][0, 0])


def test_a_changed_bundle_file_fails_the_model_load(bundles, tmp_path, monkeypatch):
    out = tmp_path / "repo"
    write_repository(TritonConfig(bundles=(bundles["wan"],), out=out, warmup=False), log=lambda *a: None)
    engine = out / "wan" / "1" / "bundle" / "denoise.onnx"
    data = bytearray(engine.read_bytes())
    data[-1] ^= 1
    engine.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="denoise.onnx"):
        _served_model(out / "wan" / "1", monkeypatch)


# --- the command ---------------------------------------------------------------------------------------------------

def test_command_writes_replaces_and_refuses(bundles, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["triton", "--bundle", str(bundles["wan"]), "--name", "video", "--out", str(out)]) == 0
    assert (out / "video" / "config.pbtxt").is_file()
    (out / "video" / "1" / "__pycache__").mkdir()  # what the server's Python leaves: not a reason to refuse
    assert main(["triton", "--bundle", str(bundles["wan"]), "--instances", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [INDEX_NAME, "wan"]  # replaced whole
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["triton", "--bundle", str(bundles["wan"]), "--out", str(out)]) == 2
    assert "holds files it did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "wan").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--device", "gpu"], "ONNX Runtime engines run on the CPU in this runtime: --device cpu"),
    (["--name", "a b"], "model name 'a b' is not usable by Triton"),
    (["--name", "a", "--name", "b"], "1 bundles but 2 names"),
    (["--instances", "0"], "--instances must be in 1..64, got 0"),
    (["--threads", "100000"], "--threads must be in 1.."),
])
def test_command_refuses_bad_options(bundles, tmp_path, capsys, args, message):
    assert main(["triton", "--bundle", str(bundles["wan"]), *args, "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "repo").exists()


def test_command_refuses_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    (tmp_path / "user").mkdir()
    assert main(["triton", "--bundle", str(tmp_path / "user"), "--out", str(tmp_path / "repo")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


def test_a_foreign_folder_is_never_replaced(bundles, tmp_path, capsys):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "model.onnx").write_text("user's")
    assert main(["triton", "--bundle", str(bundles["wan"]), "--out", str(tmp_path / "repo")]) == 2
    assert "not a model repository this command wrote" in capsys.readouterr().err
    assert (tmp_path / "repo" / "model.onnx").read_text() == "user's"

