"""What every backbone adapter shares: the canvas hook on the DiT's patch embedding.

The DiT stays a stock diffusers model. A forward hook on its patch-embedding module replaces the embedded
tokens x by ``CanvasInjector(x, canvas, t)`` on the noisy target tokens only; each backbone says where those
tokens are in its own layout (``inject``). With no call bound the hook returns the output untouched, so the
model is bit-identical to stock diffusers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class CanvasCall:
    """The canvas state of one DiT forward."""

    canvas: torch.Tensor  # (B, T, H, W, D_dit): the canvas residual on the target token grid
    timestep: torch.Tensor  # (B,): the injector's timestep, backbone scale 0..1000
    reference_frames: int = 0  # Wan r2v: leading latent frames that are references (no canvas)


class CanvasHook:
    """Applies the canvas injector right after ``module`` (the DiT's patch embedding) while a call is bound."""

    def __init__(self, module: nn.Module, inject: Callable[[torch.Tensor, CanvasCall], torch.Tensor]):
        self._inject = inject
        self._call: CanvasCall | None = None
        self._handle = module.register_forward_hook(self._hook)

    @contextlib.contextmanager
    def bind(self, call: CanvasCall | None) -> Iterator[None]:
        previous, self._call = self._call, call
        try:
            yield
        finally:
            self._call = previous

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._call is None:
            return output
        return self._inject(output, self._call)


@dataclass
class Conditioning:
    """What the planner and the context MLP hand to a backbone for one request (B prompts).

    Every tensor is batched the same way; the negative (unconditional CFG) branch is None when CFG is off.
    Padded prompt positions are zero in the embeddings and 0 in the masks.
    """

    prompt_embeds: torch.Tensor  # (B, L, D_txt)
    prompt_mask: torch.Tensor  # (B, L) 1 = real token
    canvas_states: torch.Tensor | None = None  # (B, N_canvas, D_mllm); None = no canvas (stock model)
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_mask: torch.Tensor | None = None
    negative_canvas_states: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None  # (B, pooled_dim): FLUX only
    negative_pooled_prompt_embeds: torch.Tensor | None = None


@dataclass
class SampleOutput:
    """A reference sample: decoded frames plus what the DiT saw, for parity checks."""

    frames: np.ndarray  # (B, F, H, W, 3) uint8; F = 1 for images
    latents: torch.Tensor  # the final latents, before VAE decoding (backbone layout)
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
