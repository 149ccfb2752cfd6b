"""LoRA on the planner LM that acts on the canvas positions only, in one pass.

The design: the prefix runs with the base weights and the canvas tokens with the LoRA-adapted weights, reading
the prefix through the KV cache. Canvas tokens are always the last ``n_canvas`` positions of the planner's
sequence, so one pass over prefix + canvas computes the same thing when every adapted linear adds its LoRA
term to the last ``n_canvas`` rows only (tests/test_planner.py proves it against a two-pass KV-cache run).
The update is written with slices and a concat, never an in-place index assignment, so the exported graph
has Slice/Concat nodes and no ScatterND.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from metacanvas_deploy.mc_export.errors import ConfigError


class LoRALinear(nn.Module):
    """``base(x)``, plus ``(alpha / rank) * B(A(x))`` on the last ``n_canvas`` positions of x (B, S, D_in).

    Parameter names follow PEFT (``base_layer``, ``lora_A``, ``lora_B``). Initialised as PEFT does (A
    Kaiming-uniform, B zero), so a fresh LoRA is the identity.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, n_canvas: int):
        super().__init__()
        if rank <= 0 or n_canvas <= 0:
            raise ConfigError(f"LoRALinear needs rank > 0 and n_canvas > 0, got rank={rank}, n_canvas={n_canvas}")
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.n_canvas = n_canvas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n_canvas
        y = self.base_layer(x)  # (B, S, D_out)
        delta = self.lora_B(self.lora_A(x[:, -n:])) * self.scaling  # (B, N, D_out)
        return torch.cat([y[:, :-n], y[:, -n:] + delta], dim=1)  # (B, S, D_out)

    def merged(self) -> nn.Linear:
        """A plain Linear with the LoRA folded in (W + scaling * B @ A): the adapted weights at every position."""
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.scaling * self.lora_B.weight @ self.lora_A.weight)
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out.to(base.weight.dtype)


def apply_lora(layers: Sequence[nn.Module], rank: int, alpha: float, targets: Sequence[str],
               n_canvas: int) -> list[LoRALinear]:
    """Wrap, in place, every ``nn.Linear`` named in ``targets`` inside each of ``layers`` (LM decoder layers).

    Returns the new LoRA modules; rank 0 wraps nothing. A target name that matches no Linear in a layer is a
    ConfigError (a checkpoint's LoRA naming that this model does not have).
    """
    if rank == 0:
        return []
    wrapped = []
    for i, layer in enumerate(layers):
        found = set()
        for parent_name, parent in list(layer.named_modules()):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    lora = LoRALinear(child, rank, alpha, n_canvas).to(child.weight.device, child.weight.dtype)
                    setattr(parent, name, lora)
                    wrapped.append(lora)
                    found.add(name)
        missing = sorted(set(targets) - found)
        if missing:
            names = sorted({n.split(".")[-1] for n, m in layer.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"lora_targets {missing} match no Linear in decoder layer {i}; its linears are {names}")
    return wrapped


def lora_modules(module: nn.Module) -> Iterator[LoRALinear]:
    """Every LoRALinear inside ``module``."""
    return (m for m in module.modules() if isinstance(m, LoRALinear))


def unwrap_lora(module: nn.Module, merge: bool) -> nn.Module:
    """Replace, in place, every LoRALinear in ``module`` by its base Linear (``merge=False``: the prefix's
    weights) or by the merged Linear (``merge=True``: the canvas's weights). For reference computations."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged() if merge else child.base_layer)
    return module
