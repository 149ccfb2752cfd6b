"""Wan2.2-TI2V: t2v, i2v (first latent frame clean), v2v (source video as condition), r2v (reference images as
clean leading frames). The recipe is `mc_export.components.wan`'s docstring; the VAE streams chunk by chunk
(`mc_export.components.wan_vae`).

Plain functions of the request (`runtime.backbones` describes the contract): nothing is kept between calls; what
`finish` needs from `prepare` (the clean latents and their frame mask) travels in `Prepared.state`."""

from __future__ import annotations

import numpy as np

from metacanvas_deploy.runtime.backbones.common import Prepared, RequestContext, pixels
from metacanvas_deploy.runtime.errors import RuntimeInputError
from metacanvas_deploy.runtime.manifest import Manifest
from metacanvas_deploy.runtime.request import PlannerResult, Request

_NEEDS = {"t2v": set(), "i2v": {"image"}, "v2v": {"video"}, "r2v": {"reference_images"}}


def infer_task(image, video, reference_images) -> str:
    """The task the given inputs ask for."""
    if video is not None:
        return "v2v"
    if reference_images is not None:
        return "r2v"
    return "i2v" if image is not None else "t2v"


def check(manifest: Manifest, req: Request) -> Request:
    """The request, or a RuntimeInputError saying which input the task needs or takes no part of."""
    given = {"image": req.image is not None, "video": req.video is not None,
             "reference_images": req.reference_images is not None}
    needs = _NEEDS[req.task]
    for name, present in given.items():
        if present != (name in needs):
            raise RuntimeInputError(f"task {req.task} {'needs' if name in needs else 'takes no'} {name}")
    most = _max_references(manifest)
    if req.task == "r2v" and not 1 <= len(req.reference_images) <= most:
        raise RuntimeInputError(f"r2v takes 1..{most} reference images, got {len(req.reference_images)}")
    if req.task == "v2v" and len(req.video) != req.num_frames:
        raise RuntimeInputError(f"the source video must have num_frames={req.num_frames} frames, "
                                f"got {len(req.video)}")
    return req


def _max_references(manifest: Manifest) -> int:
    spec = manifest.engines["denoise"]
    return spec.dims_ranges["ref_frames"].max if "ref_frames" in spec.dims_ranges else 0


def use_cfg(req: Request) -> bool:
    """Whether the negative branch runs (both rows batched in one step call)."""
    return req.guidance_scale > 1.0


def planner_vision(req: Request):
    """(images or None, video or None) the planner sees."""
    if req.task == "i2v":
        return [req.image], None
    if req.task == "r2v":
        return list(req.reference_images), None
    return None, (req.video if req.task == "v2v" else None)


# the VAE, streamed -----------------------------------------------------------------------------------------
def _latent_stats(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel latent mean and std, (1, C, 1, 1, 1) each."""
    facts = manifest.engines["denoise"].extra
    return (np.asarray(facts["latents_mean"], np.float32).reshape(1, -1, 1, 1, 1),
            np.asarray(facts["latents_std"], np.float32).reshape(1, -1, 1, 1, 1))


def _past(caches: dict) -> dict:
    """A chunk's `present.*` outputs as the next chunk's `past.*` inputs."""
    return {k.replace("present.", "past.", 1): v for k, v in caches.items()}


def encode(ctx: RequestContext, video: np.ndarray) -> np.ndarray:
    """(1, 3, F, H, W) in [-1, 1], F = 4k + 1 -> normalised latents (1, C, 1 + k, h, w)."""
    e = ctx.engines
    out = e["vae_encoder_first"]({"video": np.ascontiguousarray(video[:, :, :1])})
    latents, caches = [out.pop("latents")], out
    chunk = ctx.manifest.engines["vae_encoder"].extra["chunk_frames"]
    for start in range(1, video.shape[2], chunk):
        out = e["vae_encoder"]({"video": np.ascontiguousarray(video[:, :, start:start + chunk]), **_past(caches)})
        latents.append(out.pop("latents"))
        caches = out
    z = np.concatenate(latents, axis=2)
    mean, std = _latent_stats(ctx.manifest)
    return ((z - mean) * (np.float32(1.0) / std)).astype(np.float32)


def decode(ctx: RequestContext, latents: np.ndarray) -> np.ndarray:
    """Normalised latents (1, C, T, h, w) -> uint8 frames (F, H, W, 3), F = 4(T - 1) + 1."""
    e = ctx.engines
    mean, std = _latent_stats(ctx.manifest)
    z = (latents / (np.float32(1.0) / std) + mean).astype(np.float32)
    out = e["vae_decoder_first"]({"latents": np.ascontiguousarray(z[:, :, :1])})
    video, caches = [out.pop("video")], out
    for t in range(1, z.shape[2]):
        out = e["vae_decoder"]({"latents": np.ascontiguousarray(z[:, :, t:t + 1]), **_past(caches)})
        video.append(out.pop("video"))
        caches = out
    x = np.concatenate(video, axis=2)[0].transpose(1, 2, 3, 0)  # (F, H, W, 3) in [-1, 1]
    return np.round(np.clip(x / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


# the request -----------------------------------------------------------------------------------------------
def prepare(ctx: RequestContext, req: Request, planned: PlannerResult) -> Prepared:
    """The step engine's inputs: the task's clean frames, reference frames or condition, VAE-encoded."""
    shape = ctx.denoise_shape("sample", req)  # (1, C, T, h, w)
    _, c, t, h, w = shape
    clean, clean_mask = np.zeros(shape, np.float32), np.zeros((t,), np.float32)
    reference = np.zeros((1, c, 0, h, w), np.float32)
    condition = np.zeros((1, c + 1, t, h, w), np.float32)
    if req.task == "i2v":
        image = pixels([req.image], req.height, req.width)[:, :, None]  # (1, 3, 1, H, W)
        clean[:, :, :1] = encode(ctx, image)
        clean_mask[0] = 1.0
    elif req.task == "r2v":
        refs = pixels(list(req.reference_images), req.height, req.width, "reference_images")  # (R, 3, H, W)
        reference = np.concatenate([encode(ctx, r[None, :, None]) for r in refs], axis=2)  # (1, C, R, h, w)
    elif req.task == "v2v":
        video = pixels(list(req.video), req.height, req.width, "video").transpose(1, 0, 2, 3)[None]
        condition = np.concatenate([encode(ctx, video), np.ones((1, 1, t, h, w), np.float32)], axis=1)
    feeds = {"prompt_embeds": planned.prompt_embeds, "canvas": planned.canvas,
             "guidance_scale": np.array([req.guidance_scale], np.float32), "clean": clean,
             "clean_mask": clean_mask}
    names = {s.name for s in ctx.manifest.engines["denoise"].inputs}
    if "reference" in names:
        feeds["reference"] = reference
    if "condition" in names:
        feeds["condition"] = condition
    return Prepared(feeds, ctx.initial_sample(req, shape), ctx.schedule(req.num_inference_steps),
                    state=(clean, clean_mask.reshape(1, 1, -1, 1, 1)))


def finish(ctx: RequestContext, req: Request, latents: np.ndarray, state) -> tuple[np.ndarray, np.ndarray]:
    """(frames, final latents): i2v's frame 0 is the clean image latent again (a new array: the denoiser's
    output is left as it came), then the streamed VAE decode."""
    clean, mask = state
    latents = mask * clean + (1 - mask) * latents
    return decode(ctx, latents), latents
