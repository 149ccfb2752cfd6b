"""MetaCanvas connectors: context MLP, pooled projection, canvas preparation, per-step canvas injector.

Shapes use D_mllm (planner width), D_txt (DiT text width), D_dit (DiT patch-embedding width),
K (canvas keyframes), h x w (canvas grid), T x H x W (DiT token grid: latent frames x token rows x columns).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metacanvas_deploy.mc_export.models.config import MetaCanvasConfig


class ContextMLP(nn.Module):
    """Planner prompt states -> the DiT's text conditioning: Linear -> GELU -> Linear."""

    def __init__(self, mllm_dim: int, text_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(mllm_dim, 4 * text_dim)
        self.fc2 = nn.Linear(4 * text_dim, text_dim)

    def forward(self, context_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(context_states)))  # (B, L, D_txt)


class PooledProjection(nn.Module):
    """FLUX's pooled text input: Linear(D_mllm, pooled_dim) over the mean of the (unpadded) context states."""

    def __init__(self, mllm_dim: int, pooled_dim: int):
        super().__init__()
        self.proj = nn.Linear(mllm_dim, pooled_dim)

    def forward(self, context_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.to(context_states.dtype).unsqueeze(-1)  # (B, L, 1)
        mean = (context_states * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D_mllm)
        return self.proj(mean)  # (B, pooled_dim)


class PreLNBlock(nn.Module):
    """A vanilla pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU. No positions."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d_head)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def resize_canvas(canvas: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """(B, K, h, w, D) -> (B, T, H, W, D): bilinear in space (align_corners=False); linear in time with
    keyframes on the first and last frame (align_corners=True). K == 1 repeats over T."""
    # No "same size" shortcuts: an export traced through one would bake the example's size in. Resizing to
    # the same size is exact for both modes (every weight is 0 or 1).
    b, k, h, w, d = canvas.shape
    x = canvas.permute(0, 1, 4, 2, 3).reshape(b * k, d, h, w)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)  # (B*K, D, H, W)
    x = x.reshape(b, k, d, height * width)
    if k == 1:
        x = x.expand(b, frames, d, height * width)
    else:
        x = _lerp_keyframes(x, frames)  # (B, T, D, H*W)
    return x.reshape(b, frames, d, height, width).permute(0, 1, 3, 4, 2)  # (B, T, H, W, D)


def _lerp_keyframes(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, K, ...) keyframes -> (B, T, ...) linear in time, keyframes on the first and last frame: what
    F.interpolate(mode="linear", align_corners=True) computes, written with gathers so that T = 1 (where the
    align-corners scale (K-1)/(T-1) divides by zero in ONNX's Resize) gives keyframe 0, as torch does."""
    k = x.shape[1]
    t = torch.arange(frames, device=x.device, dtype=torch.float32)
    src = t * ((k - 1) / torch.clamp(torch.tensor(frames - 1, dtype=torch.float32), min=1.0))  # (T,)
    i0 = torch.clamp(torch.floor(src).long(), max=k - 2)  # (T,)
    w = (src - i0.float()).to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))  # (1, T, 1, ...)
    return x.index_select(1, i0) * (1 - w) + x.index_select(1, i0 + 1) * w


class CanvasPrep(nn.Module):
    """Canvas states -> canvas residual on the DiT token grid. Runs once per request."""

    def __init__(self, cfg: MetaCanvasConfig):
        super().__init__()
        self.grid = (cfg.canvas_keyframes, cfg.canvas_height, cfg.canvas_width)
        self.block = PreLNBlock(cfg.mllm_dim, cfg.prep_heads, cfg.prep_mlp_ratio, cfg.norm_eps)
        self.out = nn.Linear(cfg.mllm_dim, cfg.dit_dim)
        nn.init.zeros_(self.out.weight)  # zero-initialised as at the start of training
        nn.init.zeros_(self.out.bias)

    def forward(self, canvas_states: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        b = canvas_states.shape[0]
        x = self.out(self.block(canvas_states))  # (B, K*h*w, D_dit)
        x = x.view(b, *self.grid, x.shape[-1])  # (B, K, h, w, D_dit)
        return resize_canvas(x, frames, height, width)  # (B, T, H, W, D_dit)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of a (B,) timestep on the backbone's 0..1000 scale."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LinearAttention(nn.Module):
    """SANA's ReLU-kernel linear attention: O(N) in tokens. eps keeps the denominator finite; it is 1e-6
    rather than SANA's 1e-15, which onnxscript's optimizer folds to zero (an all-zero row would then give
    NaN in the exported graph)."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda y: y.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731 (B, h, N, dh)
        q, k, v = F.relu(split(self.to_q(x))), F.relu(split(self.to_k(x))), split(self.to_v(x))
        kv = k.transpose(-1, -2) @ v  # (B, h, dh, dh)
        num = q @ kv  # (B, h, N, dh)
        den = q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)  # (B, h, N, 1)
        out = (num / (den + self.eps)).transpose(1, 2).reshape(b, n, d)
        return self.to_out(out)


class MixFFN(nn.Module):
    """SANA's GLUMBConv: 1x1 expand -> 3x3 depthwise -> GLU(SiLU gate) -> 1x1 project, on the token grid."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, n, d = x.shape
        y = x.transpose(1, 2).reshape(b, d, height, width)  # (B, D, H, W)
        y = self.depth(F.silu(self.inverted(y)))  # (B, 2*hidden, H, W)
        y, gate = y.chunk(2, dim=1)
        y = self.point(y * F.silu(gate))  # (B, D, H, W)
        return y.flatten(2).transpose(1, 2)  # (B, N, D)


class CanvasInjector(nn.Module):
    """The per-step connector: x + zero_linear(SanaBlock(x + canvas, AdaLN-single(t))).

    Works on one 2D token grid at a time: video is batched per latent frame, (B*T, H*W, D).
    """

    def __init__(self, cfg: MetaCanvasConfig, freq_dim: int = 256):
        super().__init__()
        d = cfg.dit_dim
        self.freq_dim = freq_dim
        self.time_fc1 = nn.Linear(freq_dim, d)
        self.time_fc2 = nn.Linear(d, d)
        self.time_mod = nn.Linear(d, 6 * d)  # AdaLN-single: shared modulation from t
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = LinearAttention(d, cfg.injector_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.ffn = MixFFN(d, cfg.injector_mlp_ratio)
        self.out = nn.Linear(d, d)
        nn.init.zeros_(self.out.weight)  # ControlNet-style: zero at the start of training
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, canvas: torch.Tensor, timestep: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
        """x, canvas: (B', H*W, D); timestep: (B',) on the backbone's 0..1000 scale."""
        temb = self.time_fc2(F.silu(self.time_fc1(timestep_embedding(timestep, self.freq_dim).to(x.dtype))))
        mod = self.time_mod(F.silu(temb)).view(-1, 6, x.shape[-1]) + self.scale_shift_table  # (B', 6, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unsqueeze(2).unbind(1)  # each (B', 1, D)
        h = x + canvas
        h = h + gate_a * self.attn(self.norm1(h) * (1 + scale_a) + shift_a)
        h = h + gate_m * self.ffn(self.norm2(h) * (1 + scale_m) + shift_m, height, width)
        return x + self.out(h)


def randomize_zero_layers(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Give the zero-initialised output layers random values so the canvas path is exercised."""
    for m in module.modules():
        if isinstance(m, (CanvasPrep, CanvasInjector)):
            with torch.no_grad():
                m.out.weight.copy_(torch.randn(m.out.weight.shape, generator=generator) * std)
                m.out.bias.copy_(torch.randn(m.out.bias.shape, generator=generator) * std)
