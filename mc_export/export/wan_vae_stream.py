"""Wan's VAE (`AutoencoderKLWan`, 2.1 and 2.2 layouts) as one-chunk modules with explicit causal caches.

diffusers' `_encode` / `_decode` loop over frame chunks (encode: frame 0 alone, then 4 frames per chunk;
decode: one latent frame per chunk) and thread a Python list `feat_cache` through every causal conv. An
export unrolls that loop: one graph per frame count, growing with it. Here one call computes ONE chunk and
each cache is a graph input (`past.<conv path>`) and output (`present.<conv path>`), so one graph serves any
video length and memory is bounded: each causal conv keeps its last 2 input frames (1 for a temporal
downsampler), whatever the length.

The chunk itself (`wan_vae_stream_blocks`) calls upstream's submodules block by block. Chunk 0 is a
different computation upstream (the temporal upsampler skips its time_conv, `DupUp3D` drops frames, the
temporal downsampler stores instead of convolving), so chunk 0 and the rest are two graphs of one module:
called without caches it is chunk 0, with caches a later chunk. Both have static frame counts
(TensorRT-friendly) and chunk 0 already emits caches in steady-state shape, so the host loop is just
`out, *caches = m(chunk, *caches)`. No `clear_cache` / `_conv_num` bookkeeping is used, hence no patch.

Boundaries: the decoder takes z already de-normalised the way the pipeline does it
(`z / (1 / latents_std) + latents_mean`) and returns unpatchified pixels clamped to [-1, 1]; the encoder takes
pixels in [-1, 1] and returns the posterior mean (`latent_dist.mode()`), not normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import patchify, unpatchify
from torch import nn

from metacanvas_deploy.mc_export.errors import ConfigError, InputError
from metacanvas_deploy.mc_export.export.wan_vae_stream_blocks import ChunkState, decoder_chunk, encoder_chunk

CHUNK_FRAMES = 4  # pixel frames per encoder chunk after the first: diffusers' `_encode` hard-codes 4
PAST, PRESENT = "past.", "present."  # cache input / output name prefixes (the KV-cache convention)
_DRY_RUN_GRID = (2, 3)  # latent (h, w) of the layout dry run: unequal, so a swapped axis cannot pass


@dataclass(frozen=True)
class CacheSlot:
    """One causal cache: the last `frames` inputs of the conv at path `name` inside `vae.decoder` / `vae.encoder`.

    Spatial dims are the latent grid's times `factor` (decoder: 1, 2, 4, 8 going up; encoder: 8, 4, 2, 1).
    """

    name: str
    channels: int
    frames: int
    factor: int

    @property
    def input_name(self) -> str:
        return PAST + self.name

    @property
    def output_name(self) -> str:
        return PRESENT + self.name

    def shape(self, batch, latent_height, latent_width) -> tuple:
        return (batch, self.channels, self.frames, latent_height * self.factor, latent_width * self.factor)


class CacheSpec(NamedTuple):
    name: str  # graph input name `past.<conv path>`; the matching output is `present.<conv path>`
    shape: tuple  # (B, C, T <= 2, h, w)


class _Streaming(nn.Module):
    """Shared by encoder and decoder: the cache layout (from a dry run of chunk 0) and the graph's names."""

    part = input_name = output_name = ""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        if 2 ** sum(vae.temperal_downsample) != CHUNK_FRAMES:
            raise ConfigError(f"streaming assumes {CHUNK_FRAMES}x temporal compression (diffusers' chunking), got "
                              f"temperal_downsample={vae.temperal_downsample}")
        self.patch_size = vae.config.patch_size or 1
        self.spatial = vae.config.scale_factor_spatial
        self.z_dim = vae.config.z_dim
        self.dropout = vae.config.dropout  # left out of the chunk: fine in eval or at p = 0
        self.slots: tuple[CacheSlot, ...] = ()

    def _init_slots(self, net: nn.Module) -> None:
        self._paths = {m: n for n, m in net.named_modules()}  # plain dict: not registered as submodules
        self.slots = self._dry_run()

    def _chunk(self, x: torch.Tensor, past: tuple | None) -> tuple[torch.Tensor, ChunkState]:
        raise NotImplementedError

    def _example(self, batch: int, latent_height: int, latent_width: int, first: bool) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _dry_run(self) -> tuple[CacheSlot, ...]:
        """Run chunk 0 on a tiny zero input; its caches (already steady-state) give names, channels, frames."""
        lh, lw = _DRY_RUN_GRID
        _, state = self._chunk(self._example(1, lh, lw, first=True), None)
        slots = []
        for name, cache in zip(state.names, state.present):
            _, c, t, h, w = cache.shape
            if h % lh or w % lw or h // lh != w // lw:
                raise ConfigError(f"{self.part} cache {name} is {h}x{w} on a {lh}x{lw} latent grid: no fixed factor")
            slots.append(CacheSlot(name, c, t, h // lh))
        if len(set(state.names)) != len(slots):
            raise ConfigError(f"{self.part}: a conv wrote two caches: {state.names}")
        return tuple(slots)

    def _checked_state(self, state: ChunkState) -> list[torch.Tensor]:
        state.check_consumed()
        if self.training and self.dropout > 0:
            raise ConfigError(f"streaming {self.part} leaves dropout out: call .eval() (dropout={self.dropout})")
        return state.present

    def input_names(self, first: bool) -> list[str]:
        return [self.input_name] + ([] if first else [s.input_name for s in self.slots])

    def output_names(self) -> list[str]:
        return [self.output_name] + [s.output_name for s in self.slots]


class WanStreamingDecoder(_Streaming):
    """`vae.decode(z).sample`, one latent frame per call.

    forward(latents (B, z_dim, 1, h, w), *past) -> (video (B, 3, F, 16h, 16w), *present)
    F = 1 on chunk 0 (called with no caches), 4 on every later chunk (called with the previous call's caches,
    in `self.slots` order). z is de-normalised already (`z / (1/std) + mean`, as the pipeline does before
    `vae.decode`); video is clamped to [-1, 1].
    """

    part, input_name, output_name = "decoder", "latents", "video"

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(vae)
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder
        self._init_slots(self.decoder)

    def _example(self, batch, latent_height, latent_width, first) -> torch.Tensor:
        return torch.zeros(batch, self.z_dim, 1, latent_height, latent_width).to(next(self.parameters()))

    def _chunk(self, x, past):
        x = self.post_quant_conv(x)  # 1x1x1 conv: per frame, so per chunk equals upstream's call on all of z
        state = ChunkState(self._paths, past)
        return decoder_chunk(self.decoder, x, state), state

    def forward(self, latents: torch.Tensor, *caches: torch.Tensor) -> tuple:
        if latents.dim() != 5 or latents.shape[1] != self.z_dim or latents.shape[2] != 1:
            raise InputError(f"decoder chunk must be (B, {self.z_dim}, 1, h, w), got {tuple(latents.shape)}")
        out, state = self._chunk(latents, caches or None)  # (B, 3 p^2, F, H/p, W/p)
        video = unpatchify(out, patch_size=self.patch_size).clamp(-1.0, 1.0)  # (B, 3, F, H, W)
        return (video, *self._checked_state(state))


class WanStreamingEncoder(_Streaming):
    """`vae.encode(x).latent_dist.mode()`, one chunk per call.

    forward(video (B, 3, F, H, W), *past) -> (latents (B, z_dim, 1, H/16, W/16), *present)
    F = 1 on chunk 0 (called with no caches), 4 on every later chunk.
    """

    part, input_name, output_name = "encoder", "video", "latents"

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(vae)
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self._init_slots(self.encoder)

    def _example(self, batch, latent_height, latent_width, first) -> torch.Tensor:
        frames, s = (1 if first else CHUNK_FRAMES), self.spatial
        return torch.zeros(batch, 3, frames, latent_height * s, latent_width * s).to(next(self.parameters()))

    def _chunk(self, x, past):
        x = patchify(x, patch_size=self.patch_size)  # (B, 3 p^2, F, H/p, W/p)
        state = ChunkState(self._paths, past)
        return self.quant_conv(encoder_chunk(self.encoder, x, state)), state  # 1x1x1 conv: per frame

    def forward(self, video: torch.Tensor, *caches: torch.Tensor) -> tuple:
        frames = CHUNK_FRAMES if caches else 1
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] != frames:
            raise InputError(f"encoder {'later' if caches else 'first'} chunk must be (B, 3, {frames}, H, W), got "
                             f"{tuple(video.shape)}")
        if video.shape[3] % self.spatial or video.shape[4] % self.spatial:
            raise InputError(f"height and width must be multiples of {self.spatial}, got {tuple(video.shape[3:])}")
        moments, state = self._chunk(video, caches or None)  # (B, 2 z_dim, 1, H/16, W/16)
        mean, _logvar = moments.chunk(2, dim=1)  # DiagonalGaussianDistribution.mode() is the mean
        return (mean, *self._checked_state(state))


_MODULES = {"decoder": WanStreamingDecoder, "encoder": WanStreamingEncoder}


def cache_layout(vae: nn.Module, part: str) -> tuple[CacheSlot, ...]:
    """The causal caches of `part` ('decoder' or 'encoder') in graph order, from the module's dry run."""
    if part not in _MODULES:
        raise ConfigError(f"part must be 'decoder' or 'encoder', got {part!r}")
    return _MODULES[part](vae).slots


def cache_specs(vae: nn.Module, height: int, width: int, batch: int = 1, part: str = "decoder") -> list[CacheSpec]:
    """Name and shape of every cache of `part` for a `height` x `width` pixel video (graph input order)."""
    s = vae.config.scale_factor_spatial
    if height % s or width % s:
        raise InputError(f"height and width must be multiples of {s}, got {height}x{width}")
    return [CacheSpec(slot.input_name, slot.shape(batch, height // s, width // s))
            for slot in cache_layout(vae, part)]


@torch.no_grad()
def decode_streaming(decoder: WanStreamingDecoder, z: torch.Tensor) -> torch.Tensor:
    """(B, C, T, h, w) de-normalised latents -> (B, 3, 1 + 4(T-1), 16h, 16w) video, one chunk at a time."""
    video, *caches = decoder(z[:, :, :1])
    chunks = [video]
    for i in range(1, z.shape[2]):
        video, *caches = decoder(z[:, :, i:i + 1], *caches)
        chunks.append(video)
    return torch.cat(chunks, dim=2)


@torch.no_grad()
def encode_streaming(encoder: WanStreamingEncoder, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 1 + 4k, H, W) video -> (B, C, 1 + k, H/16, W/16) posterior mean, one chunk at a time.

    Unlike diffusers (which silently drops trailing frames), a frame count not of the form 1 + 4k is an error.
    """
    if x.dim() != 5 or (x.shape[2] - 1) % CHUNK_FRAMES:
        raise InputError(f"video must be (B, 3, 1 + {CHUNK_FRAMES}k, H, W), got {tuple(x.shape)}: "
                         f"trim or pad the frames")
    mean, *caches = encoder(x[:, :, :1])
    chunks = [mean]
    for start in range(1, x.shape[2], CHUNK_FRAMES):
        mean, *caches = encoder(x[:, :, start:start + CHUNK_FRAMES], *caches)
        chunks.append(mean)
    return torch.cat(chunks, dim=2)
