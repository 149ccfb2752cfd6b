"""The Wan denoise-step component: one ONNX graph for t2v/i2v/v2v/r2v, checked against the PyTorch reference.

The oracle is loop parity: the exported step graph driven by a numpy loop over the UniPC plan must land on the
final latents of `MetaCanvas.generate` (same weights, same initial noise, random canvas layers) for every task.
Tiny preset, CPU, 64x96 pixels x 5 frames (2 latent frames of 2x3 tokens), 4 steps. The graph is the session's
Wan bundle's `denoise.onnx` (conftest's `bundles`: this component, weights and default ranges, exported, ORT-
optimised and gated once per session); exporting it here again would cost about a minute on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from metacanvas_deploy.mc_export.components.ranges import default_ranges
from metacanvas_deploy.mc_export.components.wan import WanDenoise
from metacanvas_deploy.mc_export.errors import ConfigError, ExportError
from metacanvas_deploy.mc_export.export.onnx_export import check_graph, compare, export_component, parity_gate
from metacanvas_deploy.mc_export.export.patches import wan_rope_without_scatter
from metacanvas_deploy.mc_export.models.backbones.common import cfg_concat, prepare_canvas
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.runtime.bundle import load_bundle
from metacanvas_deploy.runtime.schedulers import make_plan

H, W, F, STEPS = 64, 96, 5, 4
PROMPT, NEGATIVE = "a red fox runs through fresh snow", ""
# Loop budget. Per step the graph matches PyTorch to ~1e-6 relative (ORT's kernels sum in another order); the
# UniPC update runs on float32 coefficients precomputed in float64 where diffusers computes them in float32 at
# each step (~4e-7 relative, tests/test_schedulers.py). Four steps of a contracting ODE solver carry these to
# ~1e-5 at most; 1e-4 is ten times that, and any real mistake (a wrong frame, mask, timestep, CFG row or
# history slot) moves the latents by O(1).
LOOP_MAX_REL, LOOP_MIN_COSINE = 1e-4, 0.99999
# How conftest's `bundles` builds its models: the torch reference below must hold the bundle's weights.
BUNDLE_SOURCE = {"preset": "tiny", "seed": 0, "random_canvas": True}


def rgb(seed: int, frames: int | None = None) -> np.ndarray:
    shape = (H, W, 3) if frames is None else (frames, H, W, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


TASK_INPUTS = {
    "t2v": {},
    "i2v": {"image": rgb(1)},
    "v2v": {"video": rgb(2, F)},
    "r2v": {"reference_images": [rgb(3), rgb(4)]},
    "r2v-1": {"reference_images": [rgb(5)]},
}


@pytest.fixture(scope="module")
def model() -> MetaCanvas:
    return MetaCanvas.from_preset("wan", BUNDLE_SOURCE["preset"], seed=BUNDLE_SOURCE["seed"],
                                  random_canvas=BUNDLE_SOURCE["random_canvas"])


@pytest.fixture(scope="module")
def plan(model):
    return make_plan(dict(model.adapter.scheduler.config), STEPS)  # the tiny preset's default step count


@pytest.fixture(scope="module")
def ranges(model):
    return default_ranges(model.adapter, model.defaults, model.cfg.max_prompt_tokens)


@pytest.fixture(scope="module")
def comp(model, ranges, plan) -> WanDenoise:
    return WanDenoise(model, ranges, plan.history)


@pytest.fixture(scope="module")
def onnx_path(ranges, bundles):
    """The bundle's step graph: `export_component` (which runs `check_graph` on the raw export and fails on
    DOUBLE or Scatter, see `test_export_checks_the_raw_graph`), then `optimize_for_ort`, as a bundle ships it."""
    bundle = load_bundle(bundles["wan"])
    build = json.loads(bundle.manifest.to_json())["build"]
    assert build["source"] == BUNDLE_SOURCE and build["ranges"] == ranges.to_json()
    assert bundle.manifest.engines["denoise"].external_data == ()  # one file, weights inside
    return bundle.engine_path("denoise")


@pytest.fixture(scope="module")
def session(onnx_path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def test_spec(comp, model):
    spec, c, lat = comp.spec, model.adapter.latent_channels, ("latent_frames", "2*h_tok", "2*w_tok")
    assert spec.stage == "denoise"
    assert [(t.name, t.dims) for t in spec.inputs] == [
        ("sample", (1, c, *lat)), ("prompt_embeds", ("rows", "prompt_tokens", model.cfg.text_dim)),
        ("canvas", ("rows", "latent_frames", "h_tok", "w_tok", model.cfg.dit_dim)), ("timestep", (1,)),
        ("guidance_scale", (1,)), ("coefficients", (3, 5)), ("last_sample", (1, c, *lat)),
        ("history", (2, 1, c, *lat)), ("clean", (1, c, *lat)), ("clean_mask", ("latent_frames",)),
        ("reference", (1, c, "ref_frames", "2*h_tok", "2*w_tok")), ("condition", (1, c + 1, *lat))]
    assert [(t.name, t.dims) for t in spec.outputs] == [
        ("next_sample", (1, c, *lat)), ("next_last_sample", (1, c, *lat)), ("next_history", (2, 1, c, *lat))]
    assert {t.dtype for t in (*spec.inputs, *spec.outputs)} == {"float32"}
    assert spec.dims["rows"].to_dict() == [1, 2, 2] and spec.dims["ref_frames"].to_dict() == [0, 2, 2]
    facts = json.loads(json.dumps(spec.engine_entry("denoise.onnx", "onnxruntime", "1.32", "fp32").to_dict()["extra"]))
    assert facts == comp.runtime_facts()
    assert facts["latent_channels"] == c and facts["condition_channels"] == c + 1
    assert facts["latents_mean"] == list(model.vae.config.latents_mean) and len(facts["latents_std"]) == c


def test_stock_layout_has_no_condition_or_reference():
    stock = MetaCanvas.from_preset("wan", "tiny", overrides={"condition_channels": 0})
    ranges = default_ranges(stock.adapter, stock.defaults, stock.cfg.max_prompt_tokens)
    names = WanDenoise(stock, ranges, 2).spec.input_names
    assert "condition" not in names and "reference" not in names and names[-1] == "clean_mask"


def test_history_must_match_the_scheduler(model):
    ranges = default_ranges(model.adapter, model.defaults, model.cfg.max_prompt_tokens)
    with pytest.raises(ConfigError, match="history=0.*K=2"):
        WanDenoise(model, ranges, 0)


@pytest.mark.parametrize("task", ["t2v", "i2v", "v2v", "r2v"])
def test_sample_inputs_are_meaningful(comp, task):
    x, plan = comp.sample_inputs("opt", seed=7, task=task), comp.plan
    i = plan.timesteps.index(float(x["timestep"][0]))
    np.testing.assert_array_equal(x["coefficients"], plan.coefficient_array()[i].astype(np.float32))
    assert x["guidance_scale"][0] == 5.0 and set(np.unique(x["clean_mask"])) <= {0.0, 1.0}
    assert set(np.unique(x["condition"][:, -1])) == {1.0 if task == "v2v" else 0.0}
    assert x["clean_mask"][0] == (task == "i2v") and (x["reference"].shape[2] > 0) == (task == "r2v")


def test_export_parity_and_graph(comp, onnx_path):
    check_graph(onnx_path)  # no DOUBLE, no Scatter (the RoPE patch is on during export)
    cases = {"opt": dict(which="opt", seed=101), "min": dict(which="min", seed=102),
             **{task: dict(which="opt", seed=103, task=task) for task in ("t2v", "i2v", "v2v")},
             "1-row-1-ref": dict(which="max", seed=104, overrides={"rows": 1, "ref_frames": 1})}
    rows = parity_gate(comp, onnx_path, cases)
    assert len(rows) == 3 * len(cases)


def test_export_checks_the_raw_graph(comp, tmp_path, monkeypatch):
    """`export_component` runs `check_graph` on what the exporter wrote, before any optimisation could fold a
    DOUBLE away: a bundle's raw step graph passed it. The exporter is stubbed with a hand-made DOUBLE graph."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    nodes = [onnx.helper.make_node("Cast", ["x"], ["x64"], to=onnx.TensorProto.DOUBLE),
             onnx.helper.make_node("Cast", ["x64"], ["y"], to=onnx.TensorProto.FLOAT)]
    graph = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y]))

    class Program:
        def save(self, path, external_data=False):
            onnx.save(graph, path)

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: Program())
    with pytest.raises(ExportError, match="DOUBLE"):
        export_component(comp, tmp_path / "denoise.onnx")


@torch.no_grad()
def host_inputs(model: MetaCanvas, task: str, guidance: float) -> dict[str, np.ndarray]:
    """The step graph's per-request inputs, prepared as the module docstring of mc_export.components.wan says
    (here from the PyTorch planner and VAE, standing in for their stages)."""
    kwargs, base = TASK_INPUTS[task], task.split("-")[0]
    use_cfg = guidance > 1.0
    images = {"i2v": [kwargs.get("image")], "r2v": kwargs.get("reference_images")}.get(base)
    cond = model.encode(PROMPT, NEGATIVE if use_cfg else None, images=images, video=kwargs.get("video"))
    adapter = model.adapter
    grid = adapter.token_grid(H, W, F)
    request = adapter.prepare_request(base, 1, H, W, F, **kwargs)
    embeds = cfg_concat(cond.negative_prompt_embeds, cond.prompt_embeds) if use_cfg else cond.prompt_embeds
    canvas = prepare_canvas(model.canvas_prep, cond, use_cfg, *grid)
    shape = adapter.latent_shape(1, H, W, F)
    r = request.reference_frames
    clean, mask = np.zeros(shape, np.float32), np.zeros(grid[0], np.float32)
    if request.first_frame is not None:
        clean[:, :, :1], mask[0] = request.first_frame.numpy(), 1.0
    reference = np.zeros((1, shape[1], 0, *shape[3:]), np.float32) if r == 0 else request.prefix.numpy()
    return {"prompt_embeds": embeds.numpy(), "canvas": canvas.numpy(), "clean": clean, "clean_mask": mask,
            "reference": reference, "condition": request.condition[:, :, r:].numpy(),
            "guidance_scale": np.array([guidance], np.float32)}


def onnx_loop(session, entry, plan, inputs: dict[str, np.ndarray], latents: np.ndarray) -> np.ndarray:
    """The runtime's loop: one graph call per step, the state fed back, zeros at step 0; every feed checked
    against the manifest entry as the runtime does."""
    x, coefficients = latents, plan.coefficient_array().astype(np.float32)
    last, history = np.zeros_like(x), np.zeros((plan.history, *x.shape), np.float32)
    for i, t in enumerate(plan.timesteps):
        feeds = {**inputs, "sample": x, "timestep": np.array([t], np.float32), "coefficients": coefficients[i],
                 "last_sample": last, "history": history}
        entry.check_inputs(feeds)
        x, last, history = session.run(["next_sample", "next_last_sample", "next_history"], feeds)
    mask = inputs["clean_mask"][None, None, :, None, None]
    return mask * inputs["clean"] + (1 - mask) * x  # i2v: the clean image frame, as the adapter returns it


@pytest.mark.parametrize("task,guidance", [("t2v", 5.0), ("i2v", 5.0), ("v2v", 5.0), ("r2v", 5.0),
                                           ("r2v-1", 5.0), ("t2v", 1.0), ("i2v", 1.0)])
def test_loop_matches_generate(model, comp, plan, session, task, guidance):
    latents = torch.randn(model.adapter.latent_shape(1, H, W, F), generator=torch.Generator().manual_seed(11))
    ref = model.generate(task.split("-")[0], PROMPT, NEGATIVE, height=H, width=W, num_frames=F,
                         num_inference_steps=STEPS, guidance_scale=guidance, latents=latents,
                         **TASK_INPUTS[task]).latents.numpy()
    entry = comp.spec.engine_entry("denoise.onnx", "onnxruntime", ort.__version__.rsplit(".", 1)[0], "fp32")
    ours = onnx_loop(session, entry, plan, host_inputs(model, task, guidance), latents.numpy())
    row = compare("denoise", task, "latents", ours, ref)
    assert row.max_rel <= LOOP_MAX_REL and row.cosine >= LOOP_MIN_COSINE, row.fmt()


def test_rope_patch_is_bit_identical_and_restores(model):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    g = torch.Generator().manual_seed(0)
    c_in = model.transformer.config.in_channels
    x = torch.randn(2, c_in, 3, 4, 6, generator=g)  # (B, C_in, T, h, w)
    t = torch.full((2, 3 * 2 * 3), 700.0)
    t[:, :6] = 0.0  # a clean first frame, per-token timesteps
    text = torch.randn(2, 7, model.cfg.text_dim, generator=g)
    original = WanAttnProcessor.__call__
    with torch.no_grad():
        stock = model.transformer(x, t, text, return_dict=False)[0]
        with wan_rope_without_scatter():
            assert WanAttnProcessor.__call__ is not original
            patched = model.transformer(x, t, text, return_dict=False)[0]
    assert WanAttnProcessor.__call__ is original
    assert torch.equal(stock, patched)


def test_rope_patch_removes_scatter(onnx_path):
    """Stock Wan attention exports ScatterND (the reason for the patch: one tiny attention exported without
    it); patched, none is left (the bundle's whole step graph, exported with it)."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

    from metacanvas_deploy.mc_export.export.onnx_export import _quiet

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rope = WanRotaryPosEmbed(16, (1, 2, 2), 64)
            self.attn = WanAttention(dim=32, heads=2, dim_head=16, eps=1e-6, processor=WanAttnProcessor())

        def forward(self, latents, x):
            return self.attn(x, None, None, self.rope(latents))

    torch.manual_seed(0)
    args = (torch.randn(1, 4, 2, 4, 4), torch.randn(1, 8, 32))
    with torch.no_grad(), _quiet():
        stock = torch.onnx.export(Attention().eval(), args, dynamo=True, optimize=False).model_proto.graph
    patched = onnx.load(str(onnx_path), load_external_data=False).graph
    assert sum(n.op_type.startswith("Scatter") for n in stock.node) > 0
    assert sum(n.op_type.startswith("Scatter") for n in patched.node) == 0
