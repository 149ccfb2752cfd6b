"""Weight-only quantization of one stage against its float bundle (`--precision w8|w4`, or a stage's w8/w4 in a
per-stage recipe): round-to-nearest blocks (`calib.weight_only`), gated on the held-out calibration split as
int8/fp8 are (`calib.quantize`), with a data-free sensitivity fallback.

    raw float ONNX --rewrite (MatMulNBits / blocked DequantizeLinear)--> candidate --ORT offline optimisation--> CPU
    gates: worst cosine of every stage output on held-out feeds (the denoise step: its update), mean PSNR of
           decoded frames against the float bundle, end to end
    fallback: the layers whose quantization costs their output most (activation-aware: the weight error weighted
              by the mean square of each input channel on calibration calls) move one level up per round:
              4 -> 8 bits -> float

No calibration data is needed to quantize round to nearest; two calibration requests rank the layers for the
fallback and, with ``weight_method: awq``, give the activation statistics AWQ's scales are searched on; the
held-out ones gate. Memory: the rewrite
reads one weight at a time from the raw export's mapped data (`calib.weight_only_graph`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from metacanvas_deploy.calib import capture as cap
from metacanvas_deploy.calib import weight_only as wo
from metacanvas_deploy.calib import weight_only_graph as wg
from metacanvas_deploy.calib.errors import AccuracyBudgetError, RecipeError
from metacanvas_deploy.calib.graph import op_counts, optimize_for_ort
from metacanvas_deploy.calib.quantize import QuantizedStage, StageMetrics, ort_version, psnr, update_cosine
from metacanvas_deploy.calib.recipes import WEIGHT_ONLY, Recipe
from metacanvas_deploy.runtime.memory import rss_phase

WEIGHT_ONLY_OPS = ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear")


def stage_spec(recipe: Recipe, stage: str) -> wo.BlockSpec:
    """The BlockSpec ``recipe`` gives ``stage`` (RecipeError unless that stage is weight-only)."""
    fmt = recipe.format_of(stage)
    if fmt not in WEIGHT_ONLY:
        raise RecipeError(f"recipe {recipe.name}: stage {stage} is {fmt}, not weight-only ({', '.join(WEIGHT_ONLY)})")
    return wo.BlockSpec(wo.WEIGHT_ONLY_BITS[fmt], recipe.block_size, recipe.symmetric)


def plan_layers(recipe: Recipe, stage: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Weight name -> bits for the layers ``recipe`` quantizes in ``stage`` (``shapes``: weight name -> (K, N) of
    every weight MatMul). RecipeError before any work for a block size that does not divide a quantized layer's K,
    or a stage left with nothing to quantize."""
    spec = stage_spec(recipe, stage)
    layers = {n: spec.bits for n in shapes if not recipe.keeps_float(n, stage)}
    for name in layers:
        wo.check_divisible(name, int(shapes[name][0]), spec.block_size)
    if not layers:
        raise RecipeError(f"recipe {recipe.name}: stage {stage} has nothing to quantize weight-only: its "
                          f"{len(shapes)} weight MatMuls are all kept float by the recipe (keep_float, "
                          "stage_keep_float); drop the stage from the recipe or keep fewer layers float")
    return layers


def chooser(layers: dict[str, int], recipe: Recipe):
    """weight name -> BlockSpec (None: float) for `calib.weight_only_graph.rewrite`."""
    def choose(name: str) -> wo.BlockSpec | None:
        bits = layers.get(name)
        return None if bits is None else wo.BlockSpec(bits, recipe.block_size, recipe.symmetric)
    return choose


def embedding_spec(recipe: Recipe, stage: str, form: str) -> wo.BlockSpec | None:
    """Embedding tables in the recipe's ``embedding_bits`` (ONNX Runtime's form only; TensorRT gathers float
    tables)."""
    if recipe.embedding_bits is None or form != "matmulnbits":
        return None
    stage_spec(recipe, stage)  # a weight-only stage
    return wo.BlockSpec(recipe.embedding_bits, recipe.block_size, recipe.symmetric)


def sensitivity(raw: Path, layers: dict[str, int], recipe: Recipe, feeds: Sequence[dict] = (),
                scales: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Per layer: the output error its weight's quantization causes relative to its output, activation-aware:
    sum_k E[x_k^2] |dW_k|^2 / sum_k E[x_k^2] |W_k|^2 over input channels k, with E[x_k^2] measured on ``feeds``
    (`calib.activations` fetches the layer inputs in chunks) and dW that of the layer's AWQ scale where
    ``scales`` has one (`calib.weight_only.weighted_error`). A layer reading outlier channels ranks high even when
    its weights quantize as well as any other's (random weights all do). Without feeds: the weight's own
    noise-to-signal ratio. Weights are read one at a time from ``raw``'s mapped data."""
    out = {}
    for name, w, power in _layer_weights(raw, layers, feeds):
        spec = wo.BlockSpec(layers[name], recipe.block_size, recipe.symmetric)
        out[name] = wo.weight_error(w, spec) if power is None else wo.weighted_error(
            w, power, spec, (scales or {}).get(name))
    return out


def awq_scales(raw: Path, layers: dict[str, int], recipe: Recipe, feeds: Sequence[dict],
               searched: dict | None = None) -> dict[str, tuple[np.ndarray, float]]:
    """Layer name -> (AWQ input-channel scale, its alpha) at the layer's bits (`calib.weight_only.awq_scale`),
    E[x_k^2] from ``feeds``. ``searched``: (name, bits) -> result, kept across fallback rounds so that only the
    layers that moved are searched again."""
    searched = {} if searched is None else searched
    todo = {n: b for n, b in layers.items() if (n, b) not in searched}
    for name, w, power in _layer_weights(raw, todo, feeds) if todo else ():
        if power is not None:
            spec = wo.BlockSpec(layers[name], recipe.block_size, recipe.symmetric)
            searched[(name, layers[name])] = wo.awq_scale(w, power, spec)[:2]
    return {n: searched[(n, b)] for n, b in layers.items() if (n, b) in searched}


def _layer_weights(raw: Path, layers: dict[str, int], feeds: Sequence[dict]):
    """(layer name, its weight (K, N), E[x_k^2] of its input over ``feeds`` or None) for each of ``layers`` in
    ``raw``, one weight read at a time."""
    import onnx_ir as ir

    model = ir.load(str(raw))
    wg.fold_transposes(model.graph)
    nodes = {wg.layer_name(n, n.inputs[1]): n for n in wg.weight_nodes(model.graph)[0]}
    nodes = {name: n for name, n in nodes.items() if name in layers}
    power = _input_power(raw, {name: n.inputs[0].name for name, n in nodes.items()}, feeds) if feeds else {}
    for name, node in nodes.items():
        yield name, node.inputs[1].const_value.numpy(), power.get(name)


def _input_power(raw: Path, inputs: dict[str, str], feeds: Sequence[dict]) -> dict[str, np.ndarray]:
    """Layer name -> mean square of each input channel (last axis) of its input activation over ``feeds``."""
    from metacanvas_deploy.calib.activations import Exposer

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for tensor, value in Exposer(raw, sorted(set(inputs.values())))(feeds):
        v = value.reshape(-1, value.shape[-1]).astype(np.float64)
        sums[tensor] = sums.get(tensor, 0.0) + np.sum(np.square(v), axis=0)
        counts[tensor] = counts.get(tensor, 0) + v.shape[0]
    return {name: sums[t] / max(counts[t], 1) for name, t in inputs.items() if t in sums}


def stage_worst(feeds: Sequence[dict], ours, theirs) -> tuple[float, float]:
    """Worst (cosine, max-rel) over every output of two engines on ``feeds`` (the step's update for a denoise
    step's ``next_sample``, whose sample would otherwise hide the DiT's error)."""
    cos, rel = 1.0, 0.0
    for f in feeds:
        a, b = ours(f), theirs(f)
        for name in b:
            if name == "next_sample" and "sample" in f:
                c, r = update_cosine(f, a[name], b[name])
            else:
                x, y = a[name].astype(np.float64).ravel(), b[name].astype(np.float64).ravel()
                d = np.linalg.norm(x) * np.linalg.norm(y)
                c = float(x @ y / d) if d > 0 else float(np.array_equal(x, y))
                r = float(np.max(np.abs(x - y)) / max(1e-12, float(np.max(np.abs(y))))) if y.size else 0.0
            cos, rel = min(cos, c), max(rel, r)
    return cos, rel


def evaluate(pipe, stage: str, candidate: Path, held_feeds, held_reqs, float_frames, steps: int,
             threads: int | None) -> StageMetrics:
    """``candidate`` against the float bundle's ``stage``: every output on held-out feeds, then end to end."""
    from metacanvas_deploy.runtime.engine import load_engine

    float_engine = pipe.engines[stage]
    entry = dataclasses.replace(float_engine.entry, backend="onnxruntime", backend_version=ort_version())
    quant = load_engine(candidate, entry, threads, on_demand=pipe.low_memory, mapped=pipe.mapped)
    cos, rel = stage_worst(held_feeds, quant, float_engine)
    if pipe.low_memory:
        float_engine.release()
        quant.release()
    values = [psnr(cap.run(pipe, req, steps, engines={stage: quant}).frames, ref)
              for req, ref in zip(held_reqs, float_frames)]
    return StageMetrics(values, cos, rel)


def bit_counts(layers: dict[str, int]) -> dict[str, int]:
    """A fallback round's record: how many layers are in 4 and in 8 bits."""
    return {"layers_4bit": sum(b == 4 for b in layers.values()), "layers_8bit": sum(b == 8 for b in layers.values())}


def raise_level(layers: dict[str, int], scores: dict[str, float], fraction: float) -> list[str]:
    """Move the most sensitive ``fraction`` of the layers at the lowest precision one level up (4 -> 8 bits,
    8 bits -> float: removed). Returns what moved, as 'name -> w8' / 'name -> float'."""
    low = min(layers.values())
    pool = sorted((n for n, b in layers.items() if b == low), key=lambda n: -scores.get(n, 0.0))
    moved = []
    for name in pool[: max(1, math.ceil(fraction * len(pool)))]:
        if low == 4:
            layers[name] = 8
            moved.append(f"{name} -> w8")
        else:
            del layers[name]
            moved.append(f"{name} -> float")
    return moved


class _Peaks(dict):
    """Phase -> peak resident MiB (the memory held when it began included), as `calib.quantize` records them."""

    @contextlib.contextmanager
    def phase(self, name: str):
        with rss_phase() as record:
            yield
        self[name] = round(max(self.get(name, 0.0), record["peak_mb"]), 1)


@dataclass
class _HeldOut:
    """The float pipeline and what the gate compares against: held-out requests, one request's stage calls, the
    float frames."""

    pipe: object
    reqs: list
    feeds: Sequence[dict]
    frames: list
    steps: int


def _held_out(float_bundle: Path, recipe: Recipe, stage: str, workdir: Path, threads, low_memory: bool) -> _HeldOut:
    from metacanvas_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.load(float_bundle, threads=threads, low_memory=low_memory)
    reqs = cap.requests(tuple(pipe.manifest.tasks), recipe.held_out_prompts, recipe.held_out_seeds, "held_out")
    steps = recipe.evaluation_steps
    feeds = cap.capture(pipe, stage, reqs[:1], steps, workdir / f"{stage}.held")
    return _HeldOut(pipe, reqs, feeds, [cap.run(pipe, req, steps).frames for req in reqs], steps)


def _calibration_feeds(held: _HeldOut, stage: str, workdir: Path) -> Sequence[dict]:
    """The stage's calls on two calibration requests (never the gate's own): what ranks the fallback's layers and
    what AWQ's scales are searched on."""
    calib_reqs = cap.requests(tuple(held.pipe.manifest.tasks), 2, (0,), "calibration")
    return cap.capture(held.pipe, stage, calib_reqs, min(held.steps, 2), workdir / f"{stage}.calib")


def quantize_weight_only_stage(float_bundle: Path, raw: Path, recipe: Recipe, stage: str, workdir: Path,
                               threads: int | None = None, log=print, low_memory: bool = False,
                               form: str = "matmulnbits") -> QuantizedStage:
    """Weight-only ``stage`` from its raw float export, gated against ``float_bundle``; the fallback raises the
    most sensitive layers' precision until the budget holds. ``form``: "matmulnbits" (ONNX Runtime) or
    "dequantize" (TensorRT; gated here on ONNX Runtime's CPU kernels). Raises AccuracyBudgetError with the numbers
    when even the last round misses."""
    workdir, peaks = Path(workdir), _Peaks()
    shapes = wg.candidates(raw)
    layers = plan_layers(recipe, stage, shapes)
    kept = sorted(n for n in shapes if n not in layers)
    with peaks.phase("capture"):
        held = _held_out(float_bundle, recipe, stage, workdir, threads, low_memory)
    fallback: list[str] = []
    rounds: list[dict] = []
    scores, feeds, searched, scales = None, None, {}, None
    fmt = recipe.format_of(stage)
    for round_ in range(recipe.max_fallback_rounds + 1):
        folder = workdir / f"{stage}.wo{round_}"
        folder.mkdir(exist_ok=True)
        candidate, cpu = folder / f"{stage}.{form}.onnx", folder / f"{stage}.onnx"
        if recipe.method_of(stage) == "awq":
            with peaks.phase("awq"):
                feeds = _calibration_feeds(held, stage, workdir) if feeds is None else feeds
                found = awq_scales(raw, layers, recipe, feeds, searched)
                scales = {n: scale for n, (scale, _) in found.items()}
        with peaks.phase("quantize"):
            done = wg.rewrite_file(raw, candidate, chooser(layers, recipe), form, embedding_spec(recipe, stage, form),
                                   scales)
            optimize_for_ort(candidate, cpu)
        with peaks.phase("evaluate"):
            metrics = evaluate(held.pipe, stage, cpu, held.feeds, held.reqs, held.frames, held.steps, threads)
        counts = bit_counts(layers)
        if scales is not None:  # how far the search moved from round to nearest (alpha 0)
            counts["awq_mean_alpha"] = round(float(np.mean([a for _, a in found.values()] or [0.0])), 3)
        rounds.append({**counts, **metrics.to_json()})
        log(f"  round {round_}: {counts['layers_4bit']} layers in 4 bits, {counts['layers_8bit']} in 8 bits ({fmt}): "
            f"{metrics.shortfall(recipe)}")
        if metrics.passes(recipe):
            ops = op_counts(onnx.load(str(cpu), load_external_data=False))
            return QuantizedStage(candidate, cpu, sorted(done.layers), kept, fallback, metrics, rounds,
                                  {op: ops[op] for op in WEIGHT_ONLY_OPS if ops[op]}, dict(peaks))
        if not layers or round_ == recipe.max_fallback_rounds:
            break
        if scores is None:
            with peaks.phase("sensitivity"):
                feeds = _calibration_feeds(held, stage, workdir) if feeds is None else feeds
                scores = sensitivity(raw, layers, recipe, feeds, scales)
        fallback += raise_level(layers, scores, recipe.fallback_fraction)
    raise AccuracyBudgetError(f"{stage}: {recipe.name} ({fmt}) misses its accuracy budget after {len(rounds)} rounds "
                              f"({len(fallback)} layer moves up): {metrics.shortfall(recipe)}. Relax the budget in "
                              "a recipe file (--recipe), raise max_fallback_rounds, use w8, or build fp32")
