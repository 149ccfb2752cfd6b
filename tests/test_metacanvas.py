"""The whole reference system: prompt -> planner -> connectors -> backbone, checkpoints, presets, CLI.

Adapters are proven against diffusers' pipelines in test_wan/test_flux/test_sana and the planner against
transformers in test_planner; here the same oracles are applied to the assembled system loaded from checkpoint
folders, plus what only the assembly can get wrong.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from metacanvas_deploy.mc_export.__main__ import main
from metacanvas_deploy.mc_export.errors import CheckpointError, ConfigError, InputError, TaskError
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.mc_export.models.presets import get_preset

IMG = (np.random.RandomState(0).rand(48, 40, 3) * 255).astype(np.uint8)
TASKS = {"t2i": "sana", "edit": "flux", "t2v": "wan", "i2v": "wan", "v2v": "wan", "r2v": "wan"}


def task_inputs(task: str, model: MetaCanvas) -> dict:
    d = model.defaults
    rng = np.random.RandomState(1)
    return {
        "edit": {"image": IMG}, "i2v": {"image": IMG}, "r2v": {"reference_images": [IMG, IMG[::-1]]},
        "v2v": {"video": (rng.rand(d.num_frames, d.height, d.width, 3) * 255).astype(np.uint8)},
    }.get(task, {})


@pytest.fixture(scope="module")
def models() -> dict[str, MetaCanvas]:
    return {b: MetaCanvas.from_preset(b, "tiny", seed=0, random_canvas=True) for b in ("wan", "flux", "sana")}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_runs_from_a_prompt(models, task):
    model = models[TASKS[task]]
    d = model.defaults
    out = model.generate(task, "a red fox in the snow", **task_inputs(task, model), num_inference_steps=2, seed=3)
    assert out.frames.dtype == np.uint8
    assert out.frames.shape == (1, d.num_frames, d.height, d.width, 3)
    assert torch.isfinite(out.latents).all()
    again = model.generate(task, "a red fox in the snow", **task_inputs(task, model), num_inference_steps=2, seed=3)
    assert torch.equal(out.latents, again.latents), "same seed, same inputs must give the same latents"
    other = model.generate(task, "a blue bird", **task_inputs(task, model), num_inference_steps=2, seed=3)
    assert not torch.equal(out.latents, other.latents), "the prompt must reach the DiT"


@pytest.mark.parametrize("backbone", ["wan", "flux", "sana"])
def test_planner_and_canvas_prep_run_once_per_request(models, backbone):
    model = models[backbone]
    task = {"wan": "t2v", "flux": "edit", "sana": "t2i"}[backbone]
    calls = {"planner": 0, "canvas_prep": 0, "injector": 0}
    handles = [getattr(model, name).register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
               for name in calls]
    try:
        model.generate(task, "a fox", **task_inputs(task, model), num_inference_steps=3)
    finally:
        for h in handles:
            h.remove()
    assert calls["planner"] == 1 and calls["canvas_prep"] == 1
    assert calls["injector"] == 3, "the injector runs once per denoising step (both CFG branches batched)"


@pytest.mark.parametrize("task", ["t2i", "edit", "t2v"])
def test_canvas_changes_the_output(task):
    """Random canvas layers change the latents; the same model with the canvas' output layers zeroed does not
    differ from one that has no canvas at all."""
    backbone = TASKS[task]
    model = MetaCanvas.from_preset(backbone, "tiny", seed=0, random_canvas=True)
    kw = dict(task_inputs(task, model), num_inference_steps=2, seed=0)
    with_canvas = model.generate(task, "a fox", **kw).latents
    with torch.no_grad():
        for m in (model.canvas_prep.out, model.injector.out):
            m.weight.zero_()
            m.bias.zero_()
    zero_canvas = model.generate(task, "a fox", **kw).latents
    assert (with_canvas - zero_canvas).abs().max() > 1e-3


@pytest.mark.parametrize("backbone", ["wan", "flux", "sana"])
def test_checkpoint_round_trip_is_bit_exact(models, backbone, tmp_path):
    model = models[backbone]
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MetaCanvas.from_pretrained(tmp_path / "ckpt")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    task = {"wan": "i2v", "flux": "edit", "sana": "t2i"}[backbone]
    kw = dict(task_inputs(task, model), num_inference_steps=2, seed=1)
    assert torch.equal(model.generate(task, "a fox", **kw).latents, loaded.generate(task, "a fox", **kw).latents)


def _stock_pipeline(backbone: str, ckpt):
    """The diffusers pipeline built from the checkpoint's own folders (no text encoder: embeddings are given)."""
    import diffusers

    from metacanvas_deploy.mc_export.backbones import get

    t_cls, v_cls = get(backbone).diffusers_classes()
    parts = dict(transformer=t_cls.from_pretrained(ckpt / "transformer"), vae=v_cls.from_pretrained(ckpt / "vae"))
    sched_cfg = json.loads((ckpt / "scheduler" / "scheduler_config.json").read_text())
    parts["scheduler"] = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    if backbone == "wan":
        return diffusers.WanPipeline(tokenizer=None, text_encoder=None, expand_timesteps=True, **parts)
    if backbone == "flux":
        return diffusers.FluxKontextPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None,
                                             tokenizer_2=None, **parts)
    return diffusers.SanaPipeline(tokenizer=None, text_encoder=None, **parts)


@pytest.mark.parametrize("backbone", ["wan", "flux", "sana"])
def test_zero_canvas_equals_diffusers_pipeline_from_the_same_folders(backbone, tmp_path):
    """With the canvas layers at zero (as at the start of training) the system is the stock backbone fed by the
    planner's embeddings: final latents equal diffusers' pipeline built from the same checkpoint folders.
    Tolerance: 1e-5 relative or 1e-5 absolute: both sides run the same kernels on the same weights; batching the
    two CFG branches in one call (we do, WanPipeline does not) only reorders float sums (measured: 0 on AVX2;
    1.5e-6 absolute on one Wan latent of magnitude 0.04 on AVX-512, whose GEMM kernels block batches differently)."""
    overrides = {"condition_channels": 0} if backbone == "wan" else None
    model = MetaCanvas.from_preset(backbone, "tiny", seed=2, overrides=overrides)  # zero canvas layers
    model.save_pretrained(tmp_path / "ckpt")
    model = MetaCanvas.from_pretrained(tmp_path / "ckpt")
    pipe = _stock_pipeline(backbone, tmp_path / "ckpt")
    d = model.defaults
    task = {"wan": "t2v", "flux": "edit", "sana": "t2i"}[backbone]
    ours = model.generate(task, "a fox", "blurry", **task_inputs(task, model), num_inference_steps=3, seed=4)
    cond = model.encode("a fox", "blurry" if backbone != "flux" else None,
                        images=[IMG] if backbone == "flux" else None)
    kw = dict(prompt_embeds=cond.prompt_embeds, latents=None, num_inference_steps=3, height=d.height, width=d.width,
              output_type="latent", generator=torch.Generator().manual_seed(4))
    if backbone == "wan":
        kw.update(negative_prompt_embeds=cond.negative_prompt_embeds, num_frames=d.num_frames,
                  guidance_scale=d.guidance_scale)
    elif backbone == "sana":
        kw.update(negative_prompt=None, negative_prompt_embeds=cond.negative_prompt_embeds,
                  prompt_attention_mask=cond.prompt_mask,
                  negative_prompt_attention_mask=cond.negative_prompt_mask, guidance_scale=d.guidance_scale,
                  use_resolution_binning=False)
    else:
        from PIL import Image

        kw.update(image=Image.fromarray(IMG).resize((d.width, d.height), Image.LANCZOS),
                  pooled_prompt_embeds=cond.pooled_prompt_embeds, guidance_scale=d.guidance_scale,
                  _auto_resize=False, max_area=d.height * d.width)
    theirs = pipe(**kw)[0]
    ours_latents = ours.latents
    if backbone == "flux":
        theirs = theirs.reshape(ours_latents.shape)
    torch.testing.assert_close(ours_latents, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone,dit_width,layers,params_b,canvas", [
    ("wan", 3072, 30, 5.0, 660), ("flux", 3072, 19 + 38, 11.9, 1024), ("sana", 2240, 20, 1.6, 256)])
def test_full_presets_instantiate_on_meta_with_the_papers_sizes(backbone, dit_width, layers, params_b, canvas):
    model = MetaCanvas.from_preset(backbone, "full", device="meta")
    c = model.transformer.config
    assert c.num_attention_heads * c.attention_head_dim == dit_width
    assert (c.num_layers + c.get("num_single_layers", 0)) == layers
    n = sum(p.numel() for p in model.transformer.parameters()) / 1e9
    assert abs(n - params_b) < 0.1, f"{backbone} DiT has {n:.2f}B parameters"
    assert model.cfg.canvas_tokens == canvas
    text = model.planner.qwen.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (3584, 28, 28)  # Qwen2.5-VL-7B
    assert all(p.device.type == "meta" for p in model.parameters())


def test_wan_latent_layout_at_full_size():
    """704x1280, 121 frames: 31 latent frames x 22 x 40 tokens (DESIGN), 48 latent channels, 97 input channels."""
    model = MetaCanvas.from_preset("wan", "full", device="meta")
    assert model.adapter.token_grid(704, 1280, 121) == (31, 22, 40)
    assert model.transformer.config.in_channels == 48 + 49


def test_unknown_backbone_preset_and_task_are_clear_errors(models):
    with pytest.raises(ConfigError, match="unknown backbone 'sdxl'"):
        MetaCanvas.from_preset("sdxl", "tiny")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("wan", "huge")
    with pytest.raises(TaskError, match="unknown task 'inpaint'"):
        models["wan"].generate("inpaint", "a fox")
    with pytest.raises(TaskError, match="not served by backbone 'wan'.*t2v, i2v, v2v, r2v"):
        models["wan"].generate("t2i", "a fox")
    with pytest.raises(InputError, match="non-empty"):
        models["sana"].generate("t2i", "   ")
    with pytest.raises(InputError, match="needs an image"):
        models["flux"].generate("edit", "make it blue")


@pytest.fixture(scope="module")
def sana_ckpt(tmp_path_factory, models):
    path = tmp_path_factory.mktemp("ckpt") / "sana"
    models["sana"].save_pretrained(path)
    return path


@pytest.mark.parametrize("part", ["planner/tokenizer.json", "vae/config.json", "metacanvas/model.safetensors"])
def test_checkpoint_missing_a_part_names_it(sana_ckpt, tmp_path, part):
    broken = tmp_path / "broken"
    shutil.copytree(sana_ckpt, broken)
    (broken / part).unlink()
    with pytest.raises(CheckpointError, match=f"missing {part}"):
        MetaCanvas.from_pretrained(broken)


def test_checkpoint_with_mismatched_dims_is_refused(sana_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sana_ckpt, broken)
    cfg = json.loads((broken / "metacanvas" / "config.json").read_text())
    cfg["text_dim"] = 48  # the DiT's caption_channels is 32
    (broken / "metacanvas" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="text of width 32, but metacanvas text_dim is 48"):
        MetaCanvas.from_pretrained(broken)


def test_checkpoint_with_another_backbones_transformer_is_refused(sana_ckpt, models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sana_ckpt, broken)
    shutil.rmtree(broken / "transformer")
    models["flux"].transformer.save_pretrained(broken / "transformer")
    with pytest.raises(CheckpointError, match="holds a FluxTransformer2DModel.*needs a SanaTransformer2DModel"):
        MetaCanvas.from_pretrained(broken)


def test_cli_init_checkpoint_and_reference(tmp_path, capsys):
    ckpt = tmp_path / "wan"
    assert main(["init-checkpoint", "--backbone", "wan", "--preset", "tiny", "--random-canvas", "--out",
                 str(ckpt)]) == 0
    assert main(["reference", "--checkpoint", str(ckpt), "--task", "t2v", "--prompt", "a fox", "--steps", "2",
                 "--out", str(tmp_path / "fox.mp4")]) == 0
    import imageio.v3 as iio

    video = iio.imread(tmp_path / "fox.mp4")
    d = get_preset("wan", "tiny").defaults
    assert video.shape == (d.num_frames, d.height, d.width, 3)
    assert main(["reference", "--checkpoint", str(ckpt), "--task", "edit", "--prompt", "x", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "not served by backbone 'wan'" in capsys.readouterr().err
    assert main(["reference", "--checkpoint", str(tmp_path / "nowhere"), "--task", "t2v", "--prompt", "x",
                 "--out", str(tmp_path / "x.mp4")]) == 2
