"""Stages larger than memory: weights memory-mapped from aligned external data instead of copied.

The model under test is a chain of 8 MatMul+Add layers with 2000x2000 float32 weights (128 MB), built with onnx
helpers; 2000 columns make every tensor's size a non-multiple of 4 KiB, so a dense writer leaves unaligned
offsets. Checked: (a) every `.onnx.data` our writers produce (`calib.graph.save_model`, `optimize_for_ort`, the
exporter through a whole build) has each tensor at a multiple of 64 KiB; (b) a mapped session computes what a
copying one does, exactly where the kernels are the same; (c) loading a mapped session adds almost nothing to
private memory while the default session adds the weights, each case measured in a fresh process; (d) a built
bundle, its weights in `.data`, runs in low-memory mode with mapped sessions, equal to resident mapped sessions
bit for bit and to the default sessions within float32 rounding.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from metacanvas_deploy.calib import graph as calib_graph
from metacanvas_deploy.calib.errors import ExternalDataError
from metacanvas_deploy.calib.external_data import ALIGNMENT, check_aligned
from metacanvas_deploy.runtime.engine import OnDemandEngine, session_options
from metacanvas_deploy.runtime.onnx_external_data import external_data_refs, misaligned
from metacanvas_deploy.runtime.pipeline import Pipeline

WIDTH, LAYERS = 2000, 8
WEIGHT_BYTES = LAYERS * WIDTH * WIDTH * 4  # 128e6; the biases (64 KB) are left out of the bounds below


def _chain() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) / np.sqrt(WIDTH)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(WIDTH, dtype=np.float32) * 0.01, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", WIDTH])], inits)
    graph.node[-1].output[0] = "y"
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """name -> path: `dense` (onnx.save, unaligned), `ours` (save_model), `optimized` (optimize_for_ort of dense),
    `embedded` (weights inside the .onnx)."""
    root = tmp_path_factory.mktemp("chain")
    model = _chain()
    onnx.save(model, str(root / "embedded.onnx"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calib_graph, "EXTERNAL_DATA_BYTES", 0)
        calib_graph.save_model(_copy(model), root / "ours.onnx")  # both writers take the weights out of the proto
    onnx.save(model, str(root / "dense.onnx"), save_as_external_data=True, location="dense.onnx.data",
              size_threshold=1024)
    calib_graph.optimize_for_ort(root / "dense.onnx", root / "optimized.onnx")
    return {name: root / f"{name}.onnx" for name in ("dense", "ours", "optimized", "embedded")}


def _run(path, mapped: bool) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((4, WIDTH), dtype=np.float32)
    session = ort.InferenceSession(str(path), session_options(1, mapped), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


# --- (a) alignment ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["ours", "optimized"])
def test_every_external_tensor_our_writers_write_is_aligned(chain, writer):
    refs = external_data_refs(chain[writer])
    assert sorted(r.tensor for r in refs) == sorted(f"{k}{i}" for k in "wb" for i in range(LAYERS))
    assert all(r.location == f"{writer}.onnx.data" and r.offset % ALIGNMENT == 0 for r in refs), refs
    assert misaligned(chain[writer]) == []
    data = chain[writer].with_name(f"{writer}.onnx.data").stat().st_size
    assert data == max(r.offset + r.length for r in refs)  # no trailing bytes
    check_aligned(chain[writer])


def test_a_dense_file_is_reported_misaligned(chain):
    """The control: onnx's own external-data writer packs tensors densely (offsets 16,000,000 + ...)."""
    assert len(misaligned(chain["dense"])) == 2 * LAYERS - 1  # all but the first, at offset 0
    with pytest.raises(ExternalDataError, match=r"15 external tensors are not aligned to 65536 bytes"):
        check_aligned(chain["dense"])


def test_realigning_moves_the_bytes_not_the_values(chain, tmp_path, monkeypatch):
    """optimize_for_ort's realignment moves ONNX Runtime's own layout (tensors past 1 MiB at 4 KiB, the rest
    dense) in place: the same session on ORT's file and on the realigned one computes the same bits. The file
    save_model writes computes what onnx's dense one does."""
    monkeypatch.setattr(calib_graph, "realign", lambda path: None)
    calib_graph.optimize_for_ort(chain["dense"], tmp_path / "optimized.onnx")
    assert misaligned(tmp_path / "optimized.onnx")
    for mapped in (False, True):
        assert np.array_equal(_run(chain["optimized"], mapped), _run(tmp_path / "optimized.onnx", mapped))
        assert np.array_equal(_run(chain["ours"], mapped), _run(chain["dense"], mapped))


@pytest.mark.parametrize("tensor, key, value, message", [
    (1, "offset", "0", "overlaps the one before it"),  # b0 on top of w0
    (1, "location", "other.data", r"expected every external tensor in dense.onnx.data"),
    (1, "length", None, "with a length"),
    (-1, "length", "10000000", "external data ends at byte"),  # b7 runs past the end of the file
])
def test_realign_refuses_external_data_it_cannot_lay_out(chain, tmp_path, tensor, key, value, message):
    from metacanvas_deploy.calib.external_data import realign

    model = onnx.load(str(chain["dense"]), load_external_data=False)
    entries = model.graph.initializer[tensor].external_data
    kept = [(e.key, e.value) for e in entries if e.key != key] + ([(key, value)] if value is not None else [])
    del entries[:]
    for k, v in kept:
        entries.add(key=k, value=v)
    onnx.save_model(model, str(tmp_path / "dense.onnx"))
    shutil.copyfile(chain["dense"].with_name("dense.onnx.data"), tmp_path / "dense.onnx.data")
    with pytest.raises(ExternalDataError, match=message):
        realign(tmp_path / "dense.onnx")


# --- (b) results --------------------------------------------------------------------------------------------------
def test_a_mapped_session_computes_what_a_copying_one_does(chain):
    """Mapping itself is exact: a mapped session on the external-data file equals the same options on the weights
    embedded in the graph, bit for bit. Against the default (prepacked, ALL-optimised) session the sums differ in
    order: MLAS's prepacked GEMM blocks K differently from the unpacked one, so float32 rounding differs
    (measured ~1e-6 relative here); the tolerance is 1e-5 of the largest output."""
    mapped = _run(chain["ours"], mapped=True)
    assert np.array_equal(mapped, _run(chain["embedded"], mapped=True))
    default = _run(chain["ours"], mapped=False)
    assert np.abs(mapped - default).max() <= 1e-5 * np.abs(default).max()


# --- (c) memory -----------------------------------------------------------------------------------------------
_MEASURE = """
import json, sys
import numpy as np, onnxruntime
from pathlib import Path
from metacanvas_deploy.runtime.engine import load_engine
from metacanvas_deploy.runtime.manifest import EngineEntry
from metacanvas_deploy.runtime.memory import file_backed_mb, private_mb
from metacanvas_deploy.runtime.tensor_spec import TensorSpec

path, mapped = Path(sys.argv[1]), sys.argv[2] == "mapped"
spec = lambda name: TensorSpec(name, "float32", ("rows", {width}))
entry = EngineEntry(stage="chain", file=path.name, backend="onnxruntime", backend_version=onnxruntime.__version__,
                    precision="fp32", inputs=(spec("x"),), outputs=(spec("y"),), dims_ranges={{"rows": [1, 4, 8]}})
x = np.random.default_rng(1).standard_normal((4, {width}), dtype=np.float32)
before = private_mb(), file_backed_mb()
engine = load_engine(path, entry, threads=1, mapped=mapped)
loaded = private_mb(), file_backed_mb()
engine(dict(x=x))
ran = private_mb(), file_backed_mb()
maps = Path("/proc/self/maps").read_text()
print(json.dumps(dict(load_private_mb=loaded[0] - before[0], run_private_mb=ran[0] - before[0],
                      run_file_mb=ran[1] - before[1], data_mapped=str(path.resolve()) + ".data" in maps)))
"""


def _measure(path, mode: str) -> dict:
    """Private (RssAnon) and file-backed (RssFile) growth of a fresh process that opens and runs one engine."""
    out = subprocess.run([sys.executable, "-c", _MEASURE.format(width=WIDTH), str(path), mode], check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon/RssFile come from Linux's /proc")
def test_a_mapped_session_keeps_its_weights_out_of_private_memory(chain):
    """A behaviour check with generous bounds, not a timing: mapped, private memory grows by far less than the
    weights (measured: +0.7 MiB at load, 122 MiB of weights) and the weights appear as a mapped file, read from
    the page cache as the run touches them; by default (prepacking) every weight is copied (+123 MiB)."""
    weights_mb = WEIGHT_BYTES / 2**20
    mapped, default = _measure(chain["optimized"], "mapped"), _measure(chain["optimized"], "default")
    assert mapped["load_private_mb"] < 0.25 * weights_mb and mapped["run_private_mb"] < 0.25 * weights_mb, mapped
    assert mapped["data_mapped"] and mapped["run_file_mb"] > 0.75 * weights_mb, mapped
    assert default["load_private_mb"] > 0.75 * weights_mb, default


# --- (d) a built bundle ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def external_bundle(tmp_path_factory):
    """A tiny SANA bundle built with every weight in `.data` (the full-size layout); returns (path, the raw
    exports' misaligned tensors as export_component wrote them)."""
    from metacanvas_deploy.mc_export import stages
    from metacanvas_deploy.mc_export.build import BuildConfig, build

    raws = {}
    real_export = stages.export_component

    def export(comp, path, **kw):
        files = real_export(comp, path, **kw)
        raws[comp.spec.stage] = (len(files), misaligned(path))
        return files

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calib_graph, "EXTERNAL_DATA_BYTES", 0)
        mp.setattr(stages, "export_component", export)
        path = build(BuildConfig(out=tmp_path_factory.mktemp("mapped") / "sana", backbone="sana", steps=3),
                     log=lambda *a: None)
    return path, raws


def test_the_build_writes_aligned_external_data(external_bundle):
    path, raws = external_bundle
    assert raws and all(n == 2 and bad == [] for n, bad in raws.values()), raws  # export_component: .onnx + .data
    engines = sorted(path.glob("*.onnx"))
    assert engines and all(e.with_name(e.name + ".data").exists() for e in engines)
    for engine in engines:
        assert all(r.offset % ALIGNMENT == 0 for r in external_data_refs(engine)), engine.name
        check_aligned(engine)


def test_a_bundle_runs_in_low_memory_mode_with_mapped_sessions(external_bundle):
    path, _ = external_bundle
    kw = {"prompt": "a red fox", "seed": 7, "num_inference_steps": 3}
    low = Pipeline.load(path, threads=1, low_memory=True)
    assert low.mapped and all(isinstance(e, OnDemandEngine) and e.mapped for e in low.engines.values())
    got = low(**kw)
    assert not any(e.loaded for e in low.engines.values())
    same_sessions = Pipeline.load(path, threads=1, mapped=True)(**kw)
    for name in ("frames", "latents", "prompt_embeds"):
        assert np.array_equal(getattr(got, name), getattr(same_sessions, name)), name
    copied = Pipeline.load(path, threads=1)(**kw)  # prepacked, ALL-optimised: float32 rounding apart
    assert np.abs(got.latents - copied.latents).max() <= 1e-5 * max(1.0, np.abs(copied.latents).max())
    assert np.abs(got.frames.astype(int) - copied.frames).max() <= 1
