"""Qwen2.5-VL vision encoder: host-side indices vs transformers' internals, and one dynamic ONNX graph vs
`visual(pixel_values, grid_thw)` for one image, several images, other sizes, videos and a mix; its attention a
batch of equal segments with no (N, N) tensor, fused for ONNX Runtime and decomposed for TensorRT.

Tiny preset tower (depth 2: one windowed and one full-attention block, hidden 32, window 112 px = 4x4 merged
tokens), CPU. The exports run once per module (~4 s each on 2 cores, most of it torch.export); everything else
takes milliseconds. The session's bundles cannot stand in for them: their vision encoders hold the preset's
0.02-init tower, whose tiny activations make every diff tiny, where this tower is rescaled to O(1) activations
(`visual`), and a graph's weights are baked into it.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from metacanvas_deploy.mc_export.components.vision import VisionComponent
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.export.qwen_vision import (
    VISION_RTOL,
    ExportableQwenVision,
    ExportError,
    check_graph_ops,
    check_vision_export,
    example_inputs,
    export_vision_encoder,
)
from metacanvas_deploy.mc_export.models.presets import get_preset
from metacanvas_deploy.runtime import vision_index as vi
from metacanvas_deploy.runtime.errors import ShapeError

EXPORT_GRID = [[1, 16, 24]]  # 8x12 merged tokens: 2x3 windows of 4x4
# (t, h, w) in patches, all with equal attention segments: what the runtime makes (every image and video frame
# resized to one square: 4x4, 8x8 and 12x12 merged tokens for 16, 64 and 144 tokens per image), and besides
# a square below one window, non-square frames and a mix of images and a video. One graph serves all of them.
GRIDS = {
    "1 image 4x4": [[1, 8, 8]],
    "1 image 8x8": [[1, 16, 16]],
    "1 image 12x12": [[1, 24, 24]],
    "3 images 12x12": [[1, 24, 24]] * 3,
    "video t=2 8x8": [[2, 16, 16]],
    "video t=3 12x12": [[3, 24, 24]],
    "1 image 2x2": [[1, 4, 4]],
    "images and video 4x12": [[1, 8, 24], [2, 8, 24]],
}
# Grids whose segments differ (partial windows, frames of different sizes): the host indices still equal
# transformers', but the encoder refuses them (`vision_index.segment_layout`); the runtime never makes one.
UNEQUAL = {
    "partial windows": [[1, 8, 12]],
    "two sizes": [[1, 8, 12], [1, 10, 14]],
    "mixed": [[1, 34, 18], [3, 8, 8], [1, 4, 4]],
}


@pytest.fixture(scope="module")
def visual() -> Qwen2_5_VisionTransformerPretrainedModel:
    """The tiny tower with weights rescaled so activations are O(1) (the 0.02 init makes every diff tiny)."""
    config = Qwen2_5_VLConfig(**get_preset("wan", "tiny").planner).vision_config
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))  # fan-in scaling
            elif "norm" in name or "ln_q" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def graphs(visual, tmp_path_factory) -> dict:
    """The rescaled tower's graph (no bundle holds these weights, see the module docstring), exported for ONNX
    Runtime (attention fused) and for TensorRT (decomposed)."""
    folder = tmp_path_factory.mktemp("vision")
    paths = {}
    for variant in ("fused", "decomposed"):
        paths[variant] = folder / f"vision_encoder-{variant}.onnx"
        export_vision_encoder(visual, paths[variant], EXPORT_GRID, fused_attention=variant == "fused")
    return paths


@pytest.fixture(scope="module")
def onnx_path(graphs):
    """What an ONNX Runtime bundle ships."""
    return graphs["fused"]


def _upstream(visual, grid):
    """What transformers computes inside `forward` for `grid`: window_index, cu_window_seqlens, cu_seqlens,
    and the rotary cos/sin after its window permutation (N, d)."""
    grid_t = torch.tensor(grid)
    cfg = visual.config
    pos = get_vision_position_ids(grid_t, cfg.spatial_merge_size)
    cu = get_vision_cu_seqlens(grid_t)
    win, cu_win = get_vision_window_index(grid_t, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    n = int(cu[-1])
    cos, sin = (visual.permute_input_for_window_attn(t, win, seq_len=n)
                for t in visual.rotary_pos_emb(torch.zeros(n, 1), pos))
    return dict(pos=pos.numpy(), cu=cu.numpy(), window_index=win.numpy(), cu_window=cu_win.numpy(),
                cos=cos.numpy(), sin=sin.numpy())


# ---------------------------------------------------------------------------------------------- host indices
@pytest.mark.parametrize("grid", [*GRIDS.values(), *UNEQUAL.values()], ids=[*GRIDS, *UNEQUAL])
def test_indices_equal_transformers(visual, grid):
    geo = vi.VisionGeometry.from_config(visual.config)
    ref = _upstream(visual, grid)
    g = np.array(grid)
    np.testing.assert_array_equal(vi.position_ids(g, geo.spatial_merge_size), ref["pos"])
    np.testing.assert_array_equal(vi.cu_seqlens(g), ref["cu"])
    win, cu_win = vi.window_layout(g, geo)
    np.testing.assert_array_equal(win, ref["window_index"])
    np.testing.assert_array_equal(cu_win, ref["cu_window"])


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS)
def test_graph_inputs_equal_transformers_and_carry_its_segments(visual, grid):
    """The graph's inputs are upstream's tensors reshaped, and their shapes (F, W, T) are upstream's attention
    chunks: frames of W*T*unit patches (cu_seqlens), windows of T*unit patches (cu_window_seqlens)."""
    geo = vi.VisionGeometry.from_config(visual.config)
    ref = _upstream(visual, grid)
    feeds = vi.vision_inputs(np.array(grid), visual.config)
    n, unit, d = vi.num_patches(grid), geo.merge_unit, geo.head_dim
    frames, windows, tokens = feeds["window_index"].shape
    assert frames == sum(t for t, _, _ in grid) and frames * windows * tokens * unit == n
    np.testing.assert_array_equal(ref["cu"], np.arange(0, n + 1, windows * tokens * unit))
    np.testing.assert_array_equal(ref["cu_window"], np.arange(0, n + 1, tokens * unit))
    assert feeds["rotary_cos"].shape == (frames, windows, tokens * unit, d)
    assert feeds["rotary_cos"].dtype == np.float32
    np.testing.assert_allclose(feeds["rotary_cos"].reshape(n, d), ref["cos"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(feeds["rotary_sin"].reshape(n, d), ref["sin"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(feeds["window_index"].reshape(-1), ref["window_index"])
    np.testing.assert_array_equal(feeds["reverse_index"], np.argsort(ref["window_index"]))
    assert list(feeds) == list(vi.VISION_INPUT_NAMES[1:])
    assert all(v.dtype != np.float64 for v in feeds.values())


@pytest.mark.parametrize("grid,words", [(UNEQUAL["partial windows"], "not tiled by windows of 4x4"),
                                        (UNEQUAL["two sizes"], "different frame sizes"),
                                        (UNEQUAL["mixed"], "different frame sizes"),
                                        ([[1, 20, 20]], "10x10 merged tokens are not tiled")])
def test_unequal_segments_are_refused(visual, grid, words):
    with pytest.raises(ShapeError, match=words):
        vi.vision_inputs(grid, visual.config)


@pytest.mark.parametrize("head_dim,theta", [(16, 1e4), (80, 1e4), (64, 1e6), (128, 5e5), (40, 1e4)])
def test_rotary_at_full_size_positions(head_dim, theta):
    """inv_freq bit-equal to torch's, so cos/sin stay within 1e-6 even at positions of 4k-pixel images."""
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding

    cfg = Qwen2_5_VLVisionConfig(hidden_size=head_dim * 2, num_heads=2, rope_parameters=dict(
        rope_type="axial", rope_theta=theta))
    rope = Qwen2_5_VLVisionRotaryEmbedding(cfg)
    np.testing.assert_array_equal(vi.rotary_inv_freq(head_dim, theta), rope.inv_freq.numpy())
    pos = torch.stack(torch.meshgrid(torch.arange(0, 300, 7), torch.arange(300), indexing="ij"), -1).reshape(-1, 2)
    cos, sin = rope(torch.zeros(1), pos)
    ours = vi.rotary_cos_sin(pos.numpy(), head_dim, theta)
    np.testing.assert_allclose(ours[0], cos.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours[1], sin.numpy(), rtol=0, atol=1e-6)


def test_geometry_from_dict_equals_from_config(visual):
    as_dict = visual.config.to_dict()
    assert vi.VisionGeometry.from_config(as_dict) == vi.VisionGeometry.from_config(visual.config)
    geo = vi.VisionGeometry.from_config(as_dict)
    assert (geo.head_dim, geo.window_tokens, geo.patch_dim, geo.merge_unit) == (16, 4, 1176, 4)


BAD_GRIDS = [[1, 8, 8], [[1, 8]], [[1, 7, 8]], [[0, 8, 8]], [[1.0, 8.0, 8.0]], np.zeros((0, 3), int)]


@pytest.mark.parametrize("grid", BAD_GRIDS,
                         ids=["1d", "two-columns", "odd-height", "zero-frames", "float", "empty"])
def test_bad_grid_raises(visual, grid):
    with pytest.raises(ShapeError, match="grid_thw"):
        vi.vision_inputs(grid, visual.config)


# ---------------------------------------------------------------------------------------------- torch wrapper
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS)
def test_wrapper_equals_transformers_in_torch(visual, grid):
    feeds = {k: torch.from_numpy(v) for k, v in example_inputs(grid, visual.config).items()}
    with torch.no_grad():
        ref = visual(feeds["pixel_values"], torch.tensor(grid)).pooler_output
        got = ExportableQwenVision(visual)(*feeds.values())
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= VISION_RTOL * max(1.0, ref.abs().max())


# ---------------------------------------------------------------------------------------------- ONNX graph
@pytest.mark.parametrize("variant", ["fused", "decomposed"])
def test_onnx_equals_transformers_for_any_grid(visual, graphs, variant):
    """One graph: 1 image of each size, several images, videos (t = 2, 3) and images with a video."""
    rows = check_vision_export(visual, graphs[variant], [EXPORT_GRID, *GRIDS.values()])
    worst = max(r["rel"] for r in rows)
    assert worst <= VISION_RTOL, rows
    assert min(r["cosine"] for r in rows) > 0.999999


def _frame_axes(value) -> list[int]:
    """The axes of a value's symbolic shape that grow with the frames of a call (with the patch count N)."""
    return [i for i, d in enumerate(value.type.tensor_type.shape.dim)
            if any(s in d.dim_param for s in ("merged_tokens", "vision_frames"))]


@pytest.mark.parametrize("variant", ["fused", "decomposed"])
def test_attention_is_a_batch_of_segments_with_no_n_by_n_tensor(visual, graphs, variant):
    """No value of either graph has two axes that grow with N (the block-diagonal mask and its scores were
    (N, N) and (1, H, N, N)), and every attention's query is a batch of segments whose length does not grow
    with N: MultiHeadAttention over (segments, length, H*d) for ONNX Runtime, MatMul -> Softmax over
    (segments, H, length, d) queries for TensorRT; one per block, no mask input."""
    model = onnx.load(str(graphs[variant]))
    values = {v.name: v for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    assert len(values) > 100  # the exporter's symbolic shapes are there to check
    assert [name for name, v in values.items() if len(_frame_axes(v)) > 1] == []
    producer = {out: node for node in model.graph.node for out in node.output}
    if variant == "fused":
        queries = [n.input[0] for n in model.graph.node if n.op_type == "MultiHeadAttention"]
        assert "Softmax" not in {n.op_type for n in model.graph.node}
    else:  # Softmax(MatMul(query * scale, key^T))
        scores = [producer[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"]
        assert {s.op_type for s in scores} == {"MatMul"}
        queries = [s.input[0] for s in scores]
        assert "MultiHeadAttention" not in {n.op_type for n in model.graph.node}
    assert len(queries) == len(visual.blocks)
    assert all(_frame_axes(values[q]) == [0] for q in queries), [values[q] for q in queries]
    assert {i.name for i in model.graph.input} == set(vi.VISION_INPUT_NAMES)
    check_graph_ops(graphs[variant])  # what TensorRT rejects: DOUBLE, Scatter


def test_onnx_zero_image_stays_finite(visual, onnx_path):
    """An all-zero image makes every RMSNorm see 0: only its eps keeps 0 * rsqrt(0 + eps) from NaN, so this
    checks the ONNX optimizer kept the eps (it deletes 1e-15 adds: tests/test_component_sana.py)."""
    feeds = example_inputs([[1, 8, 8]], visual.config)
    feeds["pixel_values"][:] = 0.0
    with torch.no_grad():
        ref = visual(torch.from_numpy(feeds["pixel_values"]), torch.tensor([[1, 8, 8]])).pooler_output.numpy()
    (got,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=0, atol=VISION_RTOL * max(1.0, np.abs(ref).max()))


def test_onnx_interface_and_ops(visual, onnx_path):
    model = onnx.load(str(onnx_path))
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == list(vi.VISION_INPUT_NAMES)
    assert [o.name for o in model.graph.output] == list(vi.VISION_OUTPUT_NAMES)
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    expected = {"pixel_values": (f32, 2), "rotary_cos": (f32, 4), "rotary_sin": (f32, 4), "window_index": (i64, 3),
                "reverse_index": (i64, 1)}
    for name, (dtype, rank) in expected.items():
        assert (inputs[name].elem_type, len(inputs[name].shape.dim)) == (dtype, rank), name
        assert inputs[name].shape.dim[0].dim_param, f"{name} has a fixed first dim"  # dynamic length
    # the segment structure (frames, windows per frame, tokens per window) is dynamic too: one graph, any size
    assert [d.dim_param for d in inputs["window_index"].shape.dim] == [
        "vision_frames", "windows_per_frame", "tokens_per_window"]
    assert model.opset_import[0].version >= 19
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"ScatterND", "ScatterElements", "Loop", "If", "NonZero", "Conv"}, ops
    check_graph_ops(onnx_path)  # no DOUBLE anywhere


def test_check_graph_ops_rejects_double(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [2])
    node = onnx.helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.DOUBLE)
    path = tmp_path / "double.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y])), str(path))
    with pytest.raises(ExportError, match="DOUBLE"):
        check_graph_ops(path)


def test_check_vision_export_fails_loudly(visual, onnx_path):
    other = copy.deepcopy(visual)
    with torch.no_grad():
        other.blocks[0].attn.proj.weight.mul_(1.1)  # a tower the graph was not exported from
    with pytest.raises(ExportError, match=r"grid \[\[1, 16, 16\]\]: max_abs"):
        check_vision_export(other, onnx_path, [GRIDS["1 image 8x8"]])


# ---------------------------------------------------------------------------------------------- the stage's spec
def _component(visual, tokens_per_image: int, max_images: int = 3) -> VisionComponent:
    """The build's vision stage for the planner's square of `tokens_per_image` (a stand-in model: the stage
    reads only the tower and four config numbers)."""
    cfg = SimpleNamespace(vision_tokens_per_image=tokens_per_image, vision_grid=round(tokens_per_image ** 0.5),
                          planner_video_frames=4, mllm_dim=visual.config.out_hidden_size)
    model = SimpleNamespace(planner=SimpleNamespace(qwen=SimpleNamespace(model=SimpleNamespace(visual=visual))),
                            cfg=cfg)
    return VisionComponent(model, SimpleNamespace(max_images=max_images))


@pytest.mark.parametrize("tokens,windows", [(4, 1), (16, 1), (64, 4), (144, 9)])
def test_stage_spec_pins_the_squares_segments_and_its_samples_fit_it(visual, tokens, windows):
    comp = _component(visual, tokens)
    dims = {k: v.to_dict() for k, v in comp.spec.dims.items()}
    per_window = min(tokens, 16)
    assert dims == {"merged_tokens": [tokens, tokens, 3 * tokens], "vision_frames": [1, 1, 3],
                    "windows_per_frame": [windows] * 3, "tokens_per_window": [per_window] * 3}
    for which in ("min", "opt", "max"):
        feeds = comp.sample_inputs(which)
        for t in comp.spec.inputs:
            t.check(feeds[t.name].shape, comp.spec.dims, feeds[t.name].dtype)  # raises ShapeError if not
        ref = comp.reference(feeds)["image_features"]
        assert ref.shape == (feeds["reverse_index"].shape[0], visual.config.out_hidden_size)


def test_a_square_the_windows_do_not_tile_cannot_be_built(visual):
    with pytest.raises(ConfigError, match=r"vision_tokens_per_image=100 cannot be built.*10x10 merged tokens"):
        _component(visual, 100)
