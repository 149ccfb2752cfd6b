"""FLOPs of a PyTorch module at given inputs, by `torch.utils.flop_counter.FlopCounterMode`.

The counter counts matrix products and convolutions (2 per multiply-add: 2*M*N*K for an (M, K) x (K, N)
product) and nothing elementwise: the figure is the GEMM-like work, the part a GEMM peak can be set against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> dict:
    """One forward of ``module(*inputs)`` under the counter: {"total": int, "by_op": {aten op: int}} with the
    ops sorted by count, largest first."""
    counter = FlopCounterMode(display=False)
    with counter:
        module(*inputs)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}  # "aten.mm": n
    return {"total": int(counter.get_total_flops()),
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}
