"""Attention that scales (`mc_export.export.attention`): unmasked SDPA exports as ONNX Runtime's fused
`MultiHeadAttention` and equals PyTorch's SDPA; masked, causal or GQA calls keep the decomposed graph; TensorRT
exports keep it everywhere; the patch is reversible.

Tolerance: 1e-5 absolute on outputs of magnitude ~1: the fused kernel sums the softmax in tiles (online
softmax), a different order than PyTorch's (measured <= 1e-6)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from metacanvas_deploy.mc_export.export import attention


class Attend(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs) * 2.0


def _export(module, path, fused: bool, kv_len: int = 37):
    q, k, v = torch.randn(2, 4, 29, 16), torch.randn(2, 4, kv_len, 16), torch.randn(2, 4, kv_len, 16)
    s, t = torch.export.Dim("s", min=2, max=4096), torch.export.Dim("t", min=2, max=4096)
    with torch.no_grad(), (attention.fused_attention() if fused else torch.no_grad()):
        program = torch.onnx.export(module, (q, k, v), dynamo=True, input_names=["q", "k", "v"], output_names=["o"],
                                    dynamic_shapes={"q": {2: s}, "k": {2: t}, "v": {2: t}}, opset_version=20,
                                    custom_translation_table=attention.TRANSLATIONS if fused else None,
                                    verbose=False)
    program.save(str(path))
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("kwargs", [{}, {"scale": 0.3}])
def test_unmasked_attention_exports_fused_and_equals_sdpa(tmp_path, kwargs):
    ops = _export(Attend(**kwargs), tmp_path / "a.onnx", fused=True)
    assert ops["MultiHeadAttention"] == 1 and ops["Softmax"] == 0 and ops["MatMul"] == 0
    session = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    for s, t in ((29, 37), (300, 211)):  # other lengths than the traced ones: the graph is dynamic
        q, k, v = torch.randn(2, 4, s, 16), torch.randn(2, 4, t, 16), torch.randn(2, 4, t, 16)
        ref = (F.scaled_dot_product_attention(q, k, v, **kwargs) * 2.0).numpy()
        got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"is_causal": True}, {"attn_mask": "mask"}])
def test_masked_or_causal_attention_keeps_the_decomposed_graph(tmp_path, kwargs):
    if kwargs.get("attn_mask") == "mask":
        kwargs = {"attn_mask": torch.ones(29, 29, dtype=torch.bool).tril()}
    ops = _export(Attend(**kwargs), tmp_path / "a.onnx", fused=True, kv_len=29)
    assert ops["MultiHeadAttention"] == 0 and ops["Softmax"] == 1


def test_tensorrt_exports_keep_the_decomposed_graph_and_the_patch_is_reversible(tmp_path):
    original = torch.nn.functional.scaled_dot_product_attention
    ops = _export(Attend(), tmp_path / "a.onnx", fused=False)
    assert ops["MultiHeadAttention"] == 0 and ops["Softmax"] == 1
    with attention.fused_attention():
        assert torch.nn.functional.scaled_dot_product_attention is not original
    assert torch.nn.functional.scaled_dot_product_attention is original


def test_a_built_bundle_runs_the_dit_and_vae_attention_fused(bundles):
    """The Wan tiny bundle (its stages gated against PyTorch at build time): every unmasked attention is fused,
    the vision encoder's too (a batch of equal windows/frames, one per block)."""
    root = bundles["wan"]
    fused = {p.stem: collections.Counter(n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node)
             for p in root.glob("*.onnx")}
    assert fused["denoise"]["MultiHeadAttention"] >= 2  # the canvas connector's block and the DiT's layers
    assert all(fused[s]["MultiHeadAttention"] == 1 for s in ("vae_encoder", "vae_decoder"))
    assert fused["vision_encoder"]["MultiHeadAttention"] == 2 and fused["vision_encoder"]["Softmax"] == 0
