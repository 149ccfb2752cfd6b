"""FLUX.1-Kontext components: the denoise step, VAE encoder and decoder exported to ONNX and held to the PyTorch
reference, one step at a time (the parity gate) and over a whole edit (the loop against the adapter's sampler).

Tiny preset, CPU: 64x64 images (8x8 latents, 4x4 target tokens + 4x4 context tokens), 4 Euler steps, canvas
layers randomised so that the canvas path is exercised. The graphs are the session's FLUX bundle's (conftest's
`bundles`: the same components, weights and default ranges as here, exported, ORT-optimised and gated once per
session); exporting them here again would cost ~100 s on 2 cores. The raw exports' graph checks (no DOUBLE from
the RoPE patch, no Scatter) ran inside `export_component` during that build, which fails on either.

Loop tolerance: cosine >= 0.99999 and max-rel <= 1e-4 on the final latents AND on what the loop added to the
noise (x_N - x_0, O(1) here). One step of the graph differs from torch by <= ~5e-7 relative (ORT kernels, and
the float32 RoPE of the export patch, <= 2.7e-6 absolute on the tables); 4 Euler steps with |dt| <= 1 add those
errors up without amplifying them: ~1e-6 measured, the budget leaves ~50x margin for other CPUs' kernels.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import PIL.Image
import pytest
import torch

from metacanvas_deploy.mc_export.components.flux import FluxDenoise, FluxVaeDecoder, FluxVaeEncoder
from metacanvas_deploy.mc_export.components.ranges import default_ranges
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.export.onnx_export import check_graph, compare, parity_gate
from metacanvas_deploy.mc_export.export.patches import flux_rope_float32
from metacanvas_deploy.mc_export.models.backbones.common import image_to_tensor, prepare_canvas
from metacanvas_deploy.mc_export.models.backbones.flux import image_ids, pack_latents, unpack_latents
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.runtime.bundle import load_bundle
from metacanvas_deploy.runtime.schedulers import make_plan

H, W, H_TOK, W_TOK, STEPS, GUIDANCE = 64, 64, 4, 4, 4, 2.5
LOOP_MAX_REL, LOOP_MIN_COSINE = 1e-4, 0.99999
GATE_CASES = {  # stage -> parity cases beyond opt and min: one branch, the largest size, non-square grids
    "denoise": {"rows1": dict(which="opt", seed=103, overrides={"rows": 1}), "max": dict(which="max", seed=104),
                "context": dict(which="opt", seed=105, overrides={"h_tok": 3, "w_tok": 5, "hc_tok": 6, "wc_tok": 2})},
    "vae_encoder": {"rect": dict(which="opt", seed=103, overrides={"batch": 1, "hc_tok": 3, "wc_tok": 5})},
    "vae_decoder": {"rect": dict(which="opt", seed=103, overrides={"batch": 1, "h_tok": 5, "w_tok": 3})},
}


# How conftest's `bundles` builds its models: the torch references below must hold the bundle's weights.
BUNDLE_SOURCE = {"preset": "tiny", "seed": 0, "random_canvas": True}


@pytest.fixture(scope="module")
def model() -> MetaCanvas:
    return MetaCanvas.from_preset("flux", BUNDLE_SOURCE["preset"], seed=BUNDLE_SOURCE["seed"],
                                  random_canvas=BUNDLE_SOURCE["random_canvas"])


@pytest.fixture(scope="module")
def ranges(model):
    return default_ranges(model.adapter, model.defaults, model.cfg.max_prompt_tokens)


@pytest.fixture(scope="module")
def exported(model, ranges, bundles):
    """stage -> (component, onnx path): the components built here (the torch references) and the session
    bundle's graphs of the same components, weights and ranges."""
    bundle = load_bundle(bundles["flux"])
    build = json.loads(bundle.manifest.to_json())["build"]
    assert build["source"] == BUNDLE_SOURCE and build["ranges"] == ranges.to_json()
    comps = [FluxDenoise(model, ranges, history=0), FluxVaeEncoder(model, ranges), FluxVaeDecoder(model, ranges)]
    for comp in comps:
        assert bundle.manifest.engines[comp.spec.stage].external_data == ()  # one file per graph, weights inside
    return {comp.spec.stage: (comp, bundle.engine_path(comp.spec.stage)) for comp in comps}


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def host_pixels(image: np.ndarray) -> np.ndarray:
    """The host's recipe for the encoder input (no resize needed at this size): x / 255 * 2 - 1, NCHW."""
    x = image.astype(np.float32)[None] / 255.0 * 2.0 - 1.0  # (1, H, W, 3)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (1, 3, H, W)


# --- specs ---------------------------------------------------------------------------------------------------
def test_specs(exported, model):
    denoise, _ = exported["denoise"]
    s = denoise.spec
    c, d = model.adapter.latent_channels, model.cfg
    assert s.input_names == ["sample", "prompt_embeds", "canvas", "timestep", "guidance_scale", "coefficients",
                             "image_latents", "pooled_prompt_embeds", "guidance"]
    assert s.output_names == ["next_sample"]
    dims = {t.name: t.dims for t in s.inputs + s.outputs}
    assert dims["sample"] == dims["next_sample"] == (1, c, "2*h_tok", "2*w_tok")
    assert dims["image_latents"] == (1, c, "2*hc_tok", "2*wc_tok")
    assert dims["canvas"] == ("rows", 1, "h_tok", "w_tok", d.dit_dim)
    assert dims["coefficients"] == (3, 3) and dims["pooled_prompt_embeds"] == ("rows", d.pooled_dim)
    assert s.dims["hc_tok"] == s.dims["h_tok"] and s.dims["rows"].to_dict() == [1, 2, 2]
    enc, dec = exported["vae_encoder"][0].spec, exported["vae_decoder"][0].spec
    assert [t.dims for t in enc.inputs + enc.outputs] == [("batch", 3, "16*hc_tok", "16*wc_tok"),
                                                          ("batch", c, "2*hc_tok", "2*wc_tok")]
    assert enc.output_names == ["image_latents"]  # feeds the step graph's input of that name
    assert [t.dims for t in dec.inputs + dec.outputs] == [("batch", c, "2*h_tok", "2*w_tok"),
                                                          ("batch", "16*h_tok", "16*w_tok", 3)]
    assert dec.outputs[0].dtype == "uint8"


@pytest.mark.parametrize("stage", ["denoise", "vae_encoder", "vae_decoder"])
def test_manifest_entry(exported, stage):
    """The spec makes a valid manifest entry; its runtime facts are plain JSON."""
    comp, path = exported[stage]
    entry = comp.spec.engine_entry(path.name, "onnxruntime", ort.__version__, "fp32")
    assert json.loads(json.dumps(entry.to_dict()))["extra"] == comp.runtime_facts()
    assert comp.runtime_facts()["backbone"] == "flux"


def test_onnx_interface_matches_spec(exported):
    for comp, path in exported.values():
        g = onnx.load(str(path), load_external_data=False).graph
        assert [i.name for i in g.input] == comp.spec.input_names
        assert [o.name for o in g.output] == comp.spec.output_names
        check_graph(path)  # no DOUBLE (the RoPE patch), no Scatter (image ids from aranges)


def test_sample_inputs_are_meaningful(exported, model):
    comp = exported["denoise"][0]
    plan = make_plan(comp.config, model.defaults.num_inference_steps, image_seq_len=H_TOK * W_TOK)
    feeds = comp.sample_inputs("opt", seed=5)
    i = plan.timesteps.index(float(feeds["timestep"][0]))
    assert np.array_equal(feeds["coefficients"], plan.coefficient_array()[i].astype(np.float32))
    assert feeds["guidance"][0] == GUIDANCE and feeds["guidance_scale"][0] > 1  # rows = 2 at opt: true CFG
    assert comp.sample_inputs("opt", seed=5, overrides={"rows": 1})["guidance_scale"][0] == 1.0
    pixels = exported["vae_encoder"][0].sample_inputs("min")["image"]
    assert pixels.min() >= -1 and pixels.max() <= 1


# --- the parity gate: one call of each graph vs its torch module ----------------------------------------------
@pytest.mark.parametrize("stage", ["denoise", "vae_encoder", "vae_decoder"])
def test_parity_gate(exported, stage):
    comp, path = exported[stage]
    cases = {"opt": dict(which="opt", seed=101), "min": dict(which="min", seed=102)} | GATE_CASES[stage]
    rows = parity_gate(comp, path, cases)
    print("\n".join(r.fmt() for r in rows))


def test_history_must_match_the_plan(model, ranges):
    with pytest.raises(ConfigError, match="history K=0"):
        FluxDenoise(model, ranges, history=2)


# --- the real oracle: a whole edit in ONNX vs the adapter's sampler ---------------------------------------------
def conditioning(model, image, use_cfg: bool):
    """The planner stage's outputs, as the runtime receives them: rows = [negative, positive] or [positive]."""
    with torch.no_grad():
        cond = model.encode("put a red hat on the cat", "" if use_cfg else None, images=[image])
        canvas = prepare_canvas(model.canvas_prep, cond, use_cfg, 1, H_TOK, W_TOK)  # (rows, 1, h, w, D)
    embeds, pooled = cond.prompt_embeds, cond.pooled_prompt_embeds
    if use_cfg:
        embeds = torch.cat([cond.negative_prompt_embeds, embeds])
        pooled = torch.cat([cond.negative_pooled_prompt_embeds, pooled])
    return cond, {"prompt_embeds": embeds.numpy(), "pooled_prompt_embeds": pooled.numpy(), "canvas": canvas.numpy()}


@pytest.fixture(scope="module", params=[1.0, 3.0], ids=["rows1", "true-cfg"])
def edit(request, model, exported):
    """One edit run twice: the adapter's reference sampler and the ONNX engines driven like the runtime."""
    true_cfg = request.param
    image = rgb(7)
    cond, feeds = conditioning(model, image, true_cfg > 1)
    c = model.adapter.latent_channels
    x0 = torch.randn(1, c, 2 * H_TOK, 2 * W_TOK, generator=torch.Generator().manual_seed(3))  # unpacked noise
    ref = model.adapter.sample("edit", cond, image=PIL.Image.fromarray(image), height=H, width=W,
                               num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=pack_latents(x0),
                               true_cfg_scale=true_cfg)
    image_latents = session(exported["vae_encoder"][1]).run(None, {"image": host_pixels(image)})[0]
    comp, path = exported["denoise"]
    plan = make_plan(comp.config, STEPS, image_seq_len=H_TOK * W_TOK)
    coefficients = plan.coefficient_array().astype(np.float32)  # (N, 3, 3)
    feeds |= {"image_latents": image_latents, "guidance": np.array([GUIDANCE], np.float32),
              "guidance_scale": np.array([true_cfg], np.float32)}
    sess, x = session(path), x0.numpy()
    for i, t in enumerate(plan.timesteps):
        x = sess.run(["next_sample"], feeds | {"sample": x, "timestep": np.array([t], np.float32),
                                               "coefficients": coefficients[i]})[0]
    return dict(x0=x0.numpy(), ours=x, ref=unpack_latents(ref.latents, H_TOK, W_TOK).numpy(),
                ref_frames=ref.frames, rows=feeds["prompt_embeds"].shape[0], true_cfg=true_cfg)


def test_loop_matches_adapter(edit):
    assert edit["rows"] == (2 if edit["true_cfg"] > 1 else 1)
    for name, ours, ref in [("final latents", edit["ours"], edit["ref"]),
                            ("x_N - x_0", edit["ours"] - edit["x0"], edit["ref"] - edit["x0"])]:
        row = compare("denoise", "loop", name, ours, ref)
        print(row.fmt())  # pytest -s shows the measured margins
        assert row.max_rel <= LOOP_MAX_REL and row.cosine >= LOOP_MIN_COSINE, row.fmt()
    assert np.abs(edit["ref"] - edit["x0"]).max() > 0.5  # the loop really moved the latents


def test_decoded_frames_match_adapter(edit, exported):
    """ONNX decoder on the ONNX loop's latents vs the adapter's own decode of its latents: within one level."""
    frames = session(exported["vae_decoder"][1]).run(None, {"latents": edit["ours"]})[0]
    ref = edit["ref_frames"][:, 0]  # (1, H, W, 3)
    assert frames.dtype == np.uint8 and frames.shape == ref.shape == (1, H, W, 3)
    diff = np.abs(frames.astype(np.int16) - ref)
    print(f"frames: max diff {diff.max()} level(s), {(diff > 0).sum()} of {diff.size} values differ")
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert 0 < (ref > 0).mean() and (ref < 255).mean() > 0.5  # not a saturated image


def test_encoder_matches_adapter(model, exported):
    """ONNX encoder on host-made pixels vs `adapter.encode_image` (packed there): same normalised latents."""
    image = rgb(11)
    pixels = host_pixels(image)
    assert np.array_equal(pixels, image_to_tensor(image, H, W).numpy())  # the host recipe is the adapter's
    ours = session(exported["vae_encoder"][1]).run(None, {"image": pixels})[0]
    ref = unpack_latents(model.adapter.encode_image(image, H, W, 1), H_TOK, W_TOK).numpy()
    row = compare("vae_encoder", "adapter", "image_latents", ours, ref)
    tol = exported["vae_encoder"][0].spec.tolerance
    print(row.fmt())
    assert row.max_rel <= tol.max_rel and row.cosine >= tol.min_cosine, row.fmt()


def test_rope_patch_is_close_and_restores():
    """`flux_rope_float32` against upstream's float64 tables at FLUX.1-Kontext's size (axes 16/56/56, 512 text
    tokens, 64x64 target and context tokens): float32 all through, <= 2.7e-6 apart, the original back after."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    embed = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])
    ids = torch.cat([torch.zeros(512, 3), image_ids(64, 64), image_ids(64, 64, first=1.0)])  # (N, 3)
    original, ref = FluxPosEmbed.forward, embed(ids)
    with flux_rope_float32():
        ours = embed(ids)
        assert FluxPosEmbed.forward is not original
    assert FluxPosEmbed.forward is original
    assert all(o.dtype == torch.float32 for o in ours)
    assert max((r.double() - o.double()).abs().max().item() for r, o in zip(ref, ours)) <= 2.7e-6
