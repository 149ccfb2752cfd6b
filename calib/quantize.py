"""Calibrate, quantize and gate one stage; move the most sensitive layers back to float until the recipe's
budget holds (or fail with the measured numbers).

    float bundle --capture--> calibration feeds (every step, both CFG rows) and held-out requests
    raw float ONNX --fold transposes [--SmoothQuant]--> prepared --ORT calibrator--> activation ranges (cached)
    prepared + ranges + layers --ORT QDQ quantizer (block by block)--> QDQ ONNX (TensorRT's explicit quantization
                                                                          takes it)
    QDQ --ORT offline optimisation--> the CPU model (integer kernels: MatMulInteger / QLinearConv ...)
    gates: per-stage cosine of the step's update on held-out feeds; mean PSNR of decoded frames vs float

Memory: one stage at a time. Capture runs the float bundle's engines and writes each call's feeds to disk
(`calib.capture.FeedStore`). Calibration, sensitivity and SmoothQuant read the calls one at a time, once per
chunk of activations (`calib.activations`: at most a quarter of the available memory per chunk). Evaluation
holds the float and the quantized copies of the quantized stage only. A block recipe quantizes one block at a
time too (`calib.qdq`), so INT8 never holds the stage's float weights whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from metacanvas_deploy.calib import capture as cap
from metacanvas_deploy.calib.activations import Exposer
from metacanvas_deploy.calib.errors import AccuracyBudgetError
from metacanvas_deploy.calib.graph import (
    fold_weight_transposes,
    has_weight_transposes,
    integer_kernels,
    optimize_for_ort,
    save_model,
    smooth,
    weight_layers,
)
from metacanvas_deploy.calib.progress import Progress
from metacanvas_deploy.calib.qdq import quantize_model
from metacanvas_deploy.calib.quiet import quiet_quantizer
from metacanvas_deploy.calib.ranges import collect_ranges, save_ranges
from metacanvas_deploy.calib.recipes import Recipe
from metacanvas_deploy.calib.sensitivity import sensitivity
from metacanvas_deploy.runtime.memory import rss_phase


@dataclass
class StageMetrics:
    """Accuracy of one quantized candidate against the float bundle."""

    psnr_db: list[float]  # per held-out request, decoded frames (uint8, peak 255)
    stage_cosine: float  # worst cosine over held-out calls of the step's update (next_sample - sample)
    stage_max_rel: float

    @property
    def mean_psnr_db(self) -> float:
        return float(np.mean(self.psnr_db))

    def passes(self, recipe: Recipe) -> bool:
        b = recipe.budget
        return self.mean_psnr_db >= b.min_psnr_db and self.stage_cosine >= b.min_stage_cosine

    def shortfall(self, recipe: Recipe) -> str:
        """The numbers against the budget, and by how much each one misses."""
        b = recipe.budget
        short = []
        if self.mean_psnr_db < b.min_psnr_db:
            short.append(f"PSNR short by {b.min_psnr_db - self.mean_psnr_db:.2f} dB")
        if self.stage_cosine < b.min_stage_cosine:
            short.append(f"cosine short by {b.min_stage_cosine - self.stage_cosine:.6f}")
        return (f"mean PSNR {self.mean_psnr_db:.2f} dB (budget {b.min_psnr_db} dB, min over requests "
                f"{min(self.psnr_db):.2f} dB), stage cosine {self.stage_cosine:.6f} (budget {b.min_stage_cosine})"
                + (f": {', '.join(short)}" if short else ""))

    def to_json(self) -> dict:
        return {"mean_psnr_db": self.mean_psnr_db, "min_psnr_db": float(min(self.psnr_db)),
                "stage_cosine": self.stage_cosine, "stage_max_rel": self.stage_max_rel}


@dataclass
class QuantizedStage:
    qdq_path: Path  # explicit-quantization QDQ graph (TensorRT)
    cpu_path: Path  # ORT-optimised (integer kernels), what an onnxruntime bundle ships
    quantized: list[str]  # weight names (module paths) running in 8 bits
    kept_float: list[str]  # by the recipe
    fallback: list[str]  # moved back to float by the sensitivity loop, in order
    metrics: StageMetrics
    rounds: list[dict] = field(default_factory=list)
    integer_kernels: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # per phase: capture, calibrate, quantize, ...

    def manifest_record(self, recipe: Recipe) -> dict:
        return {"recipe": recipe.to_json(), "recipe_sha256": recipe.digest(),
                "quantized_layers": len(self.quantized),
                "kept_float": self.kept_float, "fallback": self.fallback, "metrics": self.metrics.to_json(),
                "rounds": self.rounds, "integer_kernels": self.integer_kernels, "peak_rss_mb": self.peak_rss_mb}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images/videos; identical frames give +inf."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def update_cosine(feeds: dict, ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Cosine and max-rel of the step's update (next_sample - sample): the sample itself would dominate a
    plain comparison of next_sample and hide the DiT's error."""
    x = feeds["sample"].astype(np.float64).ravel()
    a, b = ours.astype(np.float64).ravel() - x, ref.astype(np.float64).ravel() - x
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
    return cos, float(np.max(np.abs(a - b)) / max(1e-12, float(np.max(np.abs(b)))))


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --- calibration and ONNX Runtime's quantizer --------------------------------------------------------------------
def calibrate(prepared: Path, nodes: list[str], feeds: Sequence[dict], recipe: Recipe, cache: Path,
              threads: int | None = None, budget: int | None = None) -> None:
    """Activation ranges of every quantizable layer's input and output over ``feeds``, written to ``cache`` in
    ONNX Runtime's calibration-cache format (the quantizer then reads them instead of calibrating): the whole
    graph in one pass (`calib.ranges.collect_ranges`; `calib.blockwise` is the block-by-block pass)."""
    by_name = {n.name: n for n in onnx.load(str(prepared), load_external_data=False).graph.node}
    tensors = sorted({t for n in nodes for t in (by_name[n].input[0], by_name[n].output[0])})
    save_ranges(collect_ranges(prepared, tensors, feeds, recipe, threads, budget), recipe, cache)


def _activation_absmax(prepared: Path, nodes: list[str], feeds: Sequence[dict], budget: int | None = None
                       ) -> dict[str, np.ndarray]:
    """Per input channel (last axis) max |X| of each MatMul layer over ``feeds`` (SmoothQuant's statistic)."""
    by_name = {n.name: n for n in onnx.load(str(prepared), load_external_data=False).graph.node}
    mm = [n for n in nodes if by_name[n].op_type == "MatMul"]
    expose = Exposer(prepared, sorted({by_name[n].input[0] for n in mm}), budget)
    amax: dict[str, np.ndarray] = {}
    for a, v in expose(feeds):
        m = np.abs(v).reshape(-1, v.shape[-1]).max(axis=0)
        amax[a] = m if a not in amax else np.maximum(amax[a], m)
    return {n: amax[by_name[n].input[0]] for n in mm}


# --- the loop ---------------------------------------------------------------------------------------------------
def prepare(raw: Path, out: Path, recipe: Recipe, feeds: Sequence[dict]) -> tuple[Path, dict[str, str], list[str]]:
    """Fold weight transposes (and apply SmoothQuant) into ``out``. Returns (the prepared graph, layer node ->
    weight name, the candidate nodes: weight layers the recipe does not keep in float).

    A raw export whose weights live in external data with nothing to fold (lazy exports write ``W.T``) and no
    SmoothQuant needs no preparing: the prepared graph is ``raw`` itself, nothing is written (a full-size stage's
    tens of GB are neither loaded nor copied; what reads it block by block copies one block's weights at a time,
    `calib.partition.extract`), and ``raw``'s folder, a float bundle's, is only read."""
    graph = onnx.load(str(raw), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    if external and recipe.smoothquant_alpha is None and not has_weight_transposes(graph):
        layers = weight_layers(graph)
        return Path(raw), layers, [n for n, w in layers.items() if not recipe.keeps_float(w)]
    del graph
    model = fold_weight_transposes(onnx.load(str(raw)))
    layers = weight_layers(model)
    candidates = [n for n, w in layers.items() if not recipe.keeps_float(w)]
    save_model(model, out)
    del model
    if recipe.smoothquant_alpha is not None:
        stats = _activation_absmax(out, candidates, feeds[: max(1, len(feeds) // 4)])
        model = onnx.load(str(out))
        smooth(model, stats, recipe.smoothquant_alpha)
        save_model(model, out)
    return Path(out), layers, candidates


def evaluate(pipe, stage: str, candidate, held_feeds: Sequence[dict], held_reqs, float_frames, steps: int,
             threads: int | None, log=None) -> StageMetrics:
    """Measure ``candidate`` (an ORT model path) against the bundle's ``stage`` engine: per call on the held-out
    feeds, then end to end with the candidate substituted for ``stage`` in each request (`Pipeline.__call__`'s
    ``engines=``; the pipeline itself is left as it was)."""
    from metacanvas_deploy.runtime.engine import load_engine

    float_engine = pipe.engines[stage]
    entry = dataclasses.replace(float_engine.entry, backend="onnxruntime", backend_version=ort_version())
    quant = load_engine(candidate, entry, threads, on_demand=pipe.low_memory, mapped=pipe.mapped)
    cos, rel = 1.0, 0.0
    for f in held_feeds:
        c, r = update_cosine(f, quant(f)["next_sample"], float_engine(f)["next_sample"])
        cos, rel = min(cos, c), max(rel, r)
    if pipe.low_memory:  # one stage resident at a time: the requests below open what they use
        float_engine.release()
        quant.release()
    progress = Progress(f"{stage}: evaluate (held-out requests)", len(held_reqs), log, unit_bytes=False)
    values = []
    for req, ref in zip(held_reqs, float_frames):
        values.append(psnr(cap.run(pipe, req, steps, engines={stage: quant}).frames, ref))
        progress.update(1)
    progress.close()
    return StageMetrics(values, cos, rel)


def _capture(pipe, stage: str, recipe: Recipe, raw: Path, workdir: Path, state_dir: Path | None, log):
    """The calibration calls (in the block pass's state when the recipe walks blocks: a foreign state is refused
    here, before any work), the held-out requests and the first one's calls. Returns (state or None, calls,
    held-out requests, held-out calls)."""
    from metacanvas_deploy.calib import blockwise

    tasks = tuple(pipe.manifest.tasks)
    cap.check_calibration_set(recipe, tasks)
    calib_reqs = cap.requests(tasks, recipe.calibration_prompts, (0,), "calibration")
    held_reqs = cap.requests(tasks, recipe.held_out_prompts, recipe.held_out_seeds, "held_out")
    log(f"  calibration: {len(calib_reqs)} requests x {recipe.calibration_steps} steps ({', '.join(tasks)})")
    state = None
    if recipe.calibration_pass == "block":
        state = blockwise.open_state(state_dir or workdir / f"{stage}.calib",
                                     blockwise.identity(recipe, raw, pipe.manifest.engines[stage].sha256))

    def calls(folder: Path):
        return cap.capture(pipe, stage, calib_reqs, recipe.calibration_steps, folder, log)

    feeds = blockwise.captured_feeds(state, calls) if state else calls(workdir / f"{stage}.feeds")
    held_feeds = cap.capture(pipe, stage, held_reqs[:1], recipe.calibration_steps, workdir / f"{stage}.held")
    return state, feeds, held_reqs, held_feeds


def _calibrate(prepared: Path, candidates: list[str], feeds, recipe: Recipe, ranges: Path, state, threads, log, hook,
               stage: str) -> dict[str, float] | None:
    """The ranges into ``ranges``: block by block with a block-pass ``state`` (then the fallback's noise figures
    come from the same pass and are returned), else in one pass over the whole graph (None: measured on demand)."""
    from metacanvas_deploy.calib import blockwise

    if state is None:
        calibrate(prepared, candidates, feeds, recipe, ranges, threads)
        return None
    return blockwise.block_calibrate(prepared, candidates, feeds, recipe, ranges, state, threads, log=log,
                                     measure_sensitivity=recipe.max_fallback_rounds > 0, hook=hook, label=stage)


def quantize_stage(float_bundle: Path, raw: Path, recipe: Recipe, stage: str, workdir: Path,
                   threads: int | None = None, log=print, low_memory: bool = False, state_dir: Path | None = None,
                   hook=None) -> QuantizedStage:
    """The whole recipe for one stage: capture, calibrate, quantize, gate, fall back. Raises AccuracyBudgetError with the
    measured numbers when the budget cannot be met with every layer moved back. ``low_memory``: the float
    pipeline holds one stage's engine at a time (models larger than memory). A recipe with ``calibration_pass``
    "block" calibrates block by block (`calib.blockwise`), resumable from ``state_dir`` (default: in ``workdir``);
    ``hook``: `calib.blockwise.block_calibrate`'s."""
    from metacanvas_deploy.runtime.pipeline import Pipeline

    workdir = Path(workdir)
    # phase -> peak resident MiB, the memory held when it began included. Each phase resets the kernel's
    # high-water mark, so the process's ru_maxrss (/usr/bin/time) then shows only the last phase's peak.
    peaks: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str):
        with rss_phase() as record:
            yield
        peaks[name] = round(max(peaks.get(name, 0.0), record["peak_mb"]), 1)

    with phase("capture"):
        pipe = Pipeline.load(float_bundle, threads=threads, low_memory=low_memory)
        state, feeds, held_reqs, held_feeds = _capture(pipe, stage, recipe, raw, workdir, state_dir, log)
        steps = recipe.evaluation_steps
        float_frames = [cap.run(pipe, req, steps).frames for req in held_reqs]

    ranges = workdir / f"{stage}.ranges.json"
    with phase("calibrate"):
        prepared, layers, candidates = prepare(raw, workdir / f"{stage}.prepared.onnx", recipe, feeds)
        scores = _calibrate(prepared, candidates, feeds, recipe, ranges, state, threads, log, hook, stage)
    log(f"  peak RSS: capture {peaks['capture'] / 1024:.1f} GiB, calibration {peaks['calibrate'] / 1024:.1f} GiB")
    fallback: list[str] = []
    rounds: list[dict] = []
    by_block = recipe.calibration_pass == "block"  # INT8's quantizer on one block at a time too
    progress = Progress(f"{stage}: quantize and evaluate (rounds, at most)", recipe.max_fallback_rounds + 1, None,
                        unit_bytes=False)
    for round_ in range(recipe.max_fallback_rounds + 1):
        nodes = [n for n in candidates if n not in fallback]
        (workdir / f"round{round_}").mkdir(exist_ok=True)  # cpu: the name the bundle gives it, data included
        qdq, cpu = workdir / f"round{round_}" / f"{stage}.qdq.onnx", workdir / f"round{round_}" / f"{stage}.onnx"
        log(f"  quantizing {len(nodes)} layers (round {round_}), then evaluating on {len(held_reqs)} held-out "
            f"request{'' if len(held_reqs) == 1 else 's'}")
        with phase("quantize"), quiet_quantizer():
            quantize_model(prepared, qdq, recipe, nodes, ranges, by_block=by_block, log=log,
                           label=f"{stage}: quantize, round {round_}")
            log(f"{stage}: optimising the quantized graph for ONNX Runtime (one pass over it)")
            optimize_for_ort(qdq, cpu)
        with phase("evaluate"):
            metrics = evaluate(pipe, stage, cpu, held_feeds, held_reqs, float_frames, steps, threads, log)
        rounds.append({"quantized_layers": len(nodes), **metrics.to_json()})
        progress.update(1)
        log(f"  round {round_}: {len(nodes)} layers in {recipe.format}: {metrics.shortfall(recipe)} (peak RSS: "
            f"quantize {peaks['quantize'] / 1024:.1f} GiB, evaluate {peaks['evaluate'] / 1024:.1f} GiB)"
            + ("" if metrics.passes(recipe) else f"; {progress.line()}"))
        if metrics.passes(recipe):
            return QuantizedStage(qdq, cpu, [layers[n] for n in nodes],
                                  sorted({w for w in layers.values() if recipe.keeps_float(w)}),
                                  [layers[n] for n in fallback], metrics, rounds,
                                  integer_kernels(onnx.load(str(cpu), load_external_data=False)), peaks)
        shutil.rmtree(workdir / f"round{round_}")  # a missed round's graphs are not used again (~9 GB at full size)
        if not nodes or round_ == recipe.max_fallback_rounds:
            break
        if scores is None:
            with phase("sensitivity"):
                scores = sensitivity(prepared, ranges, candidates, feeds[:2], recipe, threads)
        k = max(1, math.ceil(recipe.fallback_fraction * len(nodes)))
        fallback += sorted(nodes, key=lambda n: -scores[n])[:k]
    raise AccuracyBudgetError(f"{stage}: {recipe.name} misses its accuracy budget after {len(rounds)} rounds "
                     f"({len(fallback)} layers moved back to float): {metrics.shortfall(recipe)}. Relax the "
                     f"budget in a recipe file (--recipe), raise max_fallback_rounds, or build fp32")
