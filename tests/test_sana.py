"""SANA adapter: parity with diffusers' SanaPipeline, the canvas effect, every error path.

Tiny preset, CPU: 64x64 images (16x16 DC-AE latents, patch 1: 256 DiT tokens), 3 Euler steps, CFG batched.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

from metacanvas_deploy.mc_export.errors import ConfigError, InputError, TaskError
from metacanvas_deploy.mc_export.models.backbones.base import Conditioning
from metacanvas_deploy.mc_export.models.backbones.sana import SanaAdapter
from metacanvas_deploy.mc_export.models.connectors import CanvasInjector, CanvasPrep, randomize_zero_layers
from metacanvas_deploy.mc_export.models.presets import get_preset

H, W, STEPS, GUIDANCE = 64, 64, 3, 4.5
# Every comparison with the pipeline is exact (torch.equal): SanaPipeline batches [negative, positive] in one
# call exactly as the adapter does, so the same kernels see the same tensors.


def build(seed: int = 0) -> SanaAdapter:
    preset = get_preset("sana", "tiny")
    cfg = preset.metacanvas
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(**preset.transformer).eval()
    vae = AutoencoderDC(**preset.vae).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(preset.scheduler)
    return SanaAdapter(transformer, vae, scheduler, cfg, CanvasPrep(cfg).eval(), CanvasInjector(cfg).eval())


def conditioning(adapter: SanaAdapter, canvas: bool = True, batch: int = 1, seed: int = 1) -> Conditioning:
    """Random conditioning with padded prompts: the last 2 of 8 positions are padding (zero, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    cfg = adapter.cfg
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[:, 6:] = 0
    embeds = lambda: torch.randn(batch, 8, cfg.text_dim, generator=g) * mask[..., None]  # noqa: E731
    states = lambda: torch.randn(batch, cfg.canvas_tokens, cfg.mllm_dim, generator=g) if canvas else None  # noqa: E731
    return Conditioning(prompt_embeds=embeds(), prompt_mask=mask, canvas_states=states(),
                        negative_prompt_embeds=embeds(), negative_prompt_mask=mask.clone(),
                        negative_canvas_states=states())


def run(adapter: SanaAdapter, cond: Conditioning, seed: int = 0, **kw):
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE) | kw
    return adapter.sample("t2i", cond, generator=torch.Generator().manual_seed(seed), **kw)


def pipeline_run(adapter: SanaAdapter, cond: Conditioning, seed: int = 0, **kw):
    """The stock SanaPipeline on the SAME transformer/VAE/scheduler objects, no text encoder, no binning."""
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=adapter.vae, transformer=adapter.transformer,
                        scheduler=adapter.scheduler)
    guidance = kw.pop("guidance_scale", GUIDANCE)
    negative = dict(negative_prompt=None, negative_prompt_embeds=cond.negative_prompt_embeds,
                    negative_prompt_attention_mask=cond.negative_prompt_mask) if guidance > 1.0 else {}
    kw = dict(prompt_embeds=cond.prompt_embeds, prompt_attention_mask=cond.prompt_mask, height=H, width=W,
              num_inference_steps=STEPS, guidance_scale=guidance, use_resolution_binning=False,
              generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False) | negative | kw
    return pipe(**kw)[0]


@pytest.fixture(scope="module")
def adapter() -> SanaAdapter:
    return build()


@pytest.fixture(scope="module")
def random_canvas(adapter) -> SanaAdapter:
    """The same DiT and VAE with a second adapter whose zero-initialised canvas layers are random."""
    prep, injector = copy.deepcopy(adapter.canvas_prep), copy.deepcopy(adapter.injector)
    g = torch.Generator().manual_seed(3)
    randomize_zero_layers(prep, g, std=0.5)
    randomize_zero_layers(injector, g, std=0.5)
    other = SanaAdapter(adapter.transformer, adapter.vae, adapter.scheduler, adapter.cfg, prep, injector)
    yield other
    other.hook.remove()


# --- oracle: diffusers' SanaPipeline --------------------------------------------------------------------------
@pytest.mark.parametrize("canvas", [True, False], ids=["zero-canvas", "no-canvas"])
def test_matches_sana_pipeline(adapter, canvas):
    """Seeded noise, masks, batched CFG and Euler steps all equal the pipeline's, bit for bit."""
    cond = conditioning(adapter, canvas=canvas)
    out = run(adapter, cond)
    assert torch.equal(out.latents, pipeline_run(adapter, cond))
    assert out.frames.shape == (1, 1, H, W, 3) and out.frames.dtype == np.uint8
    assert out.negative_prompt_embeds is cond.negative_prompt_embeds


def test_no_cfg_and_given_latents_match_sana_pipeline(adapter):
    cond = conditioning(adapter, batch=2)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    out = run(adapter, cond, guidance_scale=1.0, latents=latents)
    assert torch.equal(out.latents, pipeline_run(adapter, cond, guidance_scale=1.0, latents=latents))
    assert out.negative_prompt_embeds is None and out.frames.shape == (2, 1, H, W, 3)


def test_decoded_frames_match_sana_pipeline(adapter):
    cond = conditioning(adapter, canvas=False)
    out = run(adapter, cond, num_inference_steps=2)
    ref = pipeline_run(adapter, cond, num_inference_steps=2, output_type="pil")[0]
    assert np.array_equal(out.frames[0, 0], np.asarray(ref))


# --- the canvas ----------------------------------------------------------------------------------------------
def test_random_canvas_changes_output(random_canvas):
    cond = conditioning(random_canvas)
    with_canvas = run(random_canvas, cond).latents
    without = run(random_canvas, dataclasses.replace(cond, canvas_states=None, negative_canvas_states=None)).latents
    assert not torch.allclose(with_canvas, without, atol=1e-4)
    other = run(random_canvas, dataclasses.replace(cond, canvas_states=cond.canvas_states + 1.0)).latents
    assert not torch.allclose(with_canvas, other, atol=1e-4)


def test_canvas_hook_adds_injector_output(random_canvas):
    """The tokens leaving patch_embed are exactly injector(stock tokens, canvas, t) on the 16x16 grid."""
    a = random_canvas
    g = torch.Generator().manual_seed(11)
    latents, canvas = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 1, 16, 16, a.cfg.dit_dim, generator=g)
    t = torch.tensor([900.0, 300.0])
    seen = []
    handle = a.transformer.patch_embed.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    try:
        a.denoise(latents, t, torch.randn(2, 8, a.cfg.text_dim, generator=g), torch.ones(2, 8), canvas)
    finally:
        handle.remove()
    stock = a.transformer.patch_embed(latents)  # (2, 256, D): no call bound, stock output
    expected = a.injector(stock, canvas.reshape(2, 256, -1), t, 16, 16)
    assert torch.equal(seen[0], expected) and not torch.allclose(seen[0], stock)


def test_canvas_prepared_once_per_request(random_canvas):
    calls = []
    handle = random_canvas.canvas_prep.register_forward_hook(lambda *args: calls.append(1))
    try:
        run(random_canvas, conditioning(random_canvas))
    finally:
        handle.remove()
    assert len(calls) == 1  # one call for both CFG branches, never per step


# --- geometry and inputs -------------------------------------------------------------------------------------
def test_token_grid(adapter):
    assert adapter.token_grid(64, 96) == (1, 16, 24)
    adapter.check_shape(36, 40)  # multiples of the tiny DC-AE stride 4


def test_wrong_backbone_config(adapter):
    cfg = get_preset("flux", "tiny").metacanvas
    with pytest.raises(ConfigError, match="sana"):
        SanaAdapter(adapter.transformer, adapter.vae, adapter.scheduler, cfg, CanvasPrep(cfg), CanvasInjector(cfg))


@pytest.mark.parametrize("task, match", [("edit", "not served"), ("i2v", "not served"), ("paint", "unknown task")])
def test_tasks_the_backbone_does_not_serve(adapter, task, match):
    with pytest.raises(TaskError, match=match):
        adapter.sample(task, conditioning(adapter), height=H, width=W, num_inference_steps=2, guidance_scale=4.5)


@pytest.mark.parametrize("inputs", [dict(image=PIL.Image.new("RGB", (W, H))), dict(video=np.zeros((5, H, W, 3))),
                                    dict(reference_images=[PIL.Image.new("RGB", (W, H))])])
def test_t2i_takes_no_pixels(adapter, inputs):
    with pytest.raises(TaskError, match="text-only"):
        run(adapter, conditioning(adapter), **inputs)


def test_bad_request(adapter):
    cond = conditioning(adapter)
    for kw, match in [(dict(height=66), "height"), (dict(width=-4), "width"), (dict(num_frames=2), "num_frames"),
                      (dict(num_inference_steps=0), "num_inference_steps"),
                      (dict(latents=torch.zeros(1, 4, 8, 8)), "latents")]:
        with pytest.raises(InputError, match=match):
            run(adapter, cond, **kw)
    for field, value, match in [("negative_prompt_embeds", None, "negative_prompt_embeds"),
                                ("negative_canvas_states", None, "negative_canvas_states"),
                                ("negative_prompt_mask", None, "negative_prompt_mask"),
                                ("prompt_mask", torch.ones(1, 5), "prompt_mask"),
                                ("canvas_states", cond.canvas_states[:, :3], "canvas_states"),
                                ("prompt_embeds", cond.prompt_embeds[..., :5], "prompt_embeds")]:
        with pytest.raises(InputError, match=match):
            run(adapter, dataclasses.replace(cond, **{field: value}))
