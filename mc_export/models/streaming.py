"""A PyTorch reference larger than memory, run block by block: the weights of each repeated block (every child of
an `nn.ModuleList`: transformer blocks, LM layers, VAE resnets...) are read from the checkpoint just before the
block runs and put back on `meta` right after; everything else (embeddings, heads, norms: small beside the blocks)
is loaded once for the whole run. Peak weight memory: the resident part plus one block.

This is what gates a full-size stage that does not fit the memory budget against its ONNX export: the same module,
the same weights in fp32, the same kernels as `lazy.materialized`, so the reference's outputs are the ones a
materialised run gives, bit for bit (tests/test_lazy_weights.py). It costs a read of every block's weights per
forward call: fine for a gate's few calls, not a way to serve.

Only blocks are streamed because a block is entered through its `__call__` (so the hooks see it), while a parent's
forward may read a small child's weight directly (`F.linear(x, self.proj.weight)`), which must stay resident.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from metacanvas_deploy.mc_export.models.lazy import LazyWeights, fp32_bytes


def stream_units(module: nn.Module) -> list[nn.Module]:
    """The outermost children of `nn.ModuleList`s inside ``module``: the blocks that are streamed."""
    units: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                units.extend(c for c in child if any(True for _ in c.parameters()))
            else:
                walk(child)

    walk(module)
    return units


def resident_bytes(module: nn.Module) -> tuple[int, int]:
    """(fp32 bytes held for the whole run, fp32 bytes of the largest streamed block)."""
    units = stream_units(module)
    streamed = {id(p) for u in units for p in u.parameters()}
    resident = sum(4 * p.numel() for p in module.parameters() if id(p) not in streamed)
    return resident, max((fp32_bytes(u) for u in units), default=0)


@contextlib.contextmanager
def streamed(module: nn.Module, weights: LazyWeights, on_block=None) -> Iterator[nn.Module]:
    """Run ``module`` (parameters on `meta`) with its weights streamed block by block (see the module docstring).
    Everything is back on `meta` when the block exits. ``on_block()`` is called after each block's weights load
    (progress)."""
    units = stream_units(module)
    in_units = {id(p) for u in units for p in u.parameters()}
    refs = weights.refs(module)
    by_id = {id(p): refs[n] for n, p in module.named_parameters()}
    resident = [(owner, name, p) for owner in module.modules() for name, p in owner._parameters.items()
                if p is not None and p.is_meta and id(p) not in in_units]
    unit_slots = [[(owner, name, p) for owner in unit.modules() for name, p in owner._parameters.items()
                   if p is not None and p.is_meta] for unit in units]
    hooks = []
    try:
        _load(resident, by_id)
        for unit, slots in zip(units, unit_slots):
            hooks.append(unit.register_forward_pre_hook(lambda _m, _a, s=slots: _load(s, by_id, on_block)))
            hooks.append(unit.register_forward_hook(lambda _m, _a, _o, s=slots: _restore(s)))
        yield module
    finally:
        for h in hooks:
            h.remove()
        for slots in unit_slots:  # a forward that raised inside a block leaves it loaded
            _restore(slots)
        _restore(resident)


def _load(slots, by_id, done=None) -> None:
    """Read each slot's tensor (fp32) into a real parameter; a tied parameter is read once."""
    real: dict[int, nn.Parameter] = {}
    for owner, name, p in slots:
        if id(p) not in real:
            real[id(p)] = nn.Parameter(by_id[id(p)].load(p.dtype), requires_grad=False)
        owner._parameters[name] = real[id(p)]
    if done is not None:
        done()


def _restore(slots) -> None:
    """Put each slot's original `meta` parameter back (the real tensor is freed with its last reference)."""
    for owner, name, p in slots:
        owner._parameters[name] = p
