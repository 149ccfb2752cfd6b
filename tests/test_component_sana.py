"""SANA components: the denoise step, DC-AE encoder and decoder exported to ONNX and held to the PyTorch
reference, one call at a time (the parity gate) and over a whole text-to-image run (the loop against the
adapter's sampler).

Tiny preset, CPU: 64x64 images (16x16 latents = 16x16 DiT tokens, DC-AE stride 4), 4 Euler steps, CFG 4.5,
canvas layers randomised. Every graph is exported with onnxscript's optimizer off (it folds the linear
attentions' `+ 1e-15` away, see below) and then ORT-optimised, as a bundle ships it. The step and
decoder graphs are the session's SANA bundle's (conftest's `bundles`: the same components, weights and default
ranges as here, gated at build time); the raw exports' graph checks ran inside `export_component` during that
build. The DC-AE encoder is exported here, once (~15 s on 2 cores): a SANA bundle is text-to-image only and has
no encoder stage.

Loop tolerance: cosine >= 0.99999 and max-rel <= 1e-4 on the final latents and on x_N - x_0 (what the loop
added to the noise). One step differs from torch by <= ~5e-7 relative (ORT kernels); 4 Euler steps with
|dt| <= 1 add those up (~1e-6 measured): the budget leaves ~50x margin for other CPUs' kernels.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from onnx import numpy_helper

from metacanvas_deploy.calib.graph import optimize_for_ort
from metacanvas_deploy.mc_export.components.ranges import default_ranges
from metacanvas_deploy.mc_export.components.sana import SanaDenoise, SanaVaeDecoder, SanaVaeEncoder
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.export.onnx_export import (
    check_graph,
    compare,
    export_component,
    parity_gate,
)
from metacanvas_deploy.mc_export.models.backbones.common import image_to_tensor, prepare_canvas
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.runtime.bundle import load_bundle
from metacanvas_deploy.runtime.schedulers import make_plan

H, W, TOK, STEPS, GUIDANCE = 64, 64, 16, 4, 4.5
LOOP_MAX_REL, LOOP_MIN_COSINE = 1e-4, 0.99999
GATE_CASES = {  # stage -> parity cases beyond opt and min: one branch, the largest size, non-square grids
    "denoise": {"rows1": dict(which="opt", seed=103, overrides={"rows": 1}), "max": dict(which="max", seed=104),
                "rect": dict(which="opt", seed=105, overrides={"h_tok": 8, "w_tok": 12, "prompt_tokens": 16})},
    "vae_encoder": {"rect": dict(which="opt", seed=103, overrides={"batch": 1, "h_tok": 12, "w_tok": 8})},
    "vae_decoder": {"rect": dict(which="opt", seed=103, overrides={"batch": 1, "h_tok": 8, "w_tok": 12})},
}
STAGES = ["denoise", "vae_encoder", "vae_decoder"]
# How conftest's `bundles` builds its models: the torch references below must hold the bundle's weights.
BUNDLE_SOURCE = {"preset": "tiny", "seed": 0, "random_canvas": True}


@pytest.fixture(scope="module")
def model() -> MetaCanvas:
    return MetaCanvas.from_preset("sana", BUNDLE_SOURCE["preset"], seed=BUNDLE_SOURCE["seed"],
                                  random_canvas=BUNDLE_SOURCE["random_canvas"])


@pytest.fixture(scope="module")
def ranges(model):
    return default_ranges(model.adapter, model.defaults, model.cfg.max_prompt_tokens)


@pytest.fixture(scope="module")
def exported(model, ranges, bundles, tmp_path_factory):
    """stage -> (component, onnx path): the components built here (the torch references); the step and decoder
    graphs from the session's bundle, the encoder graph exported and ORT-optimised here as a build would."""
    bundle = load_bundle(bundles["sana"])
    build = json.loads(bundle.manifest.to_json())["build"]
    assert build["source"] == BUNDLE_SOURCE and build["ranges"] == ranges.to_json()
    result = {}
    for comp in (SanaDenoise(model, ranges, history=0), SanaVaeDecoder(model, ranges)):
        assert bundle.manifest.engines[comp.spec.stage].external_data == ()  # one file per graph, weights inside
        result[comp.spec.stage] = comp, bundle.engine_path(comp.spec.stage)
    # The one export of this file: the bundle has no encoder stage (SANA's tasks are t2i only).
    encoder = SanaVaeEncoder(model, ranges)
    raw = tmp_path_factory.mktemp("sana_components") / "vae_encoder.raw.onnx"
    assert export_component(encoder, raw) == [raw]
    optimize_for_ort(raw, raw.with_name("vae_encoder.onnx"))
    result["vae_encoder"] = encoder, raw.with_name("vae_encoder.onnx")
    return {stage: result[stage] for stage in STAGES}


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --- specs ---------------------------------------------------------------------------------------------------
def test_specs(exported, model):
    s = exported["denoise"][0].spec
    c, d = model.adapter.latent_channels, model.cfg
    assert s.input_names == ["sample", "prompt_embeds", "canvas", "timestep", "guidance_scale", "coefficients",
                             "prompt_mask"]
    dims = {t.name: (t.dtype, t.dims) for t in s.inputs + s.outputs}
    assert dims["sample"] == dims["next_sample"] == ("float32", (1, c, "h_tok", "w_tok"))  # patch 1
    assert dims["prompt_mask"] == ("int64", ("rows", "prompt_tokens"))
    assert dims["canvas"] == ("float32", ("rows", 1, "h_tok", "w_tok", d.dit_dim))
    enc, dec = exported["vae_encoder"][0].spec, exported["vae_decoder"][0].spec
    assert [t.dims for t in enc.inputs + enc.outputs] == [("batch", 3, "4*h_tok", "4*w_tok"),
                                                          ("batch", c, "h_tok", "w_tok")]
    assert [t.dims for t in dec.inputs + dec.outputs] == [("batch", c, "h_tok", "w_tok"),
                                                          ("batch", "4*h_tok", "4*w_tok", 3)]
    assert dec.outputs[0].dtype == "uint8"
    assert not any(comp.spec.optimize for comp, _ in exported.values())  # every graph holds a `+ 1e-15`


@pytest.mark.parametrize("stage", STAGES)
def test_manifest_entry(exported, stage):
    comp, path = exported[stage]
    entry = comp.spec.engine_entry(path.name, "onnxruntime", ort.__version__, "fp32")
    assert json.loads(json.dumps(entry.to_dict()))["extra"] == comp.runtime_facts()


def test_onnx_interface_matches_spec(exported):
    for comp, path in exported.values():
        g = onnx.load(str(path), load_external_data=False).graph
        assert [i.name for i in g.input] == comp.spec.input_names
        assert [o.name for o in g.output] == comp.spec.output_names
        check_graph(path)


def test_sample_inputs_are_meaningful(exported, model):
    comp = exported["denoise"][0]
    plan = make_plan(comp.config, model.defaults.num_inference_steps)
    for seed in range(4):
        feeds = comp.sample_inputs("opt", seed=seed)
        mask = feeds["prompt_mask"]
        assert set(np.unique(mask)) <= {0, 1} and (mask.sum(1) >= 1).all() and mask.dtype == np.int64
        assert not feeds["prompt_embeds"][mask == 0].any()  # padding is zero, as the planner stage writes it
        i = plan.timesteps.index(float(feeds["timestep"][0]))
        assert np.array_equal(feeds["coefficients"], plan.coefficient_array()[i].astype(np.float32))
        assert feeds["guidance_scale"][0] == GUIDANCE


# --- the parity gate ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_parity_gate(exported, stage):
    comp, path = exported[stage]
    cases = {"opt": dict(which="opt", seed=101), "min": dict(which="min", seed=102)} | GATE_CASES[stage]
    rows = parity_gate(comp, path, cases)
    print("\n".join(r.fmt() for r in rows))


def eps_constants(path) -> list[float]:
    """Float32 scalars in (0, 1e-9] held by the graph: the linear attentions' denominators' eps."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    values = [numpy_helper.to_array(t) for t in tensors]
    return [float(v.ravel()[0]) for v in values if v.size == 1 and v.dtype == np.float32 and 0 < v.ravel()[0] <= 1e-9]


@pytest.mark.parametrize("stage", STAGES)
def test_linear_attention_eps_survives_export(exported, stage):
    """All-zero latents/pixels/text/canvas: every output finite and equal to torch. With onnxscript's optimizer
    on, the eps is folded away and the DC-AE encoder returns NaN here."""
    comp, path = exported[stage]
    assert np.float32(1e-15) in np.float32(eps_constants(path))
    feeds = comp.sample_inputs("min", seed=7)
    for name in ("sample", "prompt_embeds", "canvas", "image", "latents"):
        if name in feeds:
            feeds[name] = np.zeros_like(feeds[name])
    outs = session(path).run(comp.spec.output_names, feeds)
    ref = comp.reference(feeds)
    for name, out in zip(comp.spec.output_names, outs):
        assert np.isfinite(out).all()
        row = compare(stage, "zeros", name, out, ref[name])
        assert row.max_rel <= comp.spec.tolerance.max_rel, row.fmt()


# --- the real oracle: a whole text-to-image run in ONNX vs the adapter's sampler -------------------------------
def planner_outputs(model, use_cfg: bool) -> tuple:
    """The planner stage's outputs as the runtime receives them: rows = [negative, positive] or [positive]."""
    with torch.no_grad():
        cond = model.encode("a red cube on a blue sphere", "" if use_cfg else None)
        canvas = prepare_canvas(model.canvas_prep, cond, use_cfg, 1, TOK, TOK)  # (rows, 1, 16, 16, D)
    embeds, mask = cond.prompt_embeds, cond.prompt_mask
    if use_cfg:
        embeds = torch.cat([cond.negative_prompt_embeds, embeds])
        mask = torch.cat([cond.negative_prompt_mask, mask])
    return cond, {"prompt_embeds": embeds.numpy(), "prompt_mask": mask.numpy().astype(np.int64),
                  "canvas": canvas.numpy()}


def initial_noise(model) -> torch.Tensor:
    return torch.randn(1, model.adapter.latent_channels, TOK, TOK, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=[GUIDANCE, 1.0], ids=["cfg", "no-cfg"])
def t2i(request, model, exported):
    guidance = request.param
    cond, feeds = planner_outputs(model, guidance > 1)
    x0 = initial_noise(model)
    ref = model.adapter.sample("t2i", cond, height=H, width=W, num_inference_steps=STEPS, guidance_scale=guidance,
                               latents=x0)
    comp, path = exported["denoise"]
    plan = make_plan(comp.config, STEPS)
    coefficients = plan.coefficient_array().astype(np.float32)  # (N, 3, 3)
    feeds["guidance_scale"] = np.array([guidance], np.float32)
    sess, x = session(path), x0.numpy()
    for i, t in enumerate(plan.timesteps):
        x = sess.run(["next_sample"], feeds | {"sample": x, "timestep": np.array([t], np.float32),
                                               "coefficients": coefficients[i]})[0]
    return dict(x0=x0.numpy(), ours=x, ref=ref.latents.numpy(), ref_frames=ref.frames,
                rows=feeds["prompt_mask"].shape[0], guidance=guidance)


def test_loop_matches_adapter(t2i):
    assert t2i["rows"] == (2 if t2i["guidance"] > 1 else 1)
    for name, ours, ref in [("final latents", t2i["ours"], t2i["ref"]),
                            ("x_N - x_0", t2i["ours"] - t2i["x0"], t2i["ref"] - t2i["x0"])]:
        row = compare("denoise", "loop", name, ours, ref)
        print(row.fmt())  # pytest -s shows the measured margins
        assert row.max_rel <= LOOP_MAX_REL and row.cosine >= LOOP_MIN_COSINE, row.fmt()
    assert np.abs(t2i["ref"] - t2i["x0"]).max() > 0.5  # the loop really moved the latents


def test_decoded_frames_match_adapter(t2i, exported):
    """ONNX decoder on the ONNX loop's latents vs the adapter's decode of its own: within one uint8 level."""
    frames = session(exported["vae_decoder"][1]).run(None, {"latents": t2i["ours"]})[0]
    ref = t2i["ref_frames"][:, 0]  # (1, H, W, 3)
    assert frames.dtype == np.uint8 and frames.shape == ref.shape == (1, H, W, 3)
    diff = np.abs(frames.astype(np.int16) - ref)
    print(f"frames: max diff {diff.max()} level(s), {(diff > 0).sum()} of {diff.size} values differ")
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert (ref > 0).mean() > 0.5 and (ref < 255).mean() > 0.5  # not a saturated image


def test_encoder_matches_dc_ae(model, exported):
    """ONNX encoder on host-made pixels vs diffusers' DC-AE on the adapters' pixels, times scaling_factor."""
    image = np.random.default_rng(11).integers(0, 256, (H, W, 3), dtype=np.uint8)
    pixels = np.ascontiguousarray((image.astype(np.float32)[None] / 255.0 * 2.0 - 1.0).transpose(0, 3, 1, 2))
    reference_pixels = image_to_tensor(image, H, W)
    assert np.array_equal(pixels, reference_pixels.numpy())
    with torch.no_grad():
        ref = (model.vae.encode(reference_pixels).latent * model.vae.config.scaling_factor).numpy()
    ours = session(exported["vae_encoder"][1]).run(None, {"image": pixels})[0]
    row = compare("vae_encoder", "dc-ae", "latents", ours, ref)
    tol = exported["vae_encoder"][0].spec.tolerance
    print(row.fmt())
    assert row.max_rel <= tol.max_rel and row.cosine >= tol.min_cosine, row.fmt()


# --- multistep state (K > 0) ------------------------------------------------------------------------------------
def test_history_must_match_the_plan(model, ranges):
    with pytest.raises(ConfigError, match="history K=0"):
        SanaDenoise(model, ranges, history=2)


def test_multistep_state_loop_in_torch(model, ranges):
    """With a UniPC scheduler (K = 2) the step module carries the state through its inputs and outputs; feeding
    them back reproduces the adapter's sampler. Torch only: the ONNX export of the state is the same elementwise
    algebra as the Euler update the loop tests above cover."""
    unipc = dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=1000, prediction_type="flow_prediction",
                 use_flow_sigmas=True, flow_shift=3.0, solver_order=2, solver_type="bh2", lower_order_final=True,
                 predict_x0=True)
    euler, model.adapter.scheduler = model.adapter.scheduler, UniPCMultistepScheduler.from_config(unipc)
    try:
        comp = SanaDenoise(model, ranges, history=2)
        specs = {t.name: t.dims for t in comp.spec.inputs + comp.spec.outputs}
        assert specs["history"] == specs["next_history"] == (2, 1, 4, "h_tok", "w_tok")
        assert comp.spec.output_names == ["next_sample", "next_last_sample", "next_history"]
        cond, feeds = planner_outputs(model, True)
        x0 = initial_noise(model)
        ref = model.adapter.sample("t2i", cond, height=H, width=W, num_inference_steps=STEPS,
                                   guidance_scale=GUIDANCE, latents=x0).latents.numpy()
        plan = make_plan(comp.config, STEPS)
        x = x0.numpy()
        state = {"last_sample": np.zeros_like(x), "history": np.zeros((2, *x.shape), np.float32)}
        feeds["guidance_scale"] = np.array([GUIDANCE], np.float32)
        for i, t in enumerate(plan.timesteps):
            out = comp.reference(feeds | state | {"sample": x, "timestep": np.array([t], np.float32),
                                                  "coefficients": plan.coefficient_array()[i].astype(np.float32)})
            x, state = out["next_sample"], {"last_sample": out["next_last_sample"], "history": out["next_history"]}
        row = compare("denoise", "unipc", "final latents", x, ref)
        assert row.max_rel <= LOOP_MAX_REL and row.cosine >= LOOP_MIN_COSINE, row.fmt()
    finally:
        model.adapter.scheduler = euler
