"""Named, reversible rewrites of upstream modules for export. Each says why, restores the original on exit,
and is held to the original by a test (tests/test_component_flux.py and tests/test_component_wan.py:
`test_rope_patch_*`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def flux_rope_float32() -> Iterator[None]:
    """diffusers' `FluxPosEmbed` builds its rotary tables in float64: DOUBLE tensors land in the graph and
    TensorRT rejects them (`onnx_export.check_graph` refuses them). The float32 tables differ by <= 2.7e-6."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.FluxPosEmbed.forward

    def forward(self, ids: torch.Tensor):
        pos = ids.float()
        cos_out, sin_out = [], []
        for i in range(ids.shape[-1]):
            cos, sin = get_1d_rotary_pos_embed(self.axes_dim[i], pos[:, i], theta=self.theta,
                                               repeat_interleave_real=True, use_real=True,
                                               freqs_dtype=torch.float32)
            cos_out.append(cos)
            sin_out.append(sin)
        return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)

    transformer_flux.FluxPosEmbed.forward = forward
    try:
        yield
    finally:
        transformer_flux.FluxPosEmbed.forward = original


@contextlib.contextmanager
def wan_rope_without_scatter() -> Iterator[None]:
    """diffusers' `WanAttnProcessor` rotates q and k by strided slice assignment (`out[..., 0::2] = ...`), which
    exports as 8 ScatterND nodes per block; TensorRT serialises them (`onnx_export.check_graph`). The same rotation
    written as stack + flatten is bit-identical (the same elementwise products, interleaved by a reshape) and
    exports as Unsqueeze/Concat/Reshape. The rotary application is a closure inside `__call__`, so the
    self-attention path of `__call__` (diffusers 0.42.1) is restated here; every other call (cross-attention,
    Wan2.1-I2V's image keys) goes to the original. tests/test_component_wan.py holds it bit-identical to stock.
    """
    from diffusers.models.transformers import transformer_wan as tw

    original = tw.WanAttnProcessor.__call__

    def rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, heads, d/2) each: even and odd channels
        cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]  # (1, N, 1, d/2)
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, N, heads, d/2, 2)
        return out.flatten(-2).type_as(x)  # (B, N, heads, d): even, odd interleaved as upstream writes them

    def call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if rotary_emb is None or attn.add_k_proj is not None:
            return original(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = tw._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (y.unflatten(2, (attn.heads, -1)) for y in (query, key, value))  # (B, N, heads, d)
        query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        out = tw.dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config if encoder_hidden_states is None else None)
        out = out.flatten(2, 3).type_as(query)  # (B, N, D)
        return attn.to_out[1](attn.to_out[0](out))

    tw.WanAttnProcessor.__call__ = call
    try:
        yield
    finally:
        tw.WanAttnProcessor.__call__ = original


@contextlib.contextmanager
def export_patches() -> Iterator[None]:
    """Every export patch at once (each is a no-op for models that do not use the patched module)."""
    with flux_rope_float32(), wan_rope_without_scatter():
        yield
