"""`Pipeline`: a bundle and a prompt in, frames out. numpy + onnxruntime (+ tokenizers, Pillow) only.

    pipe = Pipeline.load("bundles/wan")
    out = pipe(prompt="a red fox running through snow", num_inference_steps=20, seed=0)
    out.frames  # (F, H, W, 3) uint8

Per request: the vision encoder (if the task has image/video inputs) and the planner run ONCE; then one
denoise-step engine call per step (CFG branches batched, the scheduler update inside the engine); then the VAE
decoder. Backbone-specific input preparation lives in `runtime.backbones.<backbone>`.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metacanvas_deploy.runtime.backbones.common import shape_of
from metacanvas_deploy.runtime.bundle import Bundle, load_bundle
from metacanvas_deploy.runtime.engine import load_engine
from metacanvas_deploy.runtime.errors import RuntimeInputError
from metacanvas_deploy.runtime.manifest_fields import thaw
from metacanvas_deploy.runtime.schedulers import SchedulePlan, make_plan
from metacanvas_deploy.runtime.text import PromptTokenizer, planner_position_ids
from metacanvas_deploy.runtime.vision import VisionGeometry, preprocess_images, preprocess_video, video_tokens
from metacanvas_deploy.runtime.vision_index import VisionGeometry as IndexGeometry
from metacanvas_deploy.runtime.vision_index import vision_inputs


@dataclass(frozen=True)
class Request:
    """One generation request, with every default resolved."""

    task: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seed: int
    image: Any = None
    video: Any = None
    reference_images: Any = None
    latents: np.ndarray | None = None


@dataclass
class GenerationOutput:
    frames: np.ndarray  # (F, H, W, 3) uint8; F = 1 for images
    latents: np.ndarray  # final latents (the denoise engine's layout)
    prompt_embeds: np.ndarray  # (1, L, D_txt) what the DiT saw for the prompt
    negative_prompt_embeds: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"


@dataclass
class PlannerResult:
    prompt_embeds: np.ndarray  # (rows, L, D_txt)
    canvas: np.ndarray  # (rows, T, H, W, D_dit)
    pooled_prompt_embeds: np.ndarray | None
    prompt_mask: np.ndarray  # (rows, L) int64
    rows: int


class Pipeline:
    """A loaded bundle: its engines, tokenizer and backbone host. Thread-compatible, not thread-safe.

    ``low_memory``: each engine is opened when its stage runs and freed when the stage is done, so one stage's
    weights are resident at a time (Jetson; full-size models on small machines); each request pays the loads."""

    def __init__(self, bundle: Bundle, threads: int | None = None, low_memory: bool = False):
        self.bundle = bundle
        m = self.manifest = bundle.manifest
        self.low_memory = low_memory
        self.engines = {stage: load_engine(bundle.engine_path(stage), entry, threads, on_demand=low_memory)
                        for stage, entry in m.engines.items()}
        planner = m.build["planner"]
        self.tokenizer = PromptTokenizer.from_file(bundle.file_path("tokenizer.json"), planner["max_prompt_tokens"])
        self.planner_facts = planner
        mc = m.build["metacanvas"]
        self.vision_tokens_per_image = mc["vision_tokens_per_image"]
        self.planner_video_frames = mc["planner_video_frames"]
        if "vision_encoder" in m.engines:
            geo = m.engines["vision_encoder"].extra["geometry"]
            self.index_geometry = IndexGeometry.from_config(geo)
            self.geometry = VisionGeometry(grid=int(round(self.vision_tokens_per_image ** 0.5)),
                                           patch_size=geo["patch_size"], merge_size=geo["spatial_merge_size"],
                                           temporal_patch_size=geo["temporal_patch_size"])
        self.host = importlib.import_module(f"metacanvas_deploy.runtime.backbones.{m.backbone}").Host(self)

    @classmethod
    def load(cls, bundle_dir: str | Path, threads: int | None = None, verify_hashes: bool = True,
             low_memory: bool = False) -> Pipeline:
        """Verify the bundle (manifest, hashes, backend versions, paths) and open its engines (``low_memory``:
        open each when its stage runs)."""
        return cls(load_bundle(bundle_dir, verify_hashes=verify_hashes), threads, low_memory)

    # the request --------------------------------------------------------------------------------------------
    def __call__(self, prompt: str, negative_prompt: str | None = None, *, task: str | None = None, image=None,
                 video=None, reference_images=None, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, true_cfg_scale: float = 1.0, seed: int = 0,
                 latents: np.ndarray | None = None, progress: bool = False) -> GenerationOutput:
        """Generate (diffusers-style arguments). Shapes outside the bundle's ranges are a clear error."""
        start = time.perf_counter()
        req = self._request(prompt, negative_prompt, task, image, video, reference_images, height, width,
                            num_frames, num_inference_steps, guidance_scale, true_cfg_scale, seed, latents)
        self._reset_timers()
        planned = self.plan(req)
        self._release("vision_encoder", "planner")
        feeds, sample, schedule = self.host.prepare(req, planned)
        self._release(*(s for s in self.engines if s != "denoise"))
        latents_out = self.denoise(feeds, sample, schedule, progress)
        self._release("denoise")
        frames = self.host.finish(req, latents_out)
        self._release(*self.engines)
        timings = {stage: e.seconds for stage, e in self.engines.items() if e.calls}  # seconds inside each engine
        timings["total"] = time.perf_counter() - start
        negative = planned.prompt_embeds[:1] if planned.rows == 2 else None
        return GenerationOutput(frames=frames, latents=latents_out, prompt_embeds=planned.prompt_embeds[-1:],
                                negative_prompt_embeds=negative, timings=timings)

    def _release(self, *stages: str) -> None:
        """Low-memory mode: free these stages' engines (they reopen on their next call)."""
        if self.low_memory:
            for stage in stages:
                if stage in self.engines:  # a SANA bundle has no vision encoder
                    self.engines[stage].release()

    def _reset_timers(self) -> None:
        for e in self.engines.values():
            e.seconds, e.calls = 0.0, 0

    def _request(self, prompt, negative_prompt, task, image, video, reference_images, height, width, num_frames,
                 steps, guidance, true_cfg, seed, latents) -> Request:
        m, d = self.manifest, self.manifest.defaults
        if not isinstance(prompt, str) or not prompt.strip():
            raise RuntimeInputError("prompt must be a non-empty string")
        task = task or self.host.infer_task(image, video, reference_images)
        if task not in m.tasks:
            raise RuntimeInputError(f"task {task!r} is not in this bundle; it serves {', '.join(m.tasks)}")
        req = Request(task=task, prompt=prompt, negative_prompt=d["negative_prompt"] if negative_prompt is None
                      else negative_prompt, height=height or d["height"], width=width or d["width"],
                      num_frames=num_frames or d["num_frames"], num_inference_steps=steps or d["num_inference_steps"],
                      guidance_scale=d["guidance_scale"] if guidance is None else float(guidance),
                      true_cfg_scale=float(true_cfg), seed=int(seed), image=image, video=video,
                      reference_images=reference_images, latents=latents)
        if req.num_inference_steps < 1:
            raise RuntimeInputError(f"num_inference_steps must be >= 1, got {req.num_inference_steps}")
        self.bundle.check_request(req.height, req.width, req.num_frames)
        return self.host.check(req)

    # stages -------------------------------------------------------------------------------------------------
    def vision_features(self, images=None, video=None) -> tuple[np.ndarray | None, list[int], int | None]:
        """Planner vision inputs -> (features (V, D) or None, tokens per image, video tokens or None)."""
        pixels, grids, n_image, n_video = [], [], [], None
        if images:
            pv, grid = preprocess_images(images, self.geometry)
            pixels.append(pv), grids.append(grid)
            n_image = [self.geometry.tokens_per_image] * len(images)
        if video is not None:
            pv, grid = preprocess_video(video, self.geometry, self.planner_video_frames)
            pixels.append(pv), grids.append(grid)
            n_video = video_tokens(self.geometry, self.planner_video_frames)
        if not pixels:
            return None, [], None
        grid = np.concatenate(grids)
        feeds = {"pixel_values": np.concatenate(pixels), **vision_inputs(grid, self.index_geometry)}
        return self.engines["vision_encoder"](feeds)["image_features"], n_image, n_video

    def plan(self, req: Request) -> PlannerResult:
        """Vision encoder + planner, once per request: prompt embeddings and the canvas on the token grid."""
        images, video = self.host.planner_vision(req)
        feats, n_image, n_video = self.vision_features(images, video)
        self._release("vision_encoder")
        rows = 2 if self.host.use_cfg(req) else 1
        prompts = [req.negative_prompt, req.prompt][-rows:]
        ids, mask = self.tokenizer.encode_batch(prompts, [n_image] * rows, [n_video] * rows, allow_empty=True)
        lo, hi = self.manifest.ranges["prompt_tokens"]
        if not lo <= ids.shape[1] <= hi:
            if ids.shape[1] < lo:  # pad on the left to the build's minimum: the DiT then sees zero rows there,
                # as with diffusers' fixed-length text padding (the default builds take length 1 and never pad)
                ids, mask = self.tokenizer.encode_batch(prompts, [n_image] * rows, [n_video] * rows,
                                                        allow_empty=True, pad_to=lo)
            else:
                self.bundle.check_request(req.height, req.width, req.num_frames, ids.shape[1])
        f = self.planner_facts
        # grids are consumed in order, row after row: every row sees the same vision inputs
        grids = {k: np.tile(v, (rows, 1)) for k, v in self._grids(images, video).items()}
        # the prefix positions only: the planner graph derives the canvas positions itself
        pos = planner_position_ids(ids, mask, image_token_id=f["image_token_id"], video_token_id=f["video_token_id"],
                                   canvas=(1, 1, 1), spatial_merge_size=f["spatial_merge_size"],
                                   tokens_per_second=f["tokens_per_second"], **grids)[:, :, : ids.shape[1]]
        index = np.full(ids.shape, -1, np.int64)
        is_vis = (ids == f["image_token_id"]) | (ids == f["video_token_id"])
        for r in range(rows):
            index[r, is_vis[r]] = np.arange(int(is_vis[r].sum()))
        d_mllm = self.manifest.engines["planner"].spec("vision_embeds").dims[1]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                 "vision_embeds": feats if feats is not None else np.zeros((1, d_mllm), np.float32),
                 "vision_index": index, "token_grid": np.zeros(self._grid_shape(req), np.float32)}
        out = self.engines["planner"](feeds)
        return PlannerResult(out["prompt_embeds"], out["canvas"], out.get("pooled_prompt_embeds"), mask, rows)

    def _grid_shape(self, req: Request) -> tuple[int, ...]:
        t, h, w = self.token_grid(req)
        return shape_of(self.manifest.engines["planner"].spec("token_grid"), {"latent_frames": t, "h_tok": h,
                                                                               "w_tok": w})

    def _grids(self, images, video) -> dict:
        g = {}
        if images:
            side = self.geometry.grid * self.geometry.merge_size
            g["image_grid_thw"] = np.array([[1, side, side]] * len(images), np.int64)
        if video is not None:
            side = self.geometry.grid * self.geometry.merge_size
            g["video_grid_thw"] = np.array([[self.planner_video_frames // self.geometry.temporal_patch_size,
                                             side, side]], np.int64)
        return g

    def token_grid(self, req: Request) -> tuple[int, int, int]:
        """(latent_frames, h_tok, w_tok) of a request: the bundle's multiples are the VAE stride x patch."""
        mult = self.manifest.multiples
        frames = (req.num_frames - 1) // mult["num_frames_minus_1"] + 1
        return frames, req.height // mult["height"], req.width // mult["width"]

    def denoise_shape(self, name: str, req: Request, **bindings: int) -> tuple[int, ...]:
        """The concrete shape of a denoise-engine tensor for this request (symbols bound from the token grid)."""
        t, h, w = self.token_grid(req)
        spec = self.manifest.engines["denoise"].spec(name)
        return shape_of(spec, {"latent_frames": t, "h_tok": h, "w_tok": w, **bindings})

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
        s = thaw(self.manifest.scheduler)
        pre = s.get("plans", {}).get(str(steps))
        return SchedulePlan.from_json(pre) if pre else make_plan(s["config"], steps, image_seq_len)

    def denoise(self, feeds: dict, sample: np.ndarray, schedule: SchedulePlan, progress: bool = False) -> np.ndarray:
        """The step loop: one engine call per step; the sample and the multistep state go straight back in."""
        engine = self.engines["denoise"]
        coefficients = schedule.coefficient_array().astype(np.float32)  # (N, 3, 3 + K)
        state = {"sample": sample}
        if schedule.history:
            state["last_sample"] = np.zeros_like(sample)
            state["history"] = np.zeros((schedule.history, *sample.shape), sample.dtype)
        steps = range(schedule.num_inference_steps)
        per_step = [{"timestep": np.array([schedule.timesteps[i]], np.float32), "coefficients": coefficients[i]}
                    for i in steps]
        if hasattr(engine, "run_steps") and engine.entry.backend == "tensorrt":  # the loop on the GPU, one
            # CUDA-graph launch per step
            names = {"next_sample": "sample"}
            if schedule.history:
                names.update(next_last_sample="last_sample", next_history="history")
            out = engine.run_steps({**feeds, **state}, names, per_step)
            state = {name: out[o] for o, name in names.items()}
        else:
            if progress:
                from tqdm import tqdm

                steps = tqdm(steps, desc="denoising", unit="step")
            for i in steps:
                out = engine({**feeds, **state, **per_step[i]})
                state["sample"] = out["next_sample"]
                if schedule.history:
                    state["last_sample"], state["history"] = out["next_last_sample"], out["next_history"]
        if not np.isfinite(state["sample"]).all():
            raise RuntimeInputError("the denoiser produced non-finite latents (NaN/inf); check the inputs "
                                    "(guidance scale, latents) or rebuild the bundle")
        return state["sample"]

    def initial_sample(self, req: Request, shape: tuple[int, ...]) -> np.ndarray:
        """Seeded standard-normal noise (numpy's PCG64: not torch's generator), or the caller's `latents`."""
        if req.latents is not None:
            lat = np.asarray(req.latents)
            if lat.shape != shape or lat.dtype != np.float32 or not np.isfinite(lat).all():
                raise RuntimeInputError(f"latents must be finite float32 {shape}, got {lat.dtype} {lat.shape}")
            return lat.copy()
        return np.random.default_rng(req.seed).standard_normal(shape, dtype=np.float32)

