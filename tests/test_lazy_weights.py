"""Models larger than memory: structure on `meta`, weights streamed from the checkpoint into the ONNX files.

The oracle is the ordinary load path: transformers' and diffusers' own `from_pretrained` on the same folder. A
lazy build's engines must match the eagerly loaded PyTorch components within each stage's parity tolerance
(the same budget as an ordinary build: the lazy export traces the same code, only the weights arrive another
way), while the lazy model's parameters never leave `meta`. Tiny SANA checkpoint (3 stages, ~50 s to build).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from metacanvas_deploy.mc_export.build import BuildConfig, build, resolve_ranges, use_lazy_weights
from metacanvas_deploy.mc_export.errors import CheckpointError, ConfigError
from metacanvas_deploy.mc_export.export.onnx_export import parity_gate
from metacanvas_deploy.mc_export.models import lazy
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.mc_export.stages import gate_stage, plan_stages
from metacanvas_deploy.mc_export.writer import weights_hash
from metacanvas_deploy.runtime.bundle import load_bundle
from metacanvas_deploy.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("lazy") / "sana"
    MetaCanvas.from_preset("sana", "tiny", seed=0, random_canvas=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eager(checkpoint):
    return MetaCanvas.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def lazy_bundle(checkpoint, tmp_path_factory):
    return build(BuildConfig(out=tmp_path_factory.mktemp("lazy_bundle") / "b", checkpoint=checkpoint, steps=3,
                             lazy_weights="on"), log=lambda *a: None)


def test_lazy_model_holds_no_weights_and_maps_every_parameter(checkpoint, eager):
    model = MetaCanvas.from_pretrained(checkpoint, lazy=True)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # RoPE tables: computed from the configs, for real
    refs = model.lazy_weights.refs(model)
    eager_params = dict(eager.named_parameters(remove_duplicate=False))
    assert set(refs) == set(eager_params)
    for name in ("planner.qwen.model.language_model.layers.0.self_attn.q_proj.base_layer.weight",
                 "planner.canvas_tokens", "transformer.patch_embed.proj.weight", "vae.decoder.conv_in.weight"):
        torch.testing.assert_close(refs[name].load(), eager_params[name], rtol=0, atol=0)


def test_lazy_bundle_matches_the_eagerly_loaded_reference(lazy_bundle, eager):
    """Every engine of the lazy build against transformers/diffusers' own load of the same folder."""
    bundle = load_bundle(lazy_bundle)
    build_info = json.loads(bundle.manifest.to_json())["build"]
    assert build_info["lazy_weights"] is True
    assert set(build_info["parity"].values()) == {"passed"}  # tiny stages fit the budget: each gated alone
    components = plan_stages(eager, resolve_ranges(eager, ()))
    assert set(components) == set(bundle.manifest.engines)
    for stage, comp in components.items():
        rows = parity_gate(comp, bundle.engine_path(stage))  # raises StageParityError on a miss
        assert rows and all(np.isfinite(r.max_abs) for r in rows)


def test_lazy_bundle_generates_like_the_preset_bundle(lazy_bundle, bundles):
    """Same weights (the checkpoint is the preset saved), same request: the same image to within 1 uint8 level
    (the lazy graphs skip onnxscript's optimizer; ORT kernels differ in the last bits)."""
    kw = dict(prompt="a red cube on a table", seed=7, num_inference_steps=3)
    ours = Pipeline.load(lazy_bundle, threads=1)(**kw)
    ref = Pipeline.load(bundles["sana"], threads=1)(**kw)
    assert np.abs(ours.frames.astype(int) - ref.frames.astype(int)).max() <= 1
    a, b = ours.latents.ravel().astype(np.float64), ref.latents.ravel().astype(np.float64)
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.99999


def test_a_stage_over_the_budget_is_not_gated_and_says_where_to_verify(checkpoint, lazy_bundle, monkeypatch):
    model = MetaCanvas.from_pretrained(checkpoint, lazy=True)
    comp = plan_stages(model, resolve_ranges(model, ()))["vae_decoder"]
    monkeypatch.setattr(lazy, "memory_budget", lambda: 1024)
    rows, why = gate_stage(comp, load_bundle(lazy_bundle).engine_path("vae_decoder"), model.lazy_weights)
    assert rows == [] and "budget" in why and "mc_export verify" in why
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("stage", ["planner", "denoise", "vae_decoder"])
def test_a_stage_over_the_budget_is_gated_against_a_reference_streamed_block_by_block(checkpoint, lazy_bundle,
                                                                                      monkeypatch, stage):
    """Budget between (resident weights + the largest block) and the whole stage: the gate runs the reference
    with one block's weights loaded at a time. Its outputs equal the materialised reference's bit for bit (same
    weights, same kernels), the loaded weights never pass resident + largest block, and nothing stays loaded."""
    from metacanvas_deploy.mc_export.models.streaming import resident_bytes, stream_units, streamed

    model = MetaCanvas.from_pretrained(checkpoint, lazy=True)
    comp = plan_stages(model, resolve_ranges(model, ()))[stage]
    module = comp.module()
    resident, block = resident_bytes(module)
    assert stream_units(module) and resident + block <= lazy.fp32_bytes(module)  # tiny SANA: one DiT block
    loaded = []
    for unit in stream_units(module):  # runs after streamed()'s own pre-hook: sees the block loaded
        unit.register_forward_pre_hook(
            lambda *_: loaded.append(sum(4 * p.numel() for p in module.parameters() if not p.is_meta)))
    inputs = comp.sample_inputs("opt", seed=3)
    with lazy.materialized(module, model.lazy_weights):
        expected = comp.reference(inputs)
    loaded.clear()
    with streamed(module, model.lazy_weights):
        got = comp.reference(inputs)
    assert loaded and max(loaded) <= resident + block
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert all(p.is_meta for p in model.parameters())
    monkeypatch.setattr(lazy, "memory_budget", lambda: resident + block)
    rows, why = gate_stage(comp, load_bundle(lazy_bundle).engine_path(stage), model.lazy_weights)
    assert rows and why == ""
    assert all(p.is_meta for p in model.parameters())


def test_materialized_loads_one_module_and_puts_it_back(checkpoint, eager):
    model = MetaCanvas.from_pretrained(checkpoint, lazy=True)
    qwen = model.planner.qwen
    with lazy.materialized(model.planner, model.lazy_weights):
        assert not any(p.is_meta for p in model.planner.parameters())
        assert qwen.lm_head.weight is qwen.model.language_model.embed_tokens.weight  # tied stays tied
        torch.testing.assert_close(model.planner.canvas_tokens, eager.planner.canvas_tokens, rtol=0, atol=0)
        assert all(p.is_meta for p in model.transformer.parameters())  # only what was asked for
    assert all(p.is_meta for p in model.parameters())


def test_auto_mode_goes_lazy_only_above_the_budget(checkpoint, monkeypatch):
    cfg = BuildConfig(out=checkpoint.parent / "x", checkpoint=checkpoint)
    need = lazy.checkpoint_fp32_bytes(checkpoint)
    monkeypatch.setattr(lazy, "memory_budget", lambda: need + 1)
    assert not use_lazy_weights(cfg)
    monkeypatch.setattr(lazy, "memory_budget", lambda: need - 1)
    assert use_lazy_weights(cfg)
    assert not use_lazy_weights(BuildConfig(out=cfg.out, checkpoint=checkpoint, lazy_weights="off"))
    with pytest.raises(ConfigError, match="need --checkpoint"):
        BuildConfig(out=cfg.out, backbone="sana", lazy_weights="on").validate(False)


def test_content_key_follows_the_checkpoint_files(checkpoint, tmp_path):
    a = MetaCanvas.from_pretrained(checkpoint, lazy=True)
    assert weights_hash(a) == weights_hash(MetaCanvas.from_pretrained(checkpoint, lazy=True))
    import shutil

    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    f = copy / "metacanvas" / "model.safetensors"
    sd = load_file(str(f))
    sd["planner.canvas_tokens"] = sd["planner.canvas_tokens"] + 1
    save_file(sd, str(f), metadata={"format": "pt"})
    assert weights_hash(MetaCanvas.from_pretrained(copy, lazy=True)) != weights_hash(a)


def _rewrite(path, fn):
    sd = load_file(str(path))
    save_file(fn(sd), str(path), metadata={"format": "pt"})


def test_legacy_and_module_layout_planner_keys_both_resolve(checkpoint, tmp_path):
    """Published Qwen2.5-VL checkpoints name weights `model.layers.*` / `visual.*`; transformers 5 modules are
    `model.language_model.*` / `model.visual.*`. Either layout on disk maps to the same tensors."""
    import shutil

    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    legacy = lazy.index_part(checkpoint / "planner")
    assert any(k.startswith("model.layers.") for k in legacy) and any(k.startswith("visual.") for k in legacy)

    def modern(sd):
        out = {}
        for k, v in sd.items():
            if k.startswith("visual."):
                k = "model." + k
            elif k.startswith("model.") and not k.startswith("model.visual."):
                k = "model.language_model." + k[len("model."):]
            out[k] = v
        return out

    _rewrite(copy / "planner" / "model.safetensors", modern)
    a = MetaCanvas.from_pretrained(checkpoint, lazy=True)
    b = MetaCanvas.from_pretrained(copy, lazy=True)
    ra, rb = a.lazy_weights.refs(a.planner), b.lazy_weights.refs(b.planner)
    assert set(ra) == set(rb)
    for name in ra:
        torch.testing.assert_close(ra[name].load(), rb[name].load(), rtol=0, atol=0)


@pytest.mark.parametrize("damage, message", [
    (lambda sd: {k: v for k, v in sd.items() if k != "proj_out.weight"}, r"transformer/proj_out.weight \(missing\)"),
    (lambda sd: {**sd, "proj_out.weight": sd["proj_out.weight"][:1]}, r"proj_out.weight has shape"),
])
def test_a_checkpoint_that_does_not_fit_its_config_is_refused(checkpoint, tmp_path, damage, message):
    import shutil

    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    _rewrite(copy / "transformer" / "diffusion_pytorch_model.safetensors", damage)
    with pytest.raises(CheckpointError, match=message):
        MetaCanvas.from_pretrained(copy, lazy=True)


def test_a_corrupt_safetensors_header_is_a_clear_error(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="corrupt"):
        lazy.read_header(f)
    f.write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(CheckpointError, match="cannot read the safetensors header"):
        lazy.read_header(f)


def test_a_lazy_export_folds_weight_transposes_into_the_file(checkpoint, tmp_path):
    """No session transposes (copies) a weight at run time: each Transpose of a checkpoint weight is written
    pre-transposed as `W.T`, exactly (the stage's gate against the eager reference passes on the raw file)."""
    import onnx

    from metacanvas_deploy.mc_export.export.onnx_export import export_component

    model = MetaCanvas.from_pretrained(checkpoint, lazy=True)
    comp = plan_stages(model, resolve_ranges(model, ()))["planner"]
    export_component(comp, tmp_path / "planner.onnx", weights=model.lazy_weights)
    graph = onnx.load(str(tmp_path / "planner.onnx")).graph
    inits = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert any(name.endswith(".T") for name in inits)
    with lazy.materialized(comp.module(), model.lazy_weights):
        assert parity_gate(comp, tmp_path / "planner.onnx")


def test_a_quantized_build_on_a_cached_float_bundle_quantizes_its_raw_stage_file(checkpoint, tmp_path, monkeypatch):
    """A lazy stage over the memory budget ships its raw export (too big for ONNX Runtime's offline optimisation;
    its stage record says so). A quantized build that finds its float bundle in the cache quantizes that very file
    (never exported again: a full-size DiT is 20 GB more on disk), and gets what the build that made the float
    bundle in the same pass got: the same FP8 stage, byte for byte."""
    import dataclasses

    from metacanvas_deploy.mc_export import quantized
    from metacanvas_deploy.mc_export.backbones import recipe_for_backbone

    model = MetaCanvas.from_pretrained(checkpoint, lazy=True)
    denoise = lazy.fp32_bytes(plan_stages(model, resolve_ranges(model, ()))["denoise"].module())
    monkeypatch.setattr(lazy, "memory_budget", lambda: denoise - 1)
    recipe = dataclasses.replace(recipe_for_backbone("sana", "fp8"), calibration_prompts=2, calibration_steps=2,
                                 held_out_prompts=1, held_out_seeds=(1000,), evaluation_steps=2)
    cfg = BuildConfig(out=tmp_path / "a", checkpoint=checkpoint, precision="fp8", steps=2, lazy_weights="on",
                      recipe=recipe)
    build(cfg, log=lambda *a: None)
    records = load_bundle(tmp_path / "a-fp32").manifest.build["stages"]
    assert records["denoise"]["raw_export"] is True
    monkeypatch.setattr(lazy, "memory_budget", lambda: 1 << 40)  # the record decides, not the memory free now

    def exported_again(*args, **kwargs):
        raise AssertionError("the float bundle's raw denoise file was exported again")

    monkeypatch.setattr(quantized, "_raw_export", exported_again)
    build(dataclasses.replace(cfg, out=tmp_path / "b", float_bundle=tmp_path / "a-fp32"), log=lambda *a: None)
    a, b = (load_bundle(tmp_path / n).manifest.engines["denoise"] for n in ("a", "b"))
    assert a.precision == b.precision == "fp8" and a.sha256 == b.sha256
