"""Seeded random values for one named tensor at a time: a full-size checkpoint without ever holding the model.

Every tensor's values are a function of (seed, its name in the checkpoint, its init rule, its shape) alone, so a
writer can make them in any order, one at a time, and a test can make any one of them again. A tensor is
generated in flat chunks of at most ``CHUNK_ELEMS`` elements, chunk ``i`` from its own generator seeded by
sha256(seed, name, i): memory stays at one chunk whatever the tensor's size (the 7B planner's embedding is
545M elements), and the values do not depend on how a writer consumes them.

The rule follows the module a parameter belongs to, as the libraries' own initialisers do, so that a random
model runs with activations of a sensible scale:
- ``Linear`` and ``Embedding`` weights: normal(0, 0.02) (transformers' ``initializer_range``);
- convolution weights: normal(0, 1 / sqrt(fan_in)) (variance-preserving: VAEs stack dozens of them);
- normalisation layers (LayerNorm, GroupNorm, RMSNorm, Wan's ``gamma``): weight ones, bias zeros;
- every other bias: zeros;
- free parameters (AdaLN ``scale_shift_table``, canvas tokens): normal(0, 1 / sqrt(last dim)), as diffusers;
- the canvas layers that start at zero (canvas-prep and injector output layers, LoRA B) stay zero unless
  ``random_canvas``, then normal(0, 0.02); LoRA A is normal(0, 1 / sqrt(in_features)).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from metacanvas_deploy.mc_export.errors import ConfigError

CHUNK_ELEMS = 1 << 24  # 16M elements: 64 MB in fp32 while generated, 32 MB in bf16 while written
LINEAR_STD = 0.02


@dataclass(frozen=True)
class InitRule:
    """How one tensor's values are made: ``normal`` (mean 0, ``std``), ``zeros`` or ``ones``."""

    kind: str
    std: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("normal", "zeros", "ones"):
            raise ConfigError(f"unknown init rule {self.kind!r}")


ZEROS, ONES = InitRule("zeros"), InitRule("ones")


def _is_norm(module: nn.Module) -> bool:
    """Normalisation layers by type, or by name for the libraries' own (Qwen2RMSNorm, diffusers' RMSNorm, Wan's
    RMS_norm, DC-AE's RMSNorm2d...): none of them holds a projection among its own parameters."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)):
        return True
    return "norm" in type(module).__name__.lower() and not any(True for _ in module.children())


def zero_init_layers(model: nn.Module) -> set[int]:
    """ids of the modules MetaCanvas starts at zero: canvas-prep and injector output layers, LoRA B."""
    from metacanvas_deploy.mc_export.models.connectors import CanvasInjector, CanvasPrep
    from metacanvas_deploy.mc_export.models.lora import LoRALinear

    ids = set()
    for m in model.modules():
        if isinstance(m, (CanvasPrep, CanvasInjector)):
            ids.add(id(m.out))
        elif isinstance(m, LoRALinear):
            ids.add(id(m.lora_B))
    return ids


def lora_a_layers(model: nn.Module) -> set[int]:
    from metacanvas_deploy.mc_export.models.lora import LoRALinear

    return {id(m.lora_A) for m in model.modules() if isinstance(m, LoRALinear)}


def init_rule(module: nn.Module, leaf: str, shape: tuple[int, ...], *, zero_init: bool = False,
              lora_a: bool = False, random_canvas: bool = False) -> InitRule:
    """The rule for parameter ``leaf`` (``weight``, ``bias``, ``gamma``...) of ``module``."""
    if zero_init:
        return InitRule("normal", LINEAR_STD) if random_canvas else ZEROS
    if lora_a and leaf == "weight":
        return InitRule("normal", 1.0 / math.sqrt(shape[1]))
    if _is_norm(module):
        return ZEROS if leaf in ("bias", "beta") else ONES
    if leaf == "bias":
        return ZEROS
    if leaf == "weight" and isinstance(module, (nn.Linear, nn.Embedding)):
        return InitRule("normal", LINEAR_STD)
    if leaf == "weight" and isinstance(module, nn.modules.conv._ConvNd):
        fan_in = math.prod(shape[1:])
        return InitRule("normal", 1.0 / math.sqrt(fan_in))
    if not shape:
        return ONES  # a learnt scalar (a scale) starts at one
    return InitRule("normal", 1.0 / math.sqrt(shape[-1]))


def model_init_rules(model: nn.Module, random_canvas: bool = False) -> dict[str, InitRule]:
    """Every parameter of ``model`` (by its model-level name) -> its rule. Tied parameters appear once."""
    zeros, lora_a = zero_init_layers(model), lora_a_layers(model)
    rules = {}
    for owner_name, owner in model.named_modules():
        for leaf, p in owner.named_parameters(recurse=False):
            name = f"{owner_name}.{leaf}" if owner_name else leaf
            rules[name] = init_rule(owner, leaf, tuple(p.shape), zero_init=id(owner) in zeros,
                                    lora_a=id(owner) in lora_a, random_canvas=random_canvas)
    return rules


def tensor_seed(seed: int, name: str, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of tensor ``name``: 63 bits of sha256(seed, name, chunk)."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tensor_chunks(seed: int, name: str, shape: tuple[int, ...], rule: InitRule, dtype: torch.dtype,
                  chunk_elems: int = CHUNK_ELEMS) -> Iterator[torch.Tensor]:
    """The flat values of one tensor, ``chunk_elems`` at a time, in ``dtype`` (drawn in float32, then cast)."""
    n = math.prod(shape)
    for i, start in enumerate(range(0, n, chunk_elems)):
        k = min(chunk_elems, n - start)
        if rule.kind == "zeros":
            yield torch.zeros(k, dtype=dtype)
        elif rule.kind == "ones":
            yield torch.ones(k, dtype=dtype)
        else:
            g = torch.Generator().manual_seed(tensor_seed(seed, name, i))
            yield torch.randn(k, generator=g, dtype=torch.float32).mul_(rule.std).to(dtype)


def make_tensor(seed: int, name: str, shape: tuple[int, ...], rule: InitRule, dtype: torch.dtype,
                chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """The whole tensor ``tensor_chunks`` streams (for tests and small tensors)."""
    parts = list(tensor_chunks(seed, name, shape, rule, dtype, chunk_elems))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
    return flat.view(shape)
