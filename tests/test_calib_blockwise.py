"""INT8/FP8 calibration block by block (`calib.partition`, `calib.blockwise`): the same answer as the whole-graph
pass, resumable, refusing what it cannot use.

Oracles: the whole-graph pass (`calib.quantize.calibrate`, `calib.sensitivity.sensitivity`) on the same graph and
the same calls; ONNX Runtime running the whole graph. Tolerance: none. Both passes run ONNX Runtime with the same
session options (`calib.activations.session_options`), so every activation is the same float32 bit for bit; each
tensor's statistic (min/max, or the histogram ORT's percentile collector grows call by call, its bins extended
as new extremes come) sees the same values in the same call order. The minmax (FP8 amax) ranges, the percentile
(INT8) ranges and the sensitivity figures are therefore equal exactly, not within a tolerance; a per-call
histogram merged in another call order would only be equal within a bin width, which is why the block pass keeps
the call order.

Graphs: tiny SANA with 3 blocks and tiny FLUX (a double and a single block: two block lists), their calls drawn
from the component specs (two shapes); the gate test quantizes the session's tiny SANA bundle both ways.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.calib_memory import same_graph
from metacanvas_deploy.calib import blockwise as bw
from metacanvas_deploy.calib.activations import session_options
from metacanvas_deploy.calib.capture import check_calibration_set
from metacanvas_deploy.calib.errors import CalibrationDataError, CalibrationStateError, RecipeError
from metacanvas_deploy.calib.partition import extract, partition
from metacanvas_deploy.calib.quantize import calibrate, prepare, quantize_stage
from metacanvas_deploy.calib.ranges import load_ranges
from metacanvas_deploy.calib.recipes import Budget
from metacanvas_deploy.calib.sensitivity import sensitivity
from metacanvas_deploy.mc_export.backbones import get, recipe_for_backbone
from metacanvas_deploy.mc_export.build import resolve_ranges
from metacanvas_deploy.mc_export.export.onnx_export import export_component
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.mc_export.stages import plan_stages

QUICK = dict(calibration_prompts=4, calibration_steps=3, held_out_prompts=2, held_out_seeds=(1000,),
             evaluation_steps=3)


class Interrupted(Exception):
    """Raised from the block pass's hook: a kill at that point of the real code path."""


def _stage(backbone: str, layers: int | None, root: Path):
    preset = get(backbone).preset("tiny")
    if layers:
        preset = dataclasses.replace(preset, transformer={**preset.transformer, "num_layers": layers})
    model = MetaCanvas.from_preset(backbone, preset, seed=0, random_canvas=True)
    comp = plan_stages(model, resolve_ranges(model, ()))["denoise"]
    raw = root / f"{backbone}.raw.onnx"
    export_component(comp, raw)
    calls = [comp.sample_inputs("opt", seed=i) for i in range(3)] + [comp.sample_inputs("min", seed=9)]
    return raw, calls


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """backbone -> (raw denoise export, 4 calls of two shapes): SANA with 3 blocks, FLUX with 1 + 1."""
    root = tmp_path_factory.mktemp("blockwise")
    return {"sana": _stage("sana", 3, root), "flux": _stage("flux", None, root)}


def _prepared(stages, backbone: str, fmt: str, where: Path):
    raw, calls = stages[backbone]
    recipe = recipe_for_backbone(backbone, fmt)
    prepared, _, nodes = prepare(raw, where / f"{backbone}.{fmt}.prepared.onnx", recipe, calls)
    return prepared, nodes, calls, recipe


def _values(cache: Path) -> dict[str, tuple]:
    return {t: tuple(np.asarray(v.range_value).tolist()) for t, v in load_ranges(cache).items()}


@pytest.mark.parametrize("annotated", [True, False], ids=["exporter-types", "types-inferred"])
def test_the_segments_run_in_order_are_the_graph(stages, tmp_path, annotated):
    raw, calls = stages["flux"]
    model = onnx.load(str(raw))
    if not annotated:  # boundaries without a recorded type: extract infers them (partition.annotate)
        del model.graph.value_info[:]
    segments = partition(model.graph, get("flux").block_pattern())
    assert [s.name for s in segments] == ["prologue", "transformer.transformer_blocks.0",
                                          "transformer.single_transformer_blocks.0", "epilogue"]
    assert len(segments[1].inputs) > 1  # the hidden state and the side tensors (temb, rotary, text states)
    whole = ort.InferenceSession(str(raw), session_options(1), providers=["CPUExecutionProvider"])
    want = whole.run(None, calls[3])
    values = dict(calls[3])
    for k, seg in enumerate(segments):
        extract(model, seg, tmp_path / f"s{k}.onnx")
        sess = ort.InferenceSession(str(tmp_path / f"s{k}.onnx"), session_options(1),
                                    providers=["CPUExecutionProvider"])
        values.update(zip(seg.outputs, sess.run(list(seg.outputs), {t: values[t] for t in seg.inputs})))
    for out, ref in zip(whole.get_outputs(), want):
        assert np.array_equal(values[out.name], ref)  # bit for bit


@pytest.mark.parametrize("backbone", ["sana", "flux"])
@pytest.mark.parametrize("fmt", ["fp8", "int8"])  # minmax (amax) and percentile ranges
def test_block_ranges_and_sensitivity_equal_the_whole_graph_pass(stages, backbone, fmt, tmp_path):
    prepared, nodes, calls, recipe = _prepared(stages, backbone, fmt, tmp_path)
    assert recipe.calibration_pass == "block" and recipe.calibration == ("minmax" if fmt == "fp8" else "percentile")
    calibrate(prepared, nodes, calls, recipe, tmp_path / "whole.json", threads=1)
    state = bw.open_state(tmp_path / "state", bw.identity(recipe, stages[backbone][0], "model"))
    scores = bw.block_calibrate(prepared, nodes, calls, recipe, tmp_path / "block.json", state, threads=1)
    whole, block = _values(tmp_path / "whole.json"), _values(tmp_path / "block.json")
    assert len(whole) >= 2 * len(nodes) // 2 and block == whole  # every tensor, exactly
    assert scores == sensitivity(prepared, tmp_path / "whole.json", nodes, calls[:2], recipe, threads=1)
    assert sorted(p.name for p in state.directory.iterdir() if p.name.startswith("segment")) == []  # cleaned up


@pytest.mark.parametrize("where", [(2, None), (2, 1)], ids=["at-a-block-boundary", "mid-block"])
def test_an_interrupted_pass_resumes_at_its_first_unfinished_block(stages, tmp_path, where):
    prepared, nodes, calls, recipe = _prepared(stages, "sana", "int8", tmp_path)
    ident = bw.identity(recipe, stages["sana"][0], "model")
    bw.block_calibrate(prepared, nodes, calls, recipe, tmp_path / "straight.json",
                       bw.open_state(tmp_path / "s0", ident), threads=1)

    def kill(segment, call):
        if (segment, call) == where:
            raise Interrupted

    with pytest.raises(Interrupted):
        bw.block_calibrate(prepared, nodes, calls, recipe, tmp_path / "resumed.json",
                           bw.open_state(tmp_path / "s1", ident), threads=1, hook=kill)
    assert not (tmp_path / "resumed.json").exists()
    done = json.loads((tmp_path / "s1" / "state.json").read_text())["done"]
    assert done == ["prologue", "transformer.transformer_blocks.0", "transformer.transformer_blocks.1"][:where[0] + (
        1 if where[1] is None else 0)]
    ran: list[int] = []
    lines: list[str] = []
    bw.block_calibrate(prepared, nodes, calls, recipe, tmp_path / "resumed.json", bw.open_state(tmp_path / "s1", ident),
                       threads=1, log=lines.append, hook=lambda s, c: ran.append(s) if c is None else None)
    assert ran[0] == len(done) and ran == list(range(len(done), len(done) + len(ran)))  # nothing done twice
    assert any("resuming at transformer.transformer_blocks" in line for line in lines)
    assert _values(tmp_path / "resumed.json") == _values(tmp_path / "straight.json")
    assert not (tmp_path / "s1" / "spill").exists() or not any((tmp_path / "s1" / "spill").iterdir())


def test_a_state_of_another_model_or_recipe_is_refused_naming_it(stages, tmp_path):
    raw = stages["sana"][0]
    recipe = recipe_for_backbone("sana", "int8")
    bw.open_state(tmp_path / "state", bw.identity(recipe, raw, "model-a"))
    other = dataclasses.replace(recipe, name="mine", percentile=99.9)
    with pytest.raises(CalibrationStateError, match=r"state of recipe sana-int8-w8a8 .*not of this calibration "
                                                    r"\(recipe mine .*remove it"):
        bw.open_state(tmp_path / "state", bw.identity(other, raw, "model-a"))
    with pytest.raises(CalibrationStateError, match=r"model model-a.*model model-b"):
        bw.open_state(tmp_path / "state", bw.identity(recipe, raw, "model-b"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("mine")
    with pytest.raises(CalibrationStateError, match="not a calibration state"):
        bw.open_state(tmp_path / "elsewhere", bw.identity(recipe, raw, "model-a"))
    assert (tmp_path / "elsewhere" / "notes.txt").read_text() == "mine"
    earlier = tmp_path / "earlier" / "state.json"  # written before the key was the recipe's calibration only
    earlier.parent.mkdir()
    earlier.write_text(json.dumps({"format": bw.STATE_FORMAT, "done": [], "identity": {
        "recipe": recipe.name, "recipe_sha256": "0" * 64, "model": "model-a", "graph_sha256": "1" * 64}}))
    for check in (lambda: bw.check_recipe(earlier.parent, recipe),
                  lambda: bw.open_state(earlier.parent, bw.identity(recipe, raw, "model-a"))):
        with pytest.raises(CalibrationStateError, match=r"state of recipe sana-int8-w8a8 \(an earlier state format, "
                                                        r"keyed by the whole recipe\), model model-a"):
            check()


def test_a_state_is_reused_by_a_recipe_differing_only_in_its_gate(stages, tmp_path):
    """A build that missed its budget is rerun with another budget, held-out set or fallback without calibrating
    again: those fields do not change the calls, ranges or noise figures the state holds. Oracle: the state's
    done blocks survive the reopen; what does change them (the calibration set, the percentile, whether noise
    figures are measured) is refused."""
    raw = stages["sana"][0]
    recipe = recipe_for_backbone("sana", "int8")
    state = bw.open_state(tmp_path / "state", bw.identity(recipe, raw, "m"))
    state.done.append("transformer.transformer_blocks.0")
    state.save()
    relaxed = dataclasses.replace(recipe, name="relaxed", budget=Budget(min_psnr_db=28.0, min_stage_cosine=0.985),
                                  held_out_prompts=1, held_out_seeds=(7,), evaluation_steps=2, max_fallback_rounds=1,
                                  fallback_fraction=0.2)
    bw.check_recipe(tmp_path / "state", relaxed)
    assert bw.open_state(tmp_path / "state", bw.identity(relaxed, raw, "m")).done == state.done
    for other in (dataclasses.replace(recipe, calibration_steps=recipe.calibration_steps + 1),
                  dataclasses.replace(recipe, percentile=99.9), dataclasses.replace(recipe, max_fallback_rounds=0)):
        with pytest.raises(CalibrationStateError, match="remove it"):
            bw.check_recipe(tmp_path / "state", other)
        with pytest.raises(CalibrationStateError, match="not of this calibration"):
            bw.open_state(tmp_path / "state", bw.identity(other, raw, "m"))


def test_bad_calibration_input_is_refused_before_any_work(stages):
    from metacanvas_deploy.mc_export.quantized import check_calibration

    wan = recipe_for_backbone("wan", "int8")
    with pytest.raises(CalibrationDataError, match=r"2 calibration prompts for 4 tasks .*calibration_prompts >= 4"):
        check_calibration_set(dataclasses.replace(wan, calibration_prompts=2), ("t2v", "i2v", "v2v", "r2v"))
    with pytest.raises(CalibrationDataError, match=r"500 generation calibration prompts asked, .* has 128"):
        check_calibration_set(dataclasses.replace(wan, calibration_prompts=500), ("t2i",))
    model = MetaCanvas.from_preset("sana", "tiny", seed=0)
    components = plan_stages(model, resolve_ranges(model, ()))
    wrong = dataclasses.replace(recipe_for_backbone("sana", "fp8"), block_pattern=r"transformer\.blocks\.\d+")
    with pytest.raises(RecipeError, match=r"block_pattern .*names no block of the denoise stage"):
        check_calibration(components, wrong, tuple(model.cfg.tasks))
    with pytest.raises(RecipeError, match="names no block of the denoise graph"):
        partition(onnx.load(str(stages["sana"][0]), load_external_data=False).graph, wrong.block_pattern,
                  "denoise graph")
    with pytest.raises(RecipeError, match="calibration_pass 'block' needs a block_pattern"):
        dataclasses.replace(wrong, block_pattern=None)


def test_the_quantized_stage_and_its_gate_match_the_whole_graph_pass(bundles, tmp_path, monkeypatch, capfd):
    """One tiny SANA denoise stage quantized to INT8 both ways: the same Q/DQ graph byte for byte, the same gate
    figures; the block pass reports progress per block, the quantizer's optimisation is announced and its
    warnings stay out of the output."""
    from metacanvas_deploy.calib import progress

    monkeypatch.setattr(progress.Progress.__init__, "__defaults__", (print, 0.0, True))  # a line per update
    model = MetaCanvas.from_preset("sana", "tiny", seed=0, random_canvas=True)
    raw = tmp_path / "denoise.raw.onnx"
    export_component(plan_stages(model, resolve_ranges(model, ()))["denoise"], raw)
    out, lines = {}, []
    for mode in ("whole", "block"):
        recipe = dataclasses.replace(recipe_for_backbone("sana", "int8"), **QUICK, calibration_pass=mode)
        (tmp_path / mode).mkdir()
        out[mode] = quantize_stage(bundles["sana"], raw, recipe, "denoise", tmp_path / mode, threads=1,
                                   log=lines.append, state_dir=tmp_path / f"{mode}.state")
    assert same_graph(out["block"].qdq_path, out["whole"].qdq_path)  # quantized block by block, stitched
    assert out["block"].metrics == out["whole"].metrics and out["block"].quantized == out["whole"].quantized
    assert any(line.startswith("denoise: block 1/1 (transformer.transformer_blocks.0): ") and "left" in line
               for line in lines), lines
    assert any(line.startswith("denoise: capture (requests): ") for line in lines)
    assert "denoise: optimising the quantized graph for ONNX Runtime (one pass over it)" in lines
    assert "WARNING" not in capfd.readouterr().err
    shutil.rmtree(tmp_path / "block.state")


def _counts(lines: list[str], label: str) -> list[tuple[int, int]]:
    """The ``(done, total)`` of each progress line of ``label`` (``label: 40% (4 of 10), ...``)."""
    return [tuple(int(v) for v in line.split("(", 2)[2].split(")")[0].split(" of ")) for line in lines
            if line.startswith(f"{label}: ")]


@pytest.mark.parametrize("backbone", ["sana", "flux"])
def test_int8_quantized_block_by_block_is_the_whole_graph_quantizers_graph(stages, backbone, tmp_path, monkeypatch):
    """ONNX Runtime's quantizer run on one segment at a time (`calib.qdq` ``by_block``: the stage's float weights
    never held whole) and the segments stitched back: the whole-graph quantizer's nodes and weights, bit for bit
    (the side tensors every block reads get one shared Q/DQ pair, as in the whole graph); the same outputs bit for
    bit, as the Q/DQ graph and after ONNX Runtime's offline optimisation (integer kernels). Nothing left behind.
    Progress counts the layers of each quantized segment as it is done (oracle: the partition's segments)."""
    from metacanvas_deploy.calib import progress
    from metacanvas_deploy.calib.graph import optimize_for_ort
    from metacanvas_deploy.calib.qdq import quantize_model

    monkeypatch.setattr(progress.Progress.__init__, "__defaults__", (print, 0.0, True))  # a line per update
    prepared, nodes, calls, recipe = _prepared(stages, backbone, "int8", tmp_path)
    calibrate(prepared, nodes, calls, recipe, tmp_path / "ranges.json", threads=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    lines = {}
    for mode in ("whole", "block"):
        (tmp_path / mode).mkdir()
        lines[mode] = []
        quantize_model(prepared, tmp_path / mode / "q.onnx", recipe, nodes, tmp_path / "ranges.json",
                       by_block=mode == "block", log=lines[mode].append, label="q")
        optimize_for_ort(tmp_path / mode / "q.onnx", tmp_path / mode / "cpu.onnx")
    graph = onnx.load(str(prepared), load_external_data=False).graph
    per_segment = [n for n in (sum(node.name in nodes for node in graph.node[seg.start:seg.stop])
                               for seg in partition(graph, recipe.block_pattern)) if n]
    done = np.cumsum(per_segment)[:-1]  # the last update completes the count: no line for it
    assert _counts(lines["block"], "q (layers)") == [(int(k), len(nodes)) for k in done]
    assert lines["whole"] == []  # one call to ONNX Runtime's quantizer: nothing to count until it is done
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "whole", "block"])
    assert same_graph(tmp_path / "block" / "q.onnx", tmp_path / "whole" / "q.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "block" / "q.onnx")).graph.node) > 4
    for name in ("q.onnx", "cpu.onnx"):
        outs = [ort.InferenceSession(str(tmp_path / mode / name), providers=["CPUExecutionProvider"]).run(None, f)
                for mode in ("whole", "block") for f in calls[2:]]
        assert all(np.array_equal(a, b) for x, y in zip(outs[:2], outs[2:]) for a, b in zip(x, y))


def test_a_stage_with_external_weights_is_calibrated_and_quantized_where_it_lies(stages, tmp_path):
    """A raw export with its weights in external data and nothing to fold (what a lazy full-size export writes,
    and a float bundle ships): nothing is prepared (no copy of the stage), the block pass copies one segment's
    weights at a time into its state, FP8 and INT8 quantization read the weights where they lie; the raw's
    folder (a float bundle's) is only read. Oracle: the in-memory path's ranges, and its Q/DQ graphs' outputs."""
    from metacanvas_deploy.calib import progress
    from metacanvas_deploy.calib.external_data import save_aligned
    from metacanvas_deploy.calib.graph import fold_weight_transposes
    from metacanvas_deploy.calib.quantize import quantize_model

    raw, calls = stages["sana"]
    (tmp_path / "float").mkdir()
    lazy = tmp_path / "float" / "denoise.onnx"
    save_aligned(fold_weight_transposes(onnx.load(str(raw))), lazy)
    before = {p.name: p.stat().st_mtime_ns for p in lazy.parent.iterdir()}
    recipe = recipe_for_backbone("sana", "fp8")
    prepared, _, nodes = prepare(lazy, tmp_path / "p.onnx", recipe, calls)
    assert prepared == lazy and not (tmp_path / "p.onnx").exists()
    ref, _, ref_nodes = prepare(raw, tmp_path / "ref.onnx", recipe, calls)
    assert nodes == ref_nodes
    state = bw.open_state(tmp_path / "state", bw.identity(recipe, lazy, "model"))
    bw.block_calibrate(prepared, nodes, calls, recipe, tmp_path / "block.json", state, threads=1)
    calibrate(ref, nodes, calls, recipe, tmp_path / "whole.json", threads=1)
    assert _values(tmp_path / "block.json") == _values(tmp_path / "whole.json")
    assert not [p.name for p in state.directory.iterdir() if p.name.startswith("segment")]
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(progress.Progress.__init__, "__defaults__", (print, 0.0, True))  # a line per update
        quantize_model(prepared, tmp_path / "q.onnx", recipe, nodes, tmp_path / "block.json", log=lines.append,
                       label="q")
    assert _counts(lines, "q (layers)") == [(k, len(nodes)) for k in range(1, len(nodes))]  # FP8: per layer
    quantize_model(ref, tmp_path / "qref.onnx", recipe, nodes, tmp_path / "whole.json")
    outs = [ort.InferenceSession(str(tmp_path / q), providers=["CPUExecutionProvider"]).run(None, calls[0])
            for q in ("q.onnx", "qref.onnx")]
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
    int8 = recipe_for_backbone("sana", "int8")  # ONNX Runtime's quantizer reads the weights where they lie too
    calibrate(prepared, nodes, calls[:1], int8, tmp_path / "int8.json", threads=1)
    for by_block in (False, True):  # block by block: each segment's weights copied beside the result, then removed
        q8 = tmp_path / f"q8.{by_block}.onnx"
        quantize_model(prepared, q8, int8, nodes, tmp_path / "int8.json", by_block=by_block)
        assert ort.InferenceSession(str(q8), providers=["CPUExecutionProvider"]).run(None, calls[0])
    assert same_graph(tmp_path / "q8.True.onnx", tmp_path / "q8.False.onnx")
    assert not [p.name for p in tmp_path.iterdir() if ".block" in p.name]
    assert {p.name: p.stat().st_mtime_ns for p in lazy.parent.iterdir()} == before  # only read


def test_the_build_refuses_a_bad_block_recipe_or_a_foreign_state_in_one_line(tmp_path):
    from test_hostile import assert_one_line_error, cli

    recipe = dataclasses.replace(recipe_for_backbone("sana", "int8"), block_pattern=r"transformer\.blocks\.\d+")
    (tmp_path / "bad.json").write_text(json.dumps(recipe.to_json()))
    res = cli("metacanvas_deploy.mc_export", "build", "--backbone", "sana", "--precision", "int8", "--recipe",
              str(tmp_path / "bad.json"), "--out", str(tmp_path / "sana"))
    assert_one_line_error(res, "block_pattern", "names no block of the denoise stage")
    state = tmp_path / "sana.calib" / "denoise"
    bw.open_state(state, {"recipe": "old-recipe", "calibration_sha256": "0" * 64, "model": "m", "graph_sha256": "g"})
    res = cli("metacanvas_deploy.mc_export", "build", "--backbone", "sana", "--precision", "fp8", "--out",
              str(tmp_path / "sana"))
    assert_one_line_error(res, "calibration state of recipe old-recipe", "sana-fp8-e4m3", "remove it")
    assert not (tmp_path / "sana-fp32").exists()  # refused before the float build


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_blocks_calibrated_on_quantized_inputs_differ_only_downstream(stages, fmt, tmp_path):
    """``block_inputs`` "quantized" (GPTQ-style): each block calibrates on the outputs of the blocks before it
    quantized. Oracle: the float-input pass. Up to and including the first block with quantized layers the
    ranges are the same; after it they move (what the quantized model meets)."""
    prepared, nodes, calls, recipe = _prepared(stages, "sana", fmt, tmp_path)
    gptq = dataclasses.replace(recipe, block_inputs="quantized")
    raw = stages["sana"][0]
    bw.block_calibrate(prepared, nodes, calls, recipe, tmp_path / "float.json",
                       bw.open_state(tmp_path / "f", bw.identity(recipe, raw, "m")), threads=1)
    bw.block_calibrate(prepared, nodes, calls, gptq, tmp_path / "quantized.json",
                       bw.open_state(tmp_path / "q", bw.identity(gptq, raw, "m")), threads=1)
    model = onnx.load(str(prepared), load_external_data=False)
    segments = [s for s in partition(model.graph, recipe.block_pattern) if s.stop > s.start]
    p = bw.plan(model, segments, nodes)
    first = next(k for k in range(len(segments)) if p.layers[k])
    a, b = _values(tmp_path / "float.json"), _values(tmp_path / "quantized.json")
    assert a.keys() == b.keys()
    assert all(a[t] == b[t] for k in range(first + 1) for t in p.owned[k])
    later = [t for k in range(first + 1, len(segments)) for t in p.owned[k]]
    assert later and sum(a[t] != b[t] for t in later) >= len(later) // 2
