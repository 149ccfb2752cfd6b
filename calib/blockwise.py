"""Calibration block by block: the stage graph cut at its transformer blocks (`calib.partition`) and walked in
order, so that one block's weights and one block's activations are in memory at a time, and an interrupted
calibration resumes at its first unfinished block.

    prologue --boundary + side tensors--> block 1 --boundary--> block 2 ... block N --> epilogue

For each segment, over every captured call (every step, both CFG rows): the ranges of the quantizable tensors it
produces (`calib.ranges.collect_ranges`, the whole-graph pass's own collector, on the segment's own graph), the
sensitivity of its layers (`calib.sensitivity`, on the first calls, as the whole-graph fallback measures it),
then its outputs that later segments read, written to disk one call at a time (``spill/<segment>/<call>.npz``).
Each segment runs on the float outputs of the segments before it, so every tensor sees exactly the values it sees
in the whole graph, call by call in the same order: both passes run ONNX Runtime with the same options
(`calib.activations.session_options`: unoptimised), so no fusion or kernel choice differs between them. The minmax
(FP8 amax) ranges are equal bit for bit, and so are the histogram-based ones (percentile, entropy: each
tensor's histogram grows from the same calls in the same order); tests/test_calib_blockwise.py checks both.

Quantization follows the same cut (`calib.qdq.quantize_model` with ``by_block``): ONNX Runtime's quantizer runs on
one segment at a time over the ranges this pass writes, and the quantized segments are stitched back into one
graph, the same nodes and the same weights as the whole-graph quantizer's (tests/test_calib_blockwise.py).

The state (``state.json``: which segments are done, under an identity: recipe digest, the float model's stage
hash, the raw graph's hash) sits in a folder the caller keeps across runs (the build: ``<out>.calib/<stage>``);
a state of another model or recipe is refused, naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from metacanvas_deploy.calib.activations import session_options
from metacanvas_deploy.calib.errors import CalibrationStateError
from metacanvas_deploy.calib.partition import Segment, extract, partition
from metacanvas_deploy.calib.progress import Progress
from metacanvas_deploy.calib.ranges import collect_ranges, load_ranges, save_ranges
from metacanvas_deploy.calib.recipes import Recipe
from metacanvas_deploy.calib.sensitivity import sensitivity

STATE_FORMAT = 1
SENSITIVITY_CALLS = 2  # calls the fallback's noise figures are measured on (as the whole-graph fallback does)


# --- the state on disk ------------------------------------------------------------------------------------------
@dataclass
class BlockState:
    """A block pass's progress in ``directory``: its identity, the segments done, the captured feeds' index."""

    directory: Path
    identity: dict
    done: list[str] = field(default_factory=list)
    feeds: list | None = None  # `calib.capture.FeedStore.index()` of the captured calls under feeds/

    def save(self) -> None:
        tmp = self.directory / "state.json.tmp"
        tmp.write_text(json.dumps({"format": STATE_FORMAT, "identity": self.identity, "done": self.done,
                                   "feeds": self.feeds}, indent=1))
        os.replace(tmp, self.directory / "state.json")  # atomic: a kill leaves the old state or the new one


def identity(recipe: Recipe, raw: Path, model_id: str) -> dict:
    """What a state belongs to: the recipe's calibration (`Recipe.calibration_digest`: a recipe differing only in
    its budget, held-out set or fallback reuses the state; the name is kept to describe it), the float model's
    stage (``model_id``: the float bundle's engine hash) and the raw graph the stage was calibrated from (sha256 of
    the .onnx file)."""
    digest = hashlib.sha256(Path(raw).read_bytes()).hexdigest()
    return {"recipe": recipe.name, "calibration_sha256": recipe.calibration_digest(), "model": model_id,
            "graph_sha256": digest}


def _same(old: dict, new: dict) -> bool:
    return {k: v for k, v in old.items() if k != "recipe"} == {k: v for k, v in new.items() if k != "recipe"}


def _describe(ident: dict) -> str:
    # a state written before 836aad8 is keyed by the whole recipe (recipe_sha256): say so rather than print "None"
    key = (str(ident["calibration_sha256"])[:12] if "calibration_sha256" in ident
           else "an earlier state format, keyed by the whole recipe")
    return (f"recipe {ident.get('recipe')} ({key}), model {str(ident.get('model'))[:12]}, "
            f"graph {str(ident.get('graph_sha256'))[:12]}")


def open_state(directory: Path, ident: dict) -> BlockState:
    """The state under ``directory`` (created when absent). CalibrationStateError when it belongs to another
    model or recipe, or when the folder holds something else."""
    directory = Path(directory)
    path = directory / "state.json"
    if not path.exists():
        if directory.exists() and any(directory.iterdir()):
            raise CalibrationStateError(f"{directory} is not a calibration state (no state.json) and not empty; "
                                        "move it away or build to another --out")
        directory.mkdir(parents=True, exist_ok=True)
        state = BlockState(directory, ident)
        state.save()
        return state
    try:
        data = json.loads(path.read_text())
        old = data["identity"]
        fmt, done, feeds = data["format"], list(data["done"]), data.get("feeds")
    except (ValueError, KeyError, TypeError) as e:
        raise CalibrationStateError(f"{path} is not a calibration state ({e}); remove {directory} to calibrate "
                                    "afresh") from None
    if fmt != STATE_FORMAT or not _same(old, ident):
        raise CalibrationStateError(f"{directory} holds the calibration state of {_describe(old)}, not of this "
                                    f"calibration ({_describe(ident)}); remove it to calibrate afresh, or build to "
                                    "another --out")
    return BlockState(directory, ident, done, feeds)


def check_recipe(directory: Path, recipe: Recipe) -> None:
    """Before any work: CalibrationStateError when ``directory`` holds a state of another recipe (`open_state`
    checks the whole identity once the model and graph hashes are known)."""
    path = Path(directory) / "state.json"
    try:
        old = json.loads(path.read_text())["identity"] if path.exists() else None
    except (ValueError, KeyError, TypeError):
        old = {}
    if old is not None and old.get("calibration_sha256") != recipe.calibration_digest():
        raise CalibrationStateError(f"{directory} holds the calibration state of {_describe(old)}, not of recipe "
                                    f"{recipe.name} ({recipe.calibration_digest()[:12]}); remove it to calibrate "
                                    "afresh, or build to another --out")


def captured_feeds(state: BlockState, capture: Callable[[Path], Sequence[dict]]):
    """The calibration calls: captured once into the state (``capture(folder)`` returns a `FeedStore`), reopened
    when resuming."""
    from metacanvas_deploy.calib.capture import FeedStore

    folder = state.directory / "feeds"
    if state.feeds is not None:
        return FeedStore.reopen(folder, state.feeds)
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted capture: start it again
    store = capture(folder)
    state.feeds = store.index()
    state.save()
    return store


# --- one segment's calls ----------------------------------------------------------------------------------------
class SegmentFeeds(Sequence):
    """Call i's inputs of one segment: the stage's own inputs from the captured feeds, the rest from the spill of
    the segment that produced them. One call in memory at a time."""

    def __init__(self, feeds: Sequence[dict], spill: Path, sources: dict[str, tuple[int, int]], calls=None):
        self.feeds, self.spill, self.sources = feeds, spill, sources  # tensor -> (segment, position)
        self.calls = list(range(len(feeds))) if calls is None else calls

    def __len__(self) -> int:
        return len(self.calls)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return SegmentFeeds(self.feeds, self.spill, self.sources, self.calls[index])
        i = self.calls[index]
        out = dict(self.feeds[i])
        files: dict[int, object] = {}
        try:
            for name, (seg, pos) in self.sources.items():
                if seg not in files:
                    files[seg] = np.load(self.spill / f"{seg:03d}" / f"{i:05d}.npz", allow_pickle=False)
                out[name] = files[seg][f"arr_{pos}"]
        except FileNotFoundError as e:
            raise CalibrationStateError(f"{self.spill.parent}: the state records segments as done whose outputs are "
                                        f"gone ({e.filename}); remove it to calibrate afresh") from None
        finally:
            for f in files.values():
                f.close()
        return out


@dataclass(frozen=True)
class _Plan:
    segments: list[Segment]
    owned: list[list[str]]  # per segment: the tensors whose ranges it collects (it produces them)
    layers: list[list[str]]  # per segment: the quantizable layers (nodes) in it
    last_reader: list[int]  # per segment: the last segment that reads one of its outputs (itself if none)
    last_work: int  # the last segment with ranges or layers: nothing after it runs


def plan(model: onnx.ModelProto, segments: list[Segment], candidates: list[str]) -> _Plan:
    """Which segment collects which tensor's range (the one that produces it; a stage input, the first that reads
    it) and measures which layer; how long each segment's outputs must stay on disk."""
    nodes = model.graph.node
    seg_at = {i: k for k, s in enumerate(segments) for i in range(s.start, s.stop)}
    producer = {t: seg_at[i] for i, n in enumerate(nodes) for t in n.output if i in seg_at}
    wanted = set(candidates)
    owned: list[list[str]] = [[] for _ in segments]
    layers: list[list[str]] = [[] for _ in segments]
    seen: set[str] = set()
    for i, n in enumerate(nodes):
        if n.name in wanted and i in seg_at:
            k = seg_at[i]
            layers[k].append(n.name)
            for t in (n.input[0], n.output[0]):
                if t not in seen:
                    seen.add(t)
                    owned[producer.get(t, k)].append(t)
    last_reader = [max([k, *(j for j, s in enumerate(segments) if set(s.inputs) & set(segments[k].outputs))])
                   for k in range(len(segments))]
    work = [k for k in range(len(segments)) if owned[k] or layers[k]]
    return _Plan(segments, [sorted(o) for o in owned], layers, last_reader, max(work, default=-1))


# --- the pass ---------------------------------------------------------------------------------------------------
@dataclass
class _Pass:
    """What every segment's run shares."""

    prepared: Path
    model: onnx.ModelProto
    plan: _Plan
    feeds: Sequence[dict]
    recipe: Recipe
    state: BlockState
    threads: int | None
    budget: int | None
    measure_sensitivity: bool
    progress: Progress
    hook: Callable[[int, int | None], None] | None

    def sources(self, k: int) -> dict[str, tuple[int, int]]:
        segs = self.plan.segments
        stage_inputs = {i.name for i in self.model.graph.input}
        out = {}
        for t in segs[k].inputs:
            if t not in stage_inputs:
                j = next(j for j in range(k) if t in segs[j].outputs)
                out[t] = (j, segs[j].outputs.index(t))
        return out


def block_calibrate(prepared: Path, candidates: list[str], feeds: Sequence[dict], recipe: Recipe, cache: Path,
                    state: BlockState, threads: int | None = None, budget: int | None = None, log=None,
                    measure_sensitivity: bool = True, hook: Callable[[int, int | None], None] | None = None,
                    label: str = "calibration") -> dict[str, float]:
    """`calib.quantize.calibrate` block by block: the ranges of every candidate layer's input and output over
    ``feeds`` into ``cache`` (the same values), resuming from ``state``. ``log``: a progress line as each segment
    starts ("denoise: block 3/30 (transformer.blocks.2): 9% (...), 2 min in, about 20 min left") and between.
    Returns the layers' sensitivity (`calib.sensitivity.sensitivity` on the first `SENSITIVITY_CALLS` calls; empty
    without ``measure_sensitivity``). ``hook(segment, call)``: called after each call a segment hands on and after
    each segment (call None): a test's interruption point. ``budget``: activation bytes per chunk
    (`calib.activations`)."""
    model = onnx.load(str(prepared), load_external_data=False)
    segments = [s for s in partition(model.graph, recipe.block_pattern, f"{label} graph") if s.stop > s.start]
    p = plan(model, segments, candidates)
    blocks = [s.name for s in segments if s.name not in ("prologue", "epilogue")]
    todo = [k for k in range(p.last_work + 1) if segments[k].name not in state.done]
    progress = Progress(f"{label}: block pass", (p.last_work + 1) * len(feeds), log, unit_bytes=False)
    if log is not None:
        where = f"resuming at {segments[todo[0]].name}" if todo and state.done else f"{len(feeds)} calls"
        log(f"{label}: block pass over {len(blocks)} blocks (+ prologue, epilogue), {where}")
    run = _Pass(Path(prepared), model, p, feeds, recipe, state, threads, budget, measure_sensitivity, progress, hook)
    for k in range(p.last_work + 1):
        if k not in todo:
            progress.update(len(feeds))
            continue
        name = segments[k].name
        progress.label = f"{label}: " + (f"block {blocks.index(name) + 1}/{len(blocks)} ({name})" if name in blocks
                                         else name)
        if log is not None:  # a line as each segment starts (one block can take minutes at full size)
            log(progress.line())
        _segment(run, k)
    progress.close()
    shutil.rmtree(state.directory / "spill", ignore_errors=True)  # read by segments past the last one with work
    data, scores = {}, {}
    for k in range(p.last_work + 1):
        if p.owned[k]:
            data.update(load_ranges(_ranges_file(state, k)))
        scores.update(json.loads(_scores_file(state, k).read_text()))
    save_ranges(dict(sorted(data.items())), recipe, cache)
    return scores


def _ranges_file(state: BlockState, k: int) -> Path:
    return state.directory / "ranges" / f"{k:03d}.json"


def _scores_file(state: BlockState, k: int) -> Path:
    return state.directory / "sensitivity" / f"{k:03d}.json"


def _segment(run: _Pass, k: int) -> None:
    """Segment k: its ranges, its layers' sensitivity, its outputs for the segments after it; then recorded done
    and the spills nobody reads any more removed."""
    p, state = run.plan, run.state
    seg = p.segments[k]
    path = state.directory / f"segment{k:03d}.onnx"  # with a copy of its weights: the prepared graph's folder
    extract(run.model, seg, path, run.prepared.parent)  # (a float bundle's) is only read
    try:
        calls = SegmentFeeds(run.feeds, state.directory / "spill", run.sources(k))
        for folder in ("ranges", "sensitivity"):
            (state.directory / folder).mkdir(exist_ok=True)
        if p.owned[k]:
            save_ranges(collect_ranges(path, p.owned[k], calls, run.recipe, run.threads, run.budget), run.recipe,
                        _ranges_file(state, k))
        scores = {}
        if run.measure_sensitivity and p.layers[k]:
            scores = _sensitivity(run, k, path, calls)
        _scores_file(state, k).write_text(json.dumps(scores))
        if k < p.last_work and seg.outputs:
            _hand_on(run, k, path, calls)
        else:
            run.progress.update(len(calls))
    finally:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".data").unlink(missing_ok=True)
    state.done.append(seg.name)
    state.save()
    for j in range(k + 1):
        if p.last_reader[j] <= k:
            shutil.rmtree(state.directory / "spill" / f"{j:03d}", ignore_errors=True)
    if run.hook is not None:
        run.hook(k, None)


def _sensitivity(run: _Pass, k: int, path: Path, calls: SegmentFeeds) -> dict[str, float]:
    """Segment k's layers' noise figures, with the ranges of their inputs (collected here or before)."""
    by_name = {n.name: n for n in run.model.graph.node}
    needed = {by_name[n].input[0] for n in run.plan.layers[k]}
    ranges: dict = {}
    for j in range(k + 1):
        if run.plan.owned[j] and needed & set(run.plan.owned[j]):
            ranges.update({t: v for t, v in load_ranges(_ranges_file(run.state, j)).items() if t in needed})
    cache = run.state.directory / "sensitivity" / f"{k:03d}.ranges.json"
    save_ranges(ranges, run.recipe, cache)
    try:
        return sensitivity(path, cache, run.plan.layers[k], calls[:SENSITIVITY_CALLS], run.recipe, run.threads,
                           run.budget)
    finally:
        cache.unlink(missing_ok=True)


def _quantized(run: _Pass, k: int, path: Path) -> Path:
    """Segment k with its layers quantized (`calib.qdq.quantize_model`) on the ranges collected so far, written
    beside it: what the next segments calibrate on with ``block_inputs`` "quantized"."""
    from metacanvas_deploy.calib.qdq import quantize_model
    from metacanvas_deploy.calib.quiet import quiet_quantizer

    ranges: dict = {}
    for j in range(k + 1):
        if run.plan.owned[j]:
            ranges.update(load_ranges(_ranges_file(run.state, j)))
    cache, out = path.with_suffix(".ranges.json"), path.with_suffix(".qdq.onnx")
    save_ranges(ranges, run.recipe, cache)
    try:
        with quiet_quantizer():
            quantize_model(path, out, run.recipe, run.plan.layers[k], cache)
    finally:
        cache.unlink(missing_ok=True)
    return out


def _hand_on(run: _Pass, k: int, path: Path, calls: SegmentFeeds) -> None:
    """Run segment k's graph over every call and write the outputs later segments read, one call at a time, in a
    session with the Exposer's options (`calib.activations.session_options`): the float graph, or with
    ``block_inputs`` "quantized" the segment quantized (GPTQ-style)."""
    import onnxruntime as ort

    seg = run.plan.segments[k]
    folder = run.state.directory / "spill" / f"{k:03d}"
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted run of this segment left
    folder.mkdir(parents=True)
    if run.recipe.block_inputs == "quantized" and run.plan.layers[k]:
        path = _quantized(run, k, path)
    try:
        sess = ort.InferenceSession(str(path), session_options(run.threads), providers=["CPUExecutionProvider"])
    finally:
        if path.name.endswith(".qdq.onnx"):  # the session holds what it needs
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".data").unlink(missing_ok=True)
    names = [i.name for i in sess.get_inputs()]
    for i in range(len(calls)):
        feeds = calls[i]
        outs = sess.run(list(seg.outputs), {n: feeds[n] for n in names})
        del feeds
        tmp = folder / f"{i:05d}.tmp.npz"
        np.savez(tmp, *outs)
        os.replace(tmp, folder / f"{i:05d}.npz")
        del outs
        run.progress.update(1)
        if run.hook is not None:
            run.hook(k, i)
