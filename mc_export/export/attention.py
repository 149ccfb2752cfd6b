"""Attention that scales on ONNX Runtime: unmasked scaled-dot-product attention exported as ONNX Runtime's fused
`com.microsoft.MultiHeadAttention` instead of MatMul -> Softmax -> MatMul.

Why: the dynamo exporter at opset 20 decomposes `F.scaled_dot_product_attention`, and ONNX Runtime then
materialises the (tokens x tokens) score matrix per head: ~3 GB per head per call for Wan2.2-5B at 704x1280x121
frames (27,280 tokens). `MultiHeadAttention`'s CPU kernel takes a flash-attention path (fp32, no mask, bias or
past): memory linear in tokens (measured in `benchmarks/attention_memory.py`). TensorRT fuses the decomposed
pattern itself, so TensorRT exports keep it (`export_component(..., fused_attention=False)`).

How: while `fused_attention()` is active, `torch.nn.functional.scaled_dot_product_attention` routes the calls the
fused kernel serves exactly (4-D fp32, no mask, no dropout, not causal, no GQA) to the custom op
`mc_export::attention`, which runs SDPA in PyTorch and exports through `TRANSLATIONS` as
Transpose/Reshape -> MultiHeadAttention -> Reshape/Transpose. Every other call (the planner's causal attention)
goes to the original function. The eager reference never sees the op. The Qwen vision encoder's attention within
windows and frames qualifies as a batch of equal segments (`mc_export/export/qwen_vision.py`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import onnx.defs
import torch
import torch.nn.functional as F
from onnxscript import opset18 as op
from onnxscript.values import Opset

DOMAIN = "com.microsoft"


@torch.library.custom_op("mc_export::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA over (B, N, S, H) query and (B, N, T, H) key/value, no mask: (B, N, S, H)."""
    return _ORIGINAL(q, k, v, scale=scale)


@attention.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)


def _register_schema() -> None:
    """ONNX Runtime's contrib op, declared to onnx so that onnxscript can emit it (its schema lives in ONNX
    Runtime's C++ only). The three inputs and two attributes we use; the op has more, all optional."""
    if onnx.defs.has("MultiHeadAttention", DOMAIN):
        return
    param, attr = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    onnx.defs.register_schema(onnx.defs.OpSchema(
        "MultiHeadAttention", DOMAIN, 1,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T")], outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[attr("num_heads", onnx.defs.OpSchema.AttrType.INT, "number of heads"),
                    attr("scale", onnx.defs.OpSchema.AttrType.FLOAT, "score scale")]))


_register_schema()
_MSFT = Opset(DOMAIN, 1)


def _attention_onnx(q, k, v, scale: float):
    """(B, N, S, H) -> MultiHeadAttention's (B, S, N*H) layout and back."""
    heads, head_dim = q.shape[1], q.shape[3]

    def packed(x):  # (B, N, S, H) -> (B, S, N*H)
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))

    out = _MSFT.MultiHeadAttention(packed(q), packed(k), packed(v), num_heads=heads, scale=scale)  # (B, S, N*H)
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim]))  # (B, S, N, H)
    return op.Transpose(out, perm=[0, 2, 1, 3])  # (B, N, S, H)


TRANSLATIONS = {torch.ops.mc_export.attention.default: _attention_onnx}
_ORIGINAL = F.scaled_dot_product_attention


def _fusable(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> bool:
    return (attn_mask is None and not dropout_p and not is_causal and not enable_gqa
            and q.dim() == k.dim() == v.dim() == 4 and q.dtype == k.dtype == v.dtype == torch.float32
            and q.shape[1] == k.shape[1] == v.shape[1] and q.shape[3] == k.shape[3] == v.shape[3])


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route unmasked SDPA calls to `mc_export::attention` for export (see the module docstring); restores
    `torch.nn.functional.scaled_dot_product_attention` on exit."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not _fusable(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
            return _ORIGINAL(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
        return attention(query, key, value, 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale))

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _ORIGINAL
