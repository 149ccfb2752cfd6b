"""Qwen2.5-VL vision encoder: host-side indices vs transformers' internals, and one dynamic ONNX graph vs
`visual(pixel_values, grid_thw)` for one image, several images, another size and a video.

Tiny preset tower (depth 2, hidden 32, window 112 px = 4x4 merged tokens), CPU. The export runs once per
module (~8 s on 2 cores, most of it torch.export); everything else takes milliseconds. It is the one export of
this file, and the session's bundles cannot stand in for it: their vision encoders hold the preset's 0.02-init
tower, whose tiny activations make every diff tiny, where this tower is rescaled to O(1) activations (`visual`),
and a graph's weights are baked into it.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

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

EXPORT_GRID = [[1, 16, 20]]  # 8x10 merged tokens: 2x3 windows, the last row and column partial
# (t, h, w) in patches: partial windows, exact multiples of the window (upstream pads a whole empty window
# there), one merge block, videos, several entries in one call.
GRIDS = [
    [[1, 8, 12]],
    [[1, 16, 16]],
    [[1, 2, 2]],
    [[2, 6, 10]],
    [[1, 8, 12], [1, 10, 14]],
    [[1, 34, 18], [3, 8, 8], [1, 4, 4]],
]


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
def onnx_path(visual, tmp_path_factory):
    """The rescaled tower's graph (no bundle holds these weights, see the module docstring)."""
    path = tmp_path_factory.mktemp("vision") / "vision_encoder.onnx"
    export_vision_encoder(visual, path, EXPORT_GRID)
    return path


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
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_indices_equal_transformers(visual, grid):
    geo = vi.VisionGeometry.from_config(visual.config)
    ref = _upstream(visual, grid)
    g = np.array(grid)
    np.testing.assert_array_equal(vi.position_ids(g, geo.spatial_merge_size), ref["pos"])
    np.testing.assert_array_equal(vi.cu_seqlens(g), ref["cu"])
    win, cu_win = vi.window_layout(g, geo)
    np.testing.assert_array_equal(win, ref["window_index"])
    np.testing.assert_array_equal(cu_win, ref["cu_window"])

    feeds = vi.vision_inputs(g, visual.config)
    n = vi.num_patches(g)
    assert feeds["rotary_cos"].shape == (n, geo.head_dim) and feeds["rotary_cos"].dtype == np.float32
    np.testing.assert_allclose(feeds["rotary_cos"], ref["cos"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(feeds["rotary_sin"], ref["sin"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(feeds["window_index"], ref["window_index"])
    np.testing.assert_array_equal(feeds["reverse_index"], np.argsort(ref["window_index"]))
    # Segment ids describe exactly upstream's block-diagonal attention (chunks of cu_seqlens).
    for key, cu in (("full_segment_ids", ref["cu"]), ("window_segment_ids", ref["cu_window"])):
        seg = feeds[key]
        assert seg.shape == (n,) and seg.dtype == np.int64
        np.testing.assert_array_equal(seg[:, None] == seg[None, :], vi.block_diagonal_mask(cu))
    assert all(v.dtype != np.float64 for v in feeds.values())


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
@pytest.mark.parametrize("grid", GRIDS[:2] + GRIDS[3:], ids=str)
def test_wrapper_equals_transformers_in_torch(visual, grid):
    feeds = {k: torch.from_numpy(v) for k, v in example_inputs(grid, visual.config).items()}
    with torch.no_grad():
        ref = visual(feeds["pixel_values"], torch.tensor(grid)).pooler_output
        got = ExportableQwenVision(visual)(*feeds.values())
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= VISION_RTOL * max(1.0, ref.abs().max())


# ---------------------------------------------------------------------------------------------- ONNX graph
def test_onnx_equals_transformers_for_any_grid(visual, onnx_path):
    """One graph: the export grid, 1 and 2 images of other sizes, videos (t = 2, 3) and a mix."""
    rows = check_vision_export(visual, onnx_path, [EXPORT_GRID, *GRIDS])
    worst = max(r["rel"] for r in rows)
    assert worst <= VISION_RTOL, rows
    assert min(r["cosine"] for r in rows) > 0.999999


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
    expected = {"pixel_values": (f32, 2), "rotary_cos": (f32, 2), "rotary_sin": (f32, 2), "window_index": (i64, 1),
                "reverse_index": (i64, 1), "full_segment_ids": (i64, 1), "window_segment_ids": (i64, 1)}
    for name, (dtype, rank) in expected.items():
        assert (inputs[name].elem_type, len(inputs[name].shape.dim)) == (dtype, rank), name
        assert inputs[name].shape.dim[0].dim_param, f"{name} has a fixed first dim"  # dynamic length
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
    with pytest.raises(ExportError, match=r"grid \[\[1, 8, 12\]\]: max_abs"):
        check_vision_export(other, onnx_path, [GRIDS[0]])
