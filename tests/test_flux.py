"""FLUX.1-Kontext adapter: parity with diffusers' FluxKontextPipeline, the canvas on target tokens only, errors.

Tiny preset, CPU: 64x64 images (8x8 latents, 4x4 = 16 packed target tokens + 16 context tokens), 3 steps.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

from metacanvas_deploy.mc_export.errors import ConfigError, InputError, TaskError
from metacanvas_deploy.mc_export.models.backbones.base import Conditioning
from metacanvas_deploy.mc_export.models.backbones.flux import (
    FluxKontextAdapter,
    image_ids,
    pack_latents,
    unpack_latents,
)
from metacanvas_deploy.mc_export.models.connectors import CanvasInjector, CanvasPrep, randomize_zero_layers
from metacanvas_deploy.mc_export.models.presets import get_preset

H, W, STEPS, GUIDANCE = 64, 64, 3, 2.5
# True CFG: the adapter batches [negative, positive] in one DiT call, the pipeline makes two calls. Same math;
# only the GEMM blocking over the batch may differ (float32 reassociation, ~1e-7 per op), accumulated over
# the DiT and 3 Euler steps. Every other comparison is exact (torch.equal).
CFG_RTOL = 1e-5


def build(seed: int = 0) -> FluxKontextAdapter:
    preset = get_preset("flux", "tiny")
    cfg = preset.metacanvas
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**preset.transformer).eval()
    vae = AutoencoderKL(**preset.vae).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(preset.scheduler)
    return FluxKontextAdapter(transformer, vae, scheduler, cfg, CanvasPrep(cfg).eval(), CanvasInjector(cfg).eval())


def conditioning(adapter: FluxKontextAdapter, canvas: bool = True, batch: int = 1, seed: int = 1) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    cfg = adapter.cfg
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    states = lambda: rand(batch, cfg.canvas_tokens, cfg.mllm_dim) if canvas else None  # noqa: E731
    return Conditioning(prompt_embeds=rand(batch, 7, cfg.text_dim), prompt_mask=torch.ones(batch, 7),
                        canvas_states=states(), pooled_prompt_embeds=rand(batch, cfg.pooled_dim),
                        negative_prompt_embeds=rand(batch, 7, cfg.text_dim), negative_prompt_mask=torch.ones(batch, 7),
                        negative_canvas_states=states(), negative_pooled_prompt_embeds=rand(batch, cfg.pooled_dim))


def rgb(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def run(adapter: FluxKontextAdapter, cond: Conditioning, image=None, seed: int = 0, **kw):
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE) | kw
    image = PIL.Image.fromarray(rgb(7)) if image is None else image
    return adapter.sample("edit", cond, image=image, generator=torch.Generator().manual_seed(seed), **kw)


def pipeline(adapter: FluxKontextAdapter) -> FluxKontextPipeline:
    """The stock pipeline on the SAME transformer/VAE/scheduler objects; no text encoders."""
    return FluxKontextPipeline(scheduler=adapter.scheduler, vae=adapter.vae, transformer=adapter.transformer,
                               text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def pipeline_kwargs(cond: Conditioning, true_cfg: float = 1.0, seed: int = 0, **kw) -> dict:
    """Same embeddings, steps and guidance; max_area = H*W and no auto-resize keep the tiny size as asked."""
    kw = dict(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds, height=H, width=W,
              num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_area=H * W, _auto_resize=False,
              generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False) | kw
    if true_cfg > 1.0:
        kw |= dict(true_cfg_scale=true_cfg, negative_prompt_embeds=cond.negative_prompt_embeds,
                   negative_pooled_prompt_embeds=cond.negative_pooled_prompt_embeds)
    return kw


@pytest.fixture(scope="module")
def adapter() -> FluxKontextAdapter:
    return build()


@pytest.fixture(scope="module")
def random_canvas(adapter) -> FluxKontextAdapter:
    """The same DiT and VAE with a second adapter whose zero-initialised canvas layers are random."""
    prep, injector = copy.deepcopy(adapter.canvas_prep), copy.deepcopy(adapter.injector)
    g = torch.Generator().manual_seed(3)
    randomize_zero_layers(prep, g, std=0.5)
    randomize_zero_layers(injector, g, std=0.5)
    other = FluxKontextAdapter(adapter.transformer, adapter.vae, adapter.scheduler, adapter.cfg, prep, injector)
    yield other
    other.hook.remove()


# --- oracle: diffusers' FluxKontextPipeline -------------------------------------------------------------------
@pytest.mark.parametrize("canvas, batch, height, width", [(True, 1, H, W), (False, 2, H, W), (True, 1, 48, 80)],
                         ids=["zero-canvas", "no-canvas-batch2", "zero-canvas-48x80"])
def test_matches_kontext_pipeline(adapter, canvas, batch, height, width):
    """Seeded noise, image encoding, ids, shift, guidance and Euler steps all equal the pipeline's, bit for bit."""
    cond = conditioning(adapter, canvas=canvas, batch=batch)
    image = PIL.Image.fromarray(rgb(7, height, width))
    out = run(adapter, cond, image=image, height=height, width=width)
    size = dict(height=height, width=width, max_area=height * width)
    ref = pipeline(adapter)(image=image, **pipeline_kwargs(cond, **size))[0]
    assert torch.equal(out.latents, ref)
    assert out.frames.shape == (batch, 1, height, width, 3) and out.frames.dtype == np.uint8
    assert out.negative_prompt_embeds is None and out.prompt_embeds is cond.prompt_embeds


def test_true_cfg_matches_kontext_pipeline(adapter):
    cond = conditioning(adapter)
    latents = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(5))  # packed (B, N_tgt, 4C)
    image = rgb(8)  # numpy input
    out = run(adapter, cond, image=image, true_cfg_scale=3.0, latents=latents)
    ref = pipeline(adapter)(image=PIL.Image.fromarray(image), **pipeline_kwargs(cond, 3.0, latents=latents))[0]
    torch.testing.assert_close(out.latents, ref, rtol=CFG_RTOL, atol=CFG_RTOL * ref.abs().max().item())
    assert out.negative_prompt_embeds is cond.negative_prompt_embeds


def test_decoded_frames_match_kontext_pipeline(adapter):
    cond = conditioning(adapter, canvas=False)
    image = PIL.Image.fromarray(rgb(9))
    out = run(adapter, cond, image=image, num_inference_steps=2)
    ref = pipeline(adapter)(image=image, **pipeline_kwargs(cond, num_inference_steps=2, output_type="pil"))[0][0]
    assert np.array_equal(out.frames[0, 0], np.asarray(ref))


# --- the canvas ----------------------------------------------------------------------------------------------
def test_random_canvas_changes_output(random_canvas):
    cond = conditioning(random_canvas)
    with_canvas = run(random_canvas, cond).latents
    without = run(random_canvas, dataclasses.replace(cond, canvas_states=None, negative_canvas_states=None)).latents
    assert not torch.allclose(with_canvas, without, atol=1e-4)
    other = run(random_canvas, dataclasses.replace(cond, canvas_states=cond.canvas_states + 1.0)).latents
    assert not torch.allclose(with_canvas, other, atol=1e-4)


def capture_embedder(adapter: FluxKontextAdapter, **inputs) -> torch.Tensor:
    """One denoise call; returns the tokens leaving x_embedder after the canvas hook, (B, N_tgt + N_ctx, D)."""
    seen = []
    handle = adapter.transformer.x_embedder.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        adapter.denoise(**inputs)
    finally:
        handle.remove()
    return seen[0]


def test_canvas_never_touches_context_tokens(random_canvas):
    """Perturb the canvas: context tokens stay bit-identical to stock x_embedder output, target tokens move.
    Perturb the context image: target tokens stay bit-identical (the injector never sees context tokens)."""
    a = random_canvas
    g = torch.Generator().manual_seed(11)
    n, c4, d = 16, 16, a.cfg.dit_dim  # 4x4 target tokens, 4C = 16 packed channels
    inputs = dict(latents=torch.randn(1, n, c4, generator=g), image_latents=torch.randn(1, n, c4, generator=g),
                  timestep=torch.tensor([700.0]), guidance=torch.tensor([2.5]),
                  prompt_embeds=torch.randn(1, 7, a.cfg.text_dim, generator=g),
                  pooled_prompt_embeds=torch.randn(1, a.cfg.pooled_dim, generator=g), txt_ids=torch.zeros(7, 3),
                  img_ids=torch.cat([image_ids(4, 4), image_ids(4, 4, first=1.0)]))
    canvas = torch.randn(1, 1, 4, 4, d, generator=g)
    stock = a.transformer.x_embedder(torch.cat([inputs["latents"], inputs["image_latents"]], dim=1))
    first = capture_embedder(a, canvas=canvas, **inputs)
    second = capture_embedder(a, canvas=canvas * 3.0 + 1.0, **inputs)
    assert torch.equal(first[:, n:], stock[:, n:]) and torch.equal(second[:, n:], stock[:, n:])
    assert not torch.allclose(first[:, :n], stock[:, :n]) and not torch.allclose(first[:, :n], second[:, :n])
    moved = capture_embedder(a, canvas=canvas, **(inputs | dict(image_latents=inputs["image_latents"] + 1.0)))
    assert torch.equal(moved[:, :n], first[:, :n]) and not torch.equal(moved[:, n:], first[:, n:])


def test_canvas_prepared_once_per_request(random_canvas):
    calls = []
    handle = random_canvas.canvas_prep.register_forward_hook(lambda *args: calls.append(1))
    try:
        run(random_canvas, conditioning(random_canvas), true_cfg_scale=2.0)
    finally:
        handle.remove()
    assert len(calls) == 1  # one call for both CFG branches, never per step


# --- geometry and inputs -------------------------------------------------------------------------------------
def test_token_grid_and_packing(adapter):
    assert adapter.token_grid(64, 96) == (1, 4, 6)
    adapter.check_shape(np.int64(48), 80)  # numpy integers are sizes too
    z = torch.randn(2, 4, 8, 12)
    packed = pack_latents(z)
    assert packed.shape == (2, 24, 16) and torch.equal(unpack_latents(packed, 4, 6), z)
    assert torch.equal(packed, FluxKontextPipeline._pack_latents(z, 2, 4, 8, 12))


def test_other_image_sizes_are_resized(adapter):
    """An input image of another size is resized to (height, width) with Lanczos before VAE encoding."""
    big = PIL.Image.fromarray(rgb(4, 96, 80))
    resized = big.resize((W, H), resample=PIL.Image.LANCZOS)
    assert torch.equal(adapter.encode_image(big, H, W, 1), adapter.encode_image(resized, H, W, 1))


def test_wrong_backbone_config(adapter):
    cfg = get_preset("sana", "tiny").metacanvas
    with pytest.raises(ConfigError, match="flux"):
        FluxKontextAdapter(adapter.transformer, adapter.vae, adapter.scheduler, cfg, CanvasPrep(cfg),
                           CanvasInjector(cfg))


@pytest.mark.parametrize("task, error, match", [("t2i", TaskError, "not served"), ("t2v", TaskError, "not served"),
                                                ("paint", TaskError, "unknown task")])
def test_tasks_the_backbone_does_not_serve(adapter, task, error, match):
    with pytest.raises(error, match=match):
        adapter.sample(task, conditioning(adapter), image=rgb(1), height=H, width=W, num_inference_steps=2)


@pytest.mark.parametrize("image, error, match", [
    (None, TaskError, "needs an input image"),
    (PIL.Image.new("L", (W, H)), InputError, "RGB"),
    (PIL.Image.new("RGBA", (W, H)), InputError, "RGB"),
    (np.zeros((H, W, 3), np.float32), InputError, "uint8"),
    (np.zeros((H, W), np.uint8), InputError, "uint8"),
    (torch.zeros(3, H, W), InputError, "PIL.Image"),
])
def test_bad_images(adapter, image, error, match):
    with pytest.raises(error, match=match):
        adapter.sample("edit", conditioning(adapter), image=image, height=H, width=W, num_inference_steps=2)


def test_bad_request(adapter):
    cond = conditioning(adapter)
    for kw, match in [(dict(height=72), "height"), (dict(width=0), "width"), (dict(height=64.0), "height"),
                      (dict(height=True), "height"),
                      (dict(num_frames=5), "num_frames"), (dict(num_inference_steps=0), "num_inference_steps"),
                      (dict(latents=torch.zeros(1, 4, 8, 8)), "latents"), (dict(video=rgb(1)), "video")]:
        with pytest.raises((InputError, TaskError), match=match):
            run(adapter, cond, **kw)
    with pytest.raises(InputError, match="pooled_prompt_embeds"):
        run(adapter, dataclasses.replace(cond, pooled_prompt_embeds=None))
    with pytest.raises(InputError, match="negative_prompt_embeds"):
        run(adapter, dataclasses.replace(cond, negative_prompt_embeds=None), true_cfg_scale=2.0)
    with pytest.raises(InputError, match="negative_canvas_states"):
        run(adapter, dataclasses.replace(cond, negative_canvas_states=None), true_cfg_scale=2.0)
    with pytest.raises(InputError, match="canvas_states"):
        run(adapter, dataclasses.replace(cond, canvas_states=cond.canvas_states[:, :3]))
    with pytest.raises(InputError, match="prompt_embeds"):
        run(adapter, dataclasses.replace(cond, prompt_embeds=cond.prompt_embeds[..., :5]))
