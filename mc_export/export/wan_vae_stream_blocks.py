"""One chunk through Wan's VAE encoder / decoder with every causal cache an explicit tensor.

Mirrors diffusers 0.42 `autoencoder_kl_wan` (`WanEncoder3d.forward`, `WanDecoder3d.forward` and the blocks
they call) block for block, calling upstream's own submodules (convs, norms, attention, resamplers,
`AvgDown3D` / `DupUp3D` shortcuts) so the arithmetic is theirs; only the cache bookkeeping differs:

* upstream keeps a Python list and, per causal conv, slices / clones / concatenates one frame at a time, with
  None (chunk 0) and the string 'Rep' as markers. Here a conv reads its cache from `past`, concatenates once,
  convolves, and writes the last `frames` inputs to `present`: 3 graph nodes per conv instead of ~12, which
  matters because a dynamic-shape export costs ~0.1 s of CPU per node (the tiny decoder went 672 -> 342).
* chunk 0 has no `past`. A causal conv then zero-pads the missing frames as upstream does, and writes a cache
  already in steady-state shape (zeros in front), which feeds chunk 1 exactly the values upstream would.
  The temporal upsampler skips its time_conv on chunk 0 (upstream's 'Rep': chunk 1 zero-pads instead of
  reading a cache), so it writes zeros.

Caches are named by the path of the conv that reads them (`ChunkState.paths`), so names and order come from
the module tree and the call order, never from a hand-written list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
    WanResidualDownBlock,
    WanResidualUpBlock,
    WanRMS_norm,
    WanUpBlock,
)
from torch import nn

from metacanvas_deploy.mc_export.errors import ConfigError, InputError


class ChunkState:
    """The caches of one chunk: `past` read in call order (None on chunk 0), `present` written in the same order."""

    def __init__(self, paths: dict, past: tuple | None) -> None:
        self.paths = paths  # {module: dotted path inside the encoder / decoder}
        self.first = past is None
        self._past = list(past or ())
        self._read = 0
        self.present: list[torch.Tensor] = []
        self.names: list[str] = []

    def read(self) -> torch.Tensor | None:
        if self.first:
            return None
        if self._read >= len(self._past):
            raise InputError(f"the chunk needs more than the {len(self._past)} caches given")
        self._read += 1
        return self._past[self._read - 1]

    def write(self, module: nn.Module, cache: torch.Tensor) -> None:
        self.names.append(self.paths[module])
        self.present.append(cache)

    def check_consumed(self) -> None:
        if not self.first and self._read != len(self._past):
            raise InputError(f"expected {self._read} caches, got {len(self._past)}")


def causal_conv(conv: WanCausalConv3d, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
    """`conv(x, cache)` for a stride-1 causal conv; caches its last `2 * padding_t` input frames (upstream CACHE_T).

    x (B, C, t, h, w) -> (B, C', t, h, w); cache (B, C, frames, h, w) in and out.
    """
    pw, _, ph, _, frames, _ = conv._padding  # upstream's causal padding: (w, w, h, h, 2 * pad_t, 0)
    if frames == 0 or conv.stride[0] != 1:
        raise ConfigError(f"{state.paths[conv]}: not a stride-1 causal conv with history; extend the streaming rules")
    past = state.read()
    if past is None:  # chunk 0: upstream pads the missing history with zeros
        xx = F.pad(x, (0, 0, 0, 0, frames, 0))  # (B, C, frames + t, h, w)
    else:
        xx = torch.cat([past, x], dim=2)  # (B, C, frames + t, h, w)
    state.write(conv, xx[:, :, xx.shape[2] - frames:])
    # upstream zero-pads h and w with F.pad; the conv's own (symmetric, zero) padding gives the same sums
    # with one graph node instead of two (Pad + Conv), and TensorRT fuses it into the kernel.
    return F.conv3d(xx, conv.weight, conv.bias, conv.stride, (0, ph, pw), conv.dilation, conv.groups)


def rms_norm(norm: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    """`WanRMS_norm.forward` in float32 without its no-op casts: same values, 4 graph nodes fewer per norm.

    F.normalize is x / vector_norm(x).clamp_min(1e-12).expand_as(x); dividing by the broadcast norm instead of
    its expanded copy gives the same quotients. Half precision goes through upstream (it normalises in fp32).
    """
    if x.dtype != torch.float32:
        return norm(x)
    out = x / torch.linalg.vector_norm(x, 2, dim=1 if norm.channel_first else -1, keepdim=True).clamp_min(1e-12)
    out = out * norm.scale * norm.gamma
    return out if isinstance(norm.bias, float) and norm.bias == 0.0 else out + norm.bias  # upstream adds 0.0


def residual_block(blk: WanResidualBlock, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
    """`WanResidualBlock.forward` (eval: its dropout is the identity and is left out)."""
    h = blk.conv_shortcut(x)  # 1x1x1 conv (no temporal context) or Identity
    x = causal_conv(blk.conv1, blk.nonlinearity(rms_norm(blk.norm1, x)), state)
    x = causal_conv(blk.conv2, blk.nonlinearity(rms_norm(blk.norm2, x)), state)
    return x + h


def resample(mod: WanResample, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
    """`WanResample.forward`: optional temporal conv (x2 up / /2 down) around a per-frame 2-D resample."""
    b, c, t, h, w = x.shape
    if mod.mode == "upsample3d":
        if state.first:  # upstream skips time_conv on chunk 0 and marks 'Rep': chunk 1 sees zero history
            state.write(mod.time_conv, x.new_zeros((b, c, mod.time_conv._padding[4], h, w)))
        else:
            x = causal_conv(mod.time_conv, x, state)  # (B, 2C, t, h, w): two output frames per input frame
            x = x.reshape(b, 2, c, t, h, w)
            x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)  # interleave: (B, C, 2t, h, w)
    t = x.shape[2]
    x = mod.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # (B*t, C', h', w')
    x = x.view(b, t, x.size(1), x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)  # (B, C', t, h', w')
    if mod.mode == "downsample3d":
        # upstream caches chunk 0's x (one frame) and later x[:, :, -1:]; only its last frame is ever read
        past = state.read()
        state.write(mod.time_conv, x[:, :, -1:])
        if past is not None:  # kernel 3, stride 2, no padding: (B, C, 1 + t, h, w) -> (B, C, t/2, h, w)
            x = mod.time_conv(torch.cat([past, x], dim=2))
    return x


def run_layer(layer: nn.Module, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
    """One entry of `down_blocks` / `up_blocks` / a mid block's lists, in either Wan 2.1 or 2.2 layout."""
    if isinstance(layer, WanResidualBlock):
        return residual_block(layer, x, state)
    if isinstance(layer, WanAttentionBlock):  # per frame, no temporal context
        return layer(x)
    if isinstance(layer, WanResample):
        return resample(layer, x, state)
    if isinstance(layer, WanResidualDownBlock):  # Wan 2.2 encoder
        shortcut = layer.avg_shortcut(x)
        for resnet in layer.resnets:
            x = residual_block(resnet, x, state)
        if layer.downsampler is not None:
            x = resample(layer.downsampler, x, state)
        return x + shortcut
    if isinstance(layer, WanResidualUpBlock):  # Wan 2.2 decoder
        x_in = x
        for resnet in layer.resnets:
            x = residual_block(resnet, x, state)
        if layer.upsampler is not None:
            x = resample(layer.upsampler, x, state)
        if layer.avg_shortcut is not None:
            x = x + layer.avg_shortcut(x_in, first_chunk=state.first)
        return x
    if isinstance(layer, WanUpBlock):  # Wan 2.1 decoder
        for resnet in layer.resnets:
            x = residual_block(resnet, x, state)
        return x if layer.upsamplers is None else resample(layer.upsamplers[0], x, state)
    raise ConfigError(f"no streaming rule for {type(layer).__name__}: diffusers' Wan VAE changed; extend run_layer")


def mid_block(mid: nn.Module, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
    """`WanMidBlock.forward`: resnet, then (attention, resnet) pairs."""
    x = residual_block(mid.resnets[0], x, state)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            x = attn(x)
        x = residual_block(resnet, x, state)
    return x


def encoder_chunk(enc: nn.Module, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
    """`WanEncoder3d.forward` on one chunk: (B, C_in, t, H, W) -> (B, 2 z_dim, t', H/8, W/8)."""
    x = causal_conv(enc.conv_in, x, state)
    for layer in enc.down_blocks:
        x = run_layer(layer, x, state)
    x = mid_block(enc.mid_block, x, state)
    return causal_conv(enc.conv_out, enc.nonlinearity(rms_norm(enc.norm_out, x)), state)


def decoder_chunk(dec: nn.Module, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
    """`WanDecoder3d.forward` on one latent frame: (B, z_dim, 1, h, w) -> (B, C_out, 1 or 4, 8h, 8w)."""
    x = causal_conv(dec.conv_in, x, state)
    x = mid_block(dec.mid_block, x, state)
    for layer in dec.up_blocks:
        x = run_layer(layer, x, state)
    return causal_conv(dec.conv_out, dec.nonlinearity(rms_norm(dec.norm_out, x)), state)
