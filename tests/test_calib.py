"""INT8 / FP8: recipes, graph passes, calibration, the fallback loop and quantized bundles (calib/).

Oracles: numpy re-computations of each graph pass (transpose folding and SmoothQuant leave the product
unchanged; FP8 Q/DQ equals an ml_dtypes E4M3 emulation), ONNX Runtime's own kernels on the quantized graphs,
and the float bundle the quantized one is gated against. Tiny SANA (the session's bundle is the float
reference), a reduced recipe (4 calibration prompts x 3 steps, 2 held-out requests) so that the file runs in
about a minute; the small-preset accuracy numbers live in the README (benchmarks/).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from metacanvas_deploy.calib import capture as cap
from metacanvas_deploy.calib import graph as calib_graph
from metacanvas_deploy.calib.activations import Exposer, plan_chunks
from metacanvas_deploy.calib.errors import AccuracyBudgetError, RecipeError
from metacanvas_deploy.calib.graph import fold_weight_transposes, integer_kernels, qdq_fp8, smooth, weight_layers
from metacanvas_deploy.calib.quantize import calibrate, prepare, psnr, quantize_stage, sensitivity
from metacanvas_deploy.calib.recipes import Budget, Recipe, default_recipe
from metacanvas_deploy.mc_export.backbones import recipe_for_backbone
from metacanvas_deploy.mc_export.build import BuildConfig, build, resolve_ranges
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.export.onnx_export import export_component
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.mc_export.stages import plan_stages
from metacanvas_deploy.runtime.media import synthetic_media
from metacanvas_deploy.runtime.pipeline import Pipeline

QUICK = dict(calibration_prompts=4, calibration_steps=3, held_out_prompts=2, held_out_seeds=(1000,),
             evaluation_steps=3)


def _session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _linear_graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x (N, K) -> MatMul(x, Transpose(W_a)) -> MatMul(., Transpose(W_b)): how torch exports two linears."""
    nodes, inits, prev = [], [], "x"
    for i, (name, w) in enumerate(weights.items()):
        inits.append(numpy_helper.from_array(w.astype(np.float32), name))
        nodes += [helper.make_node("Transpose", [name], [f"t{i}"], name=f"transpose_{i}", perm=[1, 0]),
                  helper.make_node("MatMul", [prev, f"t{i}"], [f"y{i}"], name=f"linear_{i}")]
        prev = f"y{i}"
    k = next(iter(weights.values())).shape[1]
    n = list(weights.values())[-1].shape[0]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["n", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


# --- recipes --------------------------------------------------------------------------------------------------
def test_recipe_round_trips_and_its_digest_tracks_every_field():
    r = recipe_for_backbone("wan", "int8", num_layers=6)
    assert Recipe.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert Recipe.from_json(r.to_json()).digest() == r.digest()
    assert dataclasses.replace(r, percentile=99.9).digest() != r.digest()
    assert dataclasses.replace(r, budget=Budget(min_psnr_db=31.0)).digest() != r.digest()
    # Wan keeps its first and last blocks float; embedders and the output projection on every backbone
    assert r.keeps_float("transformer.blocks.0.attn1.to_q.weight")
    assert r.keeps_float("transformer.blocks.5.ffn.net.0.proj.weight")
    assert not r.keeps_float("transformer.blocks.3.attn1.to_q.weight")
    for backbone in ("wan", "flux", "sana"):
        rec = recipe_for_backbone(backbone, "fp8")
        assert rec.keeps_float("transformer.proj_out.weight") and rec.keeps_float("injector.out.weight")
        # a block's own proj_out (FLUX's single blocks) is a block linear, quantized
        assert not rec.keeps_float("transformer.single_transformer_blocks.3.proj_out.weight")
        assert rec.calibration == "minmax" and not rec.per_channel_weights  # per-tensor amax
    assert recipe_for_backbone("sana", "int8", target="tensorrt").reduce_range is False


def test_calibration_knows_no_backbone_the_patterns_come_in():
    """`calib.recipes.default_recipe` holds no per-backbone table: the compiler's record passes the patterns."""
    r = default_recipe("any", "int8", (r"\.embed\.",))
    assert r.keep_float == (r"\.embed\.",) and r.name == "any-int8-w8a8" and r.reduce_range
    assert default_recipe("any", "fp8", ()).keep_float == ()
    with pytest.raises(RecipeError, match="precision 'int4'"):
        default_recipe("any", "int4", ())


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="int4"), "format"), (dict(calibration="mse"), "calibration"), (dict(percentile=20.0), "percentile"),
    (dict(smoothquant_alpha=1.5), "smoothquant"), (dict(keep_float=("(",)), "keep_float"),
    (dict(fallback_fraction=0.0), "fallback"),
])
def test_a_bad_recipe_is_refused(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(**{"name": "x", "format": "int8", **kwargs})


def test_a_recipe_must_match_the_precision():
    with pytest.raises(ConfigError, match="fp8 recipe cannot build --precision int8"):
        BuildConfig(out="x", backbone="sana", precision="int8",
                    recipe=recipe_for_backbone("sana", "fp8")).validate(False)


# --- graph passes ---------------------------------------------------------------------------------------------
def test_folding_weight_transposes_is_exact_and_names_layers_by_module_path():
    rng = np.random.default_rng(0)
    model = _linear_graph({"blk.a.weight": rng.standard_normal((8, 6)), "blk.b.weight": rng.standard_normal((4, 8))})
    x = rng.standard_normal((5, 6)).astype(np.float32)
    before = _session(model).run(None, {"x": x})[0]
    folded = fold_weight_transposes(model)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "MatMul"]
    assert {t.name for t in folded.graph.initializer} == {"blk.a.weight.T", "blk.b.weight.T"}
    np.testing.assert_array_equal(_session(folded).run(None, {"x": x})[0], before)  # a copy: bit-exact
    assert weight_layers(folded) == {"linear_0": "blk.a.weight", "linear_1": "blk.b.weight"}


def test_smoothquant_moves_scale_into_weights_without_changing_the_product():
    rng = np.random.default_rng(1)
    model = fold_weight_transposes(_linear_graph({"a.weight": rng.standard_normal((8, 6))}))
    x = rng.standard_normal((32, 6)).astype(np.float32)
    x[:, 2] *= 50  # an outlier channel
    before = _session(model).run(None, {"x": x})[0]
    assert smooth(model, {"linear_0": np.abs(x).max(axis=0)}, alpha=0.5) == ["linear_0"]
    # tolerance: the scale and its inverse each round once in float32 (~1e-7 relative per product term)
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], before, rtol=1e-5, atol=1e-5)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "a.weight.T"))
    assert np.abs(w[2]).max() > np.abs(w[[0, 1, 3, 4, 5]]).max(axis=1).max()  # the outlier moved into row 2


def test_fp8_qdq_equals_an_e4m3_emulation():
    rng = np.random.default_rng(2)
    wa, wb = rng.standard_normal((8, 6)), rng.standard_normal((4, 8))
    model = fold_weight_transposes(_linear_graph({"a.weight": wa, "b.weight": wb}))
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y0 = (x @ wa.T.astype(np.float32)).astype(np.float32)
    amax = {"x": 3.0, "y0": float(np.abs(y0).max())}
    q = qdq_fp8(model, ["linear_0", "linear_1"], amax)
    assert {o.version for o in q.opset_import if o.domain == ""} == {21}
    assert sum(t.data_type == TensorProto.FLOAT8E4M3FN for t in q.graph.initializer) == 3  # 2 weights + zero

    def fq(v, scale):
        return (np.asarray(v, np.float32) / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale

    def layer(v, act_amax, w):
        wt = w.T.astype(np.float32)
        return fq(v, np.float32(act_amax / 448)) @ fq(wt, np.float32(np.abs(wt).max() / 448))

    want = layer(layer(x, 3.0, wa), amax["y0"], wb)
    # float32 matmuls over the same 8-bit values: only summation order differs
    np.testing.assert_allclose(_session(q).run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


# --- calibration, quantization, fallback on the session's tiny SANA bundle --------------------------------------
@pytest.fixture(scope="module")
def float_bundle(bundles):
    return bundles["sana"]


@pytest.fixture(scope="module")
def raw_denoise(tmp_path_factory):
    model = MetaCanvas.from_preset("sana", "tiny", seed=0, random_canvas=True)
    path = tmp_path_factory.mktemp("calib") / "denoise.raw.onnx"
    export_component(plan_stages(model, resolve_ranges(model, ()))["denoise"], path)
    return path


@pytest.fixture(scope="module")
def feeds(float_bundle):
    pipe = Pipeline.load(float_bundle, threads=1)
    return cap.capture(pipe, "denoise", cap.requests(("t2i",), 2, (0,), "calibration"), 3)


def test_capture_sees_every_step_and_both_cfg_rows(feeds):
    assert len(feeds) == 2 * 3
    assert all(f["prompt_embeds"].shape[0] == 2 for f in feeds)  # [negative, positive] in one batch
    assert len({float(f["timestep"][0]) for f in feeds[:3]}) == 3  # three distinct timesteps per request


def test_calibration_is_deterministic(float_bundle, raw_denoise, tmp_path):
    recipe = Recipe(name="t", format="int8", **QUICK)
    pipe = Pipeline.load(float_bundle, threads=1)
    out = []
    for i in range(2):
        f = cap.capture(pipe, "denoise", cap.requests(("t2i",), 2, (0,), "calibration"), 3)
        prepared, _, nodes = prepare(raw_denoise, tmp_path / f"p{i}.onnx", recipe, f)
        calibrate(prepared, nodes, f, recipe, tmp_path / f"r{i}.json")
        out.append((tmp_path / f"r{i}.json").read_bytes())
    assert out[0] == out[1]


def test_synthetic_media_fit_each_task_and_are_seeded():
    assert synthetic_media("t2i", 32, 48, 5) == {} and synthetic_media("t2v", 32, 48, 5) == {}
    image = synthetic_media("edit", 32, 48, 5, seed=3)["image"]
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8 and image.std() > 10  # not a flat field
    assert np.array_equal(synthetic_media("i2v", 32, 48, 5, seed=3)["image"], image)
    assert not np.array_equal(synthetic_media("edit", 32, 48, 5, seed=4)["image"], image)
    video = synthetic_media("v2v", 32, 48, 5, seed=3)["video"]
    assert video.shape == (5, 32, 48, 3)
    assert np.array_equal(video[4], np.clip(image.astype(np.int16) + 12, 0, 255).astype(np.uint8))
    assert np.array_equal(synthetic_media("r2v", 32, 48, 5, seed=3)["reference_images"][0], image)


def test_captured_feeds_on_disk_equal_the_pipeline_s_and_shared_arrays_are_written_once(float_bundle, feeds,
                                                                                        tmp_path):
    pipe = Pipeline.load(float_bundle, threads=1)
    store = cap.capture(pipe, "denoise", cap.requests(("t2i",), 2, (0,), "calibration"), 3, tmp_path / "f")
    assert len(store) == len(feeds) == 6
    for ours, theirs in zip(store, feeds):  # bit-exact: .npy round trip
        assert ours.keys() == theirs.keys()
        assert all(np.array_equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    # an array handed to every step of a request (prompt embeddings, canvas) is one file per request
    distinct = sum(len({id(v) for f in feeds[r:r + 3] for v in f.values()}) for r in (0, 3))
    assert len(list((tmp_path / "f").glob("*.npy"))) == distinct < sum(len(f) for f in feeds)
    view = store[1:3]
    assert len(view) == 2 and np.array_equal(view[0]["sample"], feeds[1]["sample"])


def _by_tensor(pairs) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    return out


def test_activations_fetched_in_chunks_equal_one_run_and_respect_the_budget(float_bundle, raw_denoise, feeds,
                                                                            tmp_path, monkeypatch):
    recipe = Recipe(name="t", format="int8", **QUICK)
    monkeypatch.setattr(calib_graph, "EXTERNAL_DATA_BYTES", 0)  # and the weights read from .data, as at full size
    prepared, layers, nodes = prepare(raw_denoise, tmp_path / "p.onnx", recipe, feeds)
    assert prepared == tmp_path / "p.onnx" and calib_graph.external_data(prepared) is not None
    by_name = {n.name: n for n in onnx.load(str(tmp_path / "p.onnx")).graph.node}
    tensors = sorted({t for n in nodes for t in (by_name[n].input[0], by_name[n].output[0])})
    sizes = Exposer(tmp_path / "p.onnx", tensors).sizes(feeds[:2])
    whole = Exposer(tmp_path / "p.onnx", tensors, budget=1 << 40)
    one = _by_tensor(whole(feeds[:2]))
    assert one.keys() == set(tensors) and all(max(v.nbytes for v in one[t]) == sizes[t] for t in tensors)
    assert len(whole.sessions) == 2 and whole.sessions[1] == tensors  # the shapes' session, then one chunk
    budget = sum(sizes.values()) // 5
    chunked = Exposer(tmp_path / "p.onnx", tensors, budget=budget)
    merged = _by_tensor(chunked(feeds[:2]))
    chunks = chunked.sessions[1:]  # each session outputs one chunk only: ONNX Runtime keeps every output alive
    assert len(chunks) >= 5 and all(sum(sizes[t] for t in c) <= budget for c in chunks)
    assert sorted(t for c in chunks for t in c) == tensors
    assert merged.keys() == one.keys()
    assert all(len(merged[t]) == 2 and all(map(np.array_equal, merged[t], one[t])) for t in merged)
    # the ranges (and so the quantized model) do not depend on the chunking: identical files
    calibrate(tmp_path / "p.onnx", nodes, feeds, recipe, tmp_path / "whole.json", budget=1 << 40)
    calibrate(tmp_path / "p.onnx", nodes, feeds, recipe, tmp_path / "chunked.json", budget=budget)
    assert (tmp_path / "whole.json").read_bytes() == (tmp_path / "chunked.json").read_bytes()
    assert sensitivity(tmp_path / "p.onnx", tmp_path / "whole.json", nodes, feeds[:2], recipe, budget=1) == \
        sensitivity(tmp_path / "p.onnx", tmp_path / "whole.json", nodes, feeds[:2], recipe, budget=1 << 40)


def test_chunks_are_planned_in_order_within_the_budget():
    sizes = {"a": 4, "b": 4, "c": 9, "d": 1, "e": 3}
    assert plan_chunks(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]  # c alone: larger than the budget
    assert plan_chunks(sizes, 100) == [list(sizes)]


def test_sensitivity_ranks_the_layer_with_an_outlier_input_first(tmp_path):
    """Two parallel linears on inputs a and b; b carries one outlier, so its calibrated uint8 range is wide
    and every ordinary value of b loses resolution: b's layer must rank as the more sensitive."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", [x, "w"], [f"y_{x}"], name=f"linear_{x}") for x in ("a", "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 6])
                                           for x in ("a", "b")],
                              [helper.make_tensor_value_info(f"y_{x}", TensorProto.FLOAT, ["n", 6]) for x in "ab"],
                              [numpy_helper.from_array(w, "w")])
    path, ranges = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    feeds = [{"a": rng.standard_normal((64, 6)).astype(np.float32),
              "b": rng.standard_normal((64, 6)).astype(np.float32)} for _ in range(2)]
    feeds[0]["b"][0, 0] = 1e3
    recipe = Recipe(name="t", format="int8", calibration="minmax")
    calibrate(path, ["linear_a", "linear_b"], feeds, recipe, ranges)
    scores = sensitivity(path, ranges, ["linear_a", "linear_b"], feeds[1:], recipe)
    assert scores["linear_b"] > 100 * scores["linear_a"] > 0


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_a_quantized_denoise_stage_meets_the_budget(float_bundle, raw_denoise, tmp_path, fmt, monkeypatch):
    recipe = dataclasses.replace(recipe_for_backbone("sana", fmt), **QUICK)
    if fmt == "fp8":  # and through the full-size file layout (weights in .data), as TensorRT would parse it
        monkeypatch.setattr(calib_graph, "EXTERNAL_DATA_BYTES", 0)
    q = quantize_stage(float_bundle, raw_denoise, recipe, "denoise", tmp_path, threads=1,
                       log=lambda *a: None)
    assert q.metrics.passes(recipe) and q.fallback == []
    assert len(q.quantized) > 0 and not any(recipe.keeps_float(w) for w in q.quantized)
    qdq = onnx.load(str(q.qdq_path))
    dq = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) >= len(q.quantized)  # every quantized layer reads Q/DQ tensors (TensorRT's explicit form)
    if fmt == "int8":  # ONNX Runtime's CPU model runs them on integer kernels
        kernels = integer_kernels(onnx.load(str(q.cpu_path)))
        assert sum(kernels.values()) >= 0.8 * len(q.quantized), kernels
    else:
        assert any(t.data_type == TensorProto.FLOAT8E4M3FN for t in qdq.graph.initializer)
        assert calib_graph.external_data(q.qdq_path) is not None


def test_the_fallback_loop_moves_the_most_sensitive_layers_and_fails_with_numbers(float_bundle, raw_denoise,
                                                                                  tmp_path):
    recipe = dataclasses.replace(recipe_for_backbone("sana", "int8"), **QUICK, budget=Budget(min_psnr_db=500.0),
                                 fallback_fraction=0.5, max_fallback_rounds=2)
    lines = []
    with pytest.raises(AccuracyBudgetError, match=r"misses its accuracy budget after 3 rounds .*mean PSNR [0-9.]+ dB.*"
                                         r"PSNR short by [0-9.]+ dB"):
        quantize_stage(float_bundle, raw_denoise, recipe, "denoise", tmp_path, threads=1,
                       log=lines.append, low_memory=True)  # the float pipeline one stage at a time
    counts = [int(line.split(":")[1].split()[0]) for line in lines if line.strip().startswith("round")]
    assert len(counts) == 3 and counts[0] > counts[1] > counts[2]  # half of what is left, each round
    assert not list(tmp_path.glob("round*"))  # each missed round's graphs removed as the next begins (disk)


# --- the build and the report ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int8_bundle(float_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    shutil.copytree(float_bundle, root / "sana-fp32")  # the float bundle the build expects at <out>-fp32
    recipe = dataclasses.replace(recipe_for_backbone("sana", "int8"), **QUICK)
    with pytest.MonkeyPatch.context() as mp:  # the full-size file layout: every quantized graph's weights in .data
        mp.setattr(calib_graph, "EXTERNAL_DATA_BYTES", 0)
        return build(BuildConfig(out=root / "sana", backbone="sana", precision="int8", steps=3, recipe=recipe),
                     log=lambda *a: None), recipe


def test_an_int8_bundle_records_its_recipe_and_runs_on_integer_kernels(int8_bundle, float_bundle):
    path, recipe = int8_bundle
    manifest = json.loads((path / "manifest.json").read_text())
    record = manifest["build"]["quantization"]["stages"]["denoise"]
    assert record["recipe_sha256"] == recipe.digest() and Recipe.from_json(record["recipe"]) == recipe
    assert manifest["engines"]["denoise"]["precision"] == "int8"
    assert manifest["engines"]["planner"]["precision"] == "fp32"  # the planner and VAE stay float
    for stage in ("planner", "vae_decoder"):  # shipped unchanged: hard links to the float bundle's files, no copy
        rel = manifest["engines"][stage]["file"]
        assert (path / rel).stat().st_ino == (path.parent / "sana-fp32" / rel).stat().st_ino
    assert manifest["engines"]["denoise"]["external_data"] == ["denoise.onnx.data"]
    assert set(record["peak_rss_mb"]) == {"capture", "calibrate", "quantize", "evaluate"}  # no fallback ran
    assert sum(integer_kernels(onnx.load(str(path / "denoise.onnx"))).values()) > 0
    kw = dict(prompt=cap.requests(("t2i",), 1, (0,), "held_out")[0].prompt, seed=1234, num_inference_steps=3)
    ours = Pipeline.load(path, threads=1)(**kw)
    ref = Pipeline.load(float_bundle, threads=1)(**kw)
    assert psnr(ours.frames, ref.frames) >= recipe.budget.min_psnr_db  # an unseen prompt and seed


def test_calib_report_measures_the_bundle_against_its_float_bundle(int8_bundle, capsys):
    from metacanvas_deploy.calib.__main__ import main

    assert main(["report", "--bundle", str(int8_bundle[0])]) == 0
    out = capsys.readouterr().out
    assert "| denoise | next_sample (update) |" in out and "budget 30.0 dB: meets" in out
    assert main(["report", "--bundle", str(int8_bundle[0].parent / "sana-fp32")]) == 2  # not a quantized bundle


def test_verify_and_report_fail_a_quantized_stage_that_went_wrong(int8_bundle, tmp_path, capsys):
    """A quantized denoise graph whose float weights were changed after the build (hashes resealed, as an editor
    of both would): the bundle still loads, but `verify` and `calib report` measure it against the float bundle
    and fail, naming the stage and the missed budget."""
    from test_bundle import reseal

    from metacanvas_deploy.calib.__main__ import main
    from metacanvas_deploy.mc_export.build import verify
    from metacanvas_deploy.mc_export.errors import StageParityError

    path = tmp_path / "sana"
    shutil.copytree(int8_bundle[0], path)
    model = onnx.load(str(path / "denoise.onnx"))  # weights read from denoise.onnx.data
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 64]
    for t in floats:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(3.0), t.name))
    (path / "denoise.onnx.data").unlink()
    onnx.save(model, str(path / "denoise.onnx"), save_as_external_data=True, location="denoise.onnx.data",
              size_threshold=1024)  # small shape constants stay inline, as calib.graph writes them
    for rel in ("denoise.onnx", "denoise.onnx.data"):
        reseal(path, rel)
    with pytest.raises(StageParityError, match="denoise.*misses its accuracy budget"):
        verify(path)
    assert main(["report", "--bundle", str(path)]) == 2
    assert "misses its accuracy budget" in capsys.readouterr().err


def test_layers_whose_weight_the_exporter_renamed_are_named_by_their_module_path():
    """With onnxscript's optimizer on, a folded `Transpose(W)` becomes `val_N`; the recipe's keep-float patterns
    must still see the module path, which the exporter leaves in the node's name_scopes."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "val_7")
    node = helper.make_node("MatMul", ["x", "val_7"], ["y"], name="node_MatMul_3")
    scopes = ['', 'transformer', 'transformer.blocks.0', 'transformer.blocks.0.attn1.to_q', 'linear_3']
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert weight_layers(model) == {"node_MatMul_3": "transformer.blocks.0.attn1.to_q.weight"}
    assert recipe_for_backbone("wan", "int8", num_layers=4).keeps_float("transformer.blocks.0.attn1.to_q.weight")
