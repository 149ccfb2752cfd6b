"""`Pipeline`: a bundle and a prompt in, frames out. numpy + onnxruntime (+ tokenizers, Pillow) only.

    pipe = Pipeline.load("bundles/wan")
    out = pipe(prompt="a red fox running through snow", num_inference_steps=20, seed=0)
    out.frames  # (F, H, W, 3) uint8

Per request: the vision encoder (if the task has image/video inputs) and the planner run ONCE; then one
denoise-step engine call per step (CFG branches batched, the scheduler update inside the engine); then the VAE
decoder. Backbone-specific input preparation lives in `runtime.backbones.<backbone>`, as plain functions of the
request.

Thread-safe: one Pipeline serves concurrent requests from several threads, of any mix of tasks, sizes and seeds,
with the results of the same requests run one after another. Everything a request changes is its own (its
`Request`, its `RequestEngines` with its timings, its `RequestContext`, `Prepared` and arrays); what requests
share is read-only (manifest, tokenizer, backbone module) or thread-safe (the engines: see `runtime.engine`).

Calibration and benchmarks watch and swap engines through two supported hooks, never by editing `engines`
(a read-only mapping): `observe(stage, callback)` shows every call of a stage to a callback while its block
runs, and ``pipe(..., engines={"denoise": other})`` runs one request with another engine for a stage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from types import MappingProxyType

import numpy as np

from metacanvas_deploy.runtime.backbones import backbone_module
from metacanvas_deploy.runtime.backbones.common import RequestContext, denoise_shape, schedule_plan, token_grid
from metacanvas_deploy.runtime.bundle import Bundle, load_bundle
from metacanvas_deploy.runtime.cached_steps import cached_loop
from metacanvas_deploy.runtime.engine import load_engine
from metacanvas_deploy.runtime.errors import BundleError, RuntimeInputError
from metacanvas_deploy.runtime.limits import (
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    check_int,
    check_prompt,
    check_real,
    max_threads,
)
from metacanvas_deploy.runtime.memory import available_bytes
from metacanvas_deploy.runtime.ort_cuda import is_cuda_entry
from metacanvas_deploy.runtime.planning import Planner
from metacanvas_deploy.runtime.request import GenerationOutput, PlannerResult, Request
from metacanvas_deploy.runtime.schedulers import SchedulePlan
from metacanvas_deploy.runtime.stage_calls import Observer, Observers, RequestEngines
from metacanvas_deploy.runtime.step_cache import CACHED_STAGE, check_cache_arg, request_mask

__all__ = ["GenerationOutput", "Pipeline", "PlannerResult", "Request"]


def _expected_files(bundle: Bundle, stage: str) -> dict[Path, tuple[str, int | None]]:
    """The engine file of ``stage`` and its external data, with the sha256 (and size) the manifest records."""
    entry = bundle.manifest.engines[stage]
    files: dict[Path, tuple[str, int | None]] = {bundle.engine_path(stage): (entry.sha256, entry.size_bytes)}
    files.update({bundle.path / rel: (bundle.manifest.files[rel], None) for rel in entry.external_data})
    return files


class Pipeline:
    """A loaded bundle: its engines, planner and backbone module. Thread-safe (see the module docstring).

    ``low_memory``: each engine is opened when a request's stage first calls it and freed when the request is
    done with the stage, so a single request holds one stage's weights at a time (Jetson; full-size models on
    small machines) and pays the loads. Concurrent requests share an open engine and hold it by a reference
    count (`runtime.engine.OnDemandEngine`): it is freed when the last request using it is done, never under a
    running one, and N requests in flight hold at most N stages. Every reopen re-checks the engine's files
    against the manifest (size, and sha256 unless ``verify_hashes`` is False) and refuses a changed file with a
    BundleIntegrityError.

    ``mapped`` (default: as ``low_memory``): ONNX Runtime sessions that memory-map their external-data weights
    instead of copying them into private memory (no prepacking, no arena, no load-time optimisation:
    `runtime.engine`), so a stage larger than the free memory still runs, paging its weights in from the file.
    Results then differ from the copying sessions' by float32 rounding; mapped sessions agree with each other
    bit for bit, resident or low-memory.

    ``cache`` (a bundle built with ``--cache``, `runtime.step_cache`): "auto" follows the bundle's step-cache
    schedule, "off" computes every step, a threshold replaces the bundle's; each call may override it. A
    threshold for a bundle without step caching is refused here, before any engine opens."""

    def __init__(self, bundle: Bundle, threads: int | None = None, low_memory: bool = False,
                 verify_hashes: bool = True, mapped: bool | None = None, cache="auto"):
        _check_threads(threads)
        self.cache = check_cache_arg(cache, RuntimeInputError)  # step caching: "auto", "off", a threshold
        self.bundle = bundle
        m = self.manifest = bundle.manifest
        self.low_memory = low_memory
        self.mapped = low_memory if mapped is None else bool(mapped)
        if not self.mapped:
            _check_memory(bundle, low_memory)
        request_mask(m, m.defaults["num_inference_steps"], self.cache, RuntimeInputError)  # a threshold needs one
        self.backbone = backbone_module(m.backbone)
        self.engines = MappingProxyType({
            stage: load_engine(bundle.engine_path(stage), entry, threads, on_demand=low_memory,
                               expected=_expected_files(bundle, stage), verify_hashes=verify_hashes,
                               mapped=self.mapped)
            for stage, entry in m.engines.items()})
        self.planner = Planner(bundle)
        self._observers = Observers()

    @classmethod
    def load(cls, bundle_dir: str | Path, threads: int | None = None, verify_hashes: bool = True,
             low_memory: bool = False, mapped: bool | None = None, cache="auto") -> Pipeline:
        """Verify the bundle (manifest, hashes, backend versions, paths) and open its engines (``low_memory``:
        open each when its stage runs; ``mapped``: map their weights, by default when ``low_memory``; ``cache``:
        step caching, `runtime.step_cache.request_mask`)."""
        _check_threads(threads)  # before hashing the bundle
        check_cache_arg(cache, RuntimeInputError)
        return cls(load_bundle(bundle_dir, verify_hashes=verify_hashes), threads, low_memory, verify_hashes,
                   mapped, cache)

    # hooks for calibration and benchmarks ---------------------------------------------------------------------
    def observe(self, stage: str, callback: Observer) -> AbstractContextManager[None]:
        """``with pipe.observe("denoise", cb): ...``: ``cb(feeds, outputs)`` runs after every call of ``stage``
        that ends while the block runs, in every request of this Pipeline (whichever thread runs it), in the
        calling request's thread; none after the block exits. For calibration and benchmarks: the callback must
        not change the arrays, and copies what it keeps if the caller may reuse them (the pipeline does not).
        An exception in the callback fails that request. While a stage is observed, a TensorRT denoise loop
        runs step by step on the host (same results) so that every step can be shown."""
        self._check_stages([stage], "observe")
        return self._observers.watch(stage, callback)

    def _check_stages(self, stages, what: str) -> None:
        unknown = sorted(set(stages) - set(self.engines))
        if unknown:
            raise RuntimeInputError(f"{what}: this bundle has no stage {', '.join(map(repr, unknown))}; its stages "
                                    f"are {', '.join(self.engines)}")

    def request_engines(self, engines: Mapping[str, object] | None = None) -> RequestEngines:
        """A request's view of the engines, ``engines`` substituted for the Pipeline's where given (each must be
        called like an engine: ``engine(feeds) -> outputs``). Close it (`RequestEngines.close`) when done."""
        subs = dict(engines or {})
        self._check_stages(subs, "engines=")
        bad = sorted(stage for stage, e in subs.items() if not callable(e))
        if bad:
            raise RuntimeInputError(f"engines=: the substitute for {', '.join(bad)} is not callable; pass an engine "
                                    "(`runtime.engine.load_engine`) or any callable feeds -> outputs")
        return RequestEngines({**self.engines, **subs}, self._observers, self.low_memory)

    # the request ----------------------------------------------------------------------------------------------
    def __call__(self, prompt: str, negative_prompt: str | None = None, *, task: str | None = None, image=None,
                 video=None, reference_images=None, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, true_cfg_scale: float = 1.0, seed: int = 0,
                 latents: np.ndarray | None = None, progress: bool = False,
                 engines: Mapping[str, object] | None = None, cache=None) -> GenerationOutput:
        """Generate (diffusers-style arguments). Shapes outside the bundle's ranges are a clear error.
        ``engines``: stage -> an engine to use instead of the bundle's for this request only (calibration runs a
        quantized candidate this way). ``cache``: this request's step caching ("off", "auto" or a threshold;
        None: the Pipeline's); the output counts the steps computed and cached."""
        start = time.perf_counter()
        req = self._request(prompt, negative_prompt, task, image, video, reference_images, height, width,
                            num_frames, num_inference_steps, guidance_scale, true_cfg_scale, seed, latents)
        mask = request_mask(self.manifest, req.num_inference_steps, self.cache if cache is None else cache,
                            RuntimeInputError)
        run = self.request_engines(engines)
        try:
            out = self._generate(req, run, progress, mask)
        finally:
            run.close()
        out.timings = {**run.timings, "total": time.perf_counter() - start}
        out.calls = dict(run.calls)
        out.steps_computed = sum(mask) if mask else req.num_inference_steps
        out.steps_cached = req.num_inference_steps - out.steps_computed
        return out

    def _generate(self, req: Request, run: RequestEngines, progress: bool, mask=None) -> GenerationOutput:
        ctx = RequestContext(self.manifest, run)
        images, video = self.backbone.planner_vision(req)
        rows = 2 if self.backbone.use_cfg(req) else 1
        planned = self.planner.plan(run, req, rows, images, video)
        run.release("vision_encoder", "planner")
        prepared = self.backbone.prepare(ctx, req, planned)
        run.release(*(s for s in run if s not in ("denoise", CACHED_STAGE)))
        latents = self.denoise(prepared.feeds, prepared.sample, prepared.schedule, progress, engines=run, mask=mask)
        run.release("denoise", CACHED_STAGE)
        frames, latents = self.backbone.finish(ctx, req, latents, prepared.state)
        negative = planned.prompt_embeds[:1] if planned.rows == 2 else None
        return GenerationOutput(frames=frames, latents=latents, prompt_embeds=planned.prompt_embeds[-1:],
                                negative_prompt_embeds=negative)

    def _request(self, prompt, negative_prompt, task, image, video, reference_images, height, width, num_frames,
                 steps, guidance, true_cfg, seed, latents) -> Request:
        """Every input typed, finite and bounded before any work; None means the bundle's default, zero never
        does. One `RuntimeInputError` (or `ShapeError`) names the input, what came and what is allowed."""
        m, d = self.manifest, self.manifest.defaults
        prompt = check_prompt("prompt", prompt, allow_empty=False)
        negative = check_prompt("negative_prompt", d["negative_prompt"] if negative_prompt is None
                                else negative_prompt, allow_empty=True)
        task = task or self.backbone.infer_task(image, video, reference_images)
        if task not in m.tasks:
            raise RuntimeInputError(f"task {task!r} is not in this bundle; it serves {', '.join(m.tasks)}")

        def given(name, value, default, hi):
            return check_int(name, default if value is None else value, 1, hi, RuntimeInputError)

        req = Request(task=task, prompt=prompt, negative_prompt=negative,
                      height=given("height", height, d["height"], MAX_SIDE),
                      width=given("width", width, d["width"], MAX_SIDE),
                      num_frames=given("num_frames", num_frames, d["num_frames"], MAX_FRAMES),
                      num_inference_steps=given("num_inference_steps", steps, d["num_inference_steps"], MAX_STEPS),
                      guidance_scale=check_real("guidance_scale", d["guidance_scale"] if guidance is None
                                                else guidance, 0.0, MAX_GUIDANCE, RuntimeInputError),
                      true_cfg_scale=check_real("true_cfg_scale", true_cfg, 0.0, MAX_GUIDANCE, RuntimeInputError),
                      seed=check_int("seed", seed, 0, MAX_SEED, RuntimeInputError), image=image, video=video,
                      reference_images=reference_images, latents=latents)
        self.bundle.check_request(req.height, req.width, req.num_frames)
        return self.backbone.check(m, req)

    # shapes and the schedule ----------------------------------------------------------------------------------
    def token_grid(self, req) -> tuple[int, int, int]:
        """(latent_frames, h_tok, w_tok) of a request (anything with height, width and num_frames)."""
        return token_grid(self.manifest, req)

    def denoise_shape(self, name: str, req, **bindings: int) -> tuple[int, ...]:
        """The concrete shape of a denoise-engine tensor for this request (symbols bound from the token grid)."""
        return denoise_shape(self.manifest, name, req, **bindings)

    def latents_shape(self, height: int | None = None, width: int | None = None,
                      num_frames: int | None = None) -> tuple[int, ...]:
        """The shape `latents=` must have for a request of this size (defaults: the bundle's)."""
        d = self.manifest.defaults
        req = Request(task="", prompt="", negative_prompt="", height=height or d["height"],
                      width=width or d["width"], num_frames=num_frames or d["num_frames"], num_inference_steps=1,
                      guidance_scale=1.0, true_cfg_scale=1.0, seed=0)
        return self.denoise_shape("sample", req)

    def schedule(self, steps: int, image_seq_len: int | None = None) -> SchedulePlan:
        """The bundle's precomputed plan for this step count, or one computed now (numpy, no torch)."""
        return schedule_plan(self.manifest, steps, image_seq_len)

    # the step loop --------------------------------------------------------------------------------------------
    def denoise(self, feeds: Mapping[str, np.ndarray], sample: np.ndarray, schedule: SchedulePlan,
                progress: bool = False, engines: RequestEngines | None = None, mask=None) -> np.ndarray:
        """The step loop: one engine call per step; the sample and the multistep state go straight back in.
        ``engines``: the request's (a fresh view of the Pipeline's when None). ``mask``: step caching's per-step
        FULL (True) / CACHED (False) choice (`runtime.step_cache`); None computes every step."""
        run = engines if engines is not None else self.request_engines()
        try:
            sample = self._step_loop(run, feeds, sample, schedule, progress, mask)
        finally:
            if engines is None:
                run.close()
        if not np.isfinite(sample).all():
            raise RuntimeInputError("the denoiser produced non-finite latents (NaN/inf); check the inputs "
                                    "(guidance scale, latents) or rebuild the bundle")
        return sample

    def _step_loop(self, run: RequestEngines, feeds, sample, schedule: SchedulePlan, progress: bool,
                   mask=None) -> np.ndarray:
        state = {"sample": sample}
        if schedule.history:
            state["last_sample"] = np.zeros_like(sample)
            state["history"] = np.zeros((schedule.history, *sample.shape), sample.dtype)
        per_step = [schedule.step_feeds(i) for i in range(schedule.num_inference_steps)]
        engine = run.engine("denoise")
        entry = getattr(engine, "entry", None)
        on_gpu = entry is not None and (entry.backend == "tensorrt" or is_cuda_entry(entry))
        names = {"next_sample": "sample"}
        if schedule.history:
            names.update(next_last_sample="last_sample", next_history="history")
        if mask is not None:  # step caching: FULL and CACHED steps per the mask (runtime.cached_steps)
            return cached_loop(run, feeds, state, per_step, mask, names, on_gpu, _progress(per_step, progress))
        if hasattr(engine, "run_steps") and on_gpu and not run.observed("denoise"):
            # the loop on the GPU (TensorRT, or ONNX Runtime's CUDA provider), one CUDA-graph launch per step
            out = run.run_steps("denoise", {**feeds, **state}, names, per_step)
            return out["next_sample"]
        for step in _progress(per_step, progress):
            out = run["denoise"]({**feeds, **state, **step})
            state["sample"] = out["next_sample"]
            if schedule.history:
                state["last_sample"], state["history"] = out["next_last_sample"], out["next_history"]
        return state["sample"]


def _progress(steps: list, show: bool) -> Iterator:
    if not show:
        return iter(steps)
    from tqdm import tqdm

    return iter(tqdm(steps, desc="denoising", unit="step"))


def _check_threads(threads) -> None:
    if threads is not None:
        check_int("threads", threads, 1, max_threads(), RuntimeInputError)


def _stage_bytes(bundle: Bundle) -> dict[str, int]:
    """Each stage's weights on disk (engine file plus external data): what a copying session holds."""
    m = bundle.manifest
    return {stage: e.size_bytes + sum((bundle.path / rel).stat().st_size for rel in e.external_data)
            for stage, e in m.engines.items()}


def _check_memory(bundle: Bundle, low_memory: bool) -> None:
    """A copying (unmapped) load that cannot fit is refused before any session opens, with what it needs and the
    mode that fits: one stage at a time, or weights mapped from disk."""
    sizes = _stage_bytes(bundle)
    need = max(sizes.values()) if low_memory else sum(sizes.values())
    free = available_bytes()
    if need <= free:
        return
    gib = 2**30
    largest = max(sizes, key=sizes.get)
    if not low_memory and max(sizes.values()) <= free:
        fix = (f"load it with low_memory=True (CLI --low-memory): one stage at a time, the largest "
               f"({largest}) {sizes[largest] / gib:.1f} GiB")
    else:
        fix = "load it with mapped=True (implied by low_memory=True): weights paged from disk, never copied"
    when = "per stage" if low_memory else "at once"
    raise BundleError(f"this bundle's engines need {need / gib:.1f} GiB in memory {when}; {free / gib:.1f} GiB is "
                      f"available. {fix[0].upper() + fix[1:]}")
