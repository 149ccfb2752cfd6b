"""Safetensors files written one tensor at a time, sharded the way Hugging Face checkpoints are.

The safetensors format is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and
``data_offsets`` [begin, end) into the data that follows; ``__metadata__`` a str -> str map; padded with spaces
to a multiple of 8 bytes), then the raw little-endian tensor bytes, contiguous and in offset order. Every shape
is known before a byte is written (from a model on the `meta` device), so a shard's header is written first and
its tensors are appended as they are generated: the writer holds one chunk of one tensor, never a shard.

Sharding follows transformers' and diffusers' own ``save_pretrained``: tensors fill a shard in order until the
next one would pass ``max_shard_bytes`` (a tensor larger than that gets a shard of its own); the files are named
``{prefix}-00001-of-0000N.safetensors`` with a ``{prefix}.safetensors.index.json`` (``metadata.total_size`` =
the tensor bytes, ``weight_map`` tensor -> file) or, for one shard, ``{prefix}.safetensors`` with no index.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from metacanvas_deploy.mc_export.errors import CheckpointError

# torch dtype -> safetensors dtype name
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
# transformers' and diffusers' weight file prefixes
TRANSFORMERS_PREFIX, DIFFUSERS_PREFIX = "model", "diffusion_pytorch_model"


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its name in the file, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class ShardPlan:
    """One safetensors file: its name and its tensors, in file order."""

    file: str
    tensors: tuple[TensorPlan, ...]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def header(self) -> bytes:
        """The 8-byte length and the JSON header, padded with spaces to a multiple of 8 bytes."""
        entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.tensors:
            entries[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text

    @property
    def file_bytes(self) -> int:
        return len(self.header()) + self.data_bytes


def plan_shards(tensors: Iterable[TensorPlan], prefix: str, max_shard_bytes: int) -> list[ShardPlan]:
    """Split ``tensors`` (in order) into shards of at most ``max_shard_bytes`` of tensor data, named as
    transformers/diffusers name theirs."""
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{t.name}: dtype {t.dtype} cannot be written (expected one of "
                                  f"{', '.join(map(str, DTYPE_NAMES))})")
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if not groups[-1]:
        raise CheckpointError(f"no tensors to write for {prefix}")
    n = len(groups)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
                                                       for i in range(1, n + 1)]
    return [ShardPlan(name, tuple(g)) for name, g in zip(names, groups)]


def write_shard(directory: Path, shard: ShardPlan, chunks: Callable[[TensorPlan], Iterator[torch.Tensor]],
                on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write one shard: its header, then each tensor's bytes as ``chunks(tensor)`` yields them (flat,
    contiguous, in ``tensor.dtype``). A chunk is written and dropped before the next is asked for."""
    if sys.byteorder != "little":  # safetensors is little-endian; torch's memory is the host's
        raise CheckpointError("safetensors files are written on little-endian hosts only")
    with open(Path(directory) / shard.file, "wb") as f:
        f.write(shard.header())
        for t in shard.tensors:
            written = 0
            for chunk in chunks(t):
                if chunk.dtype != t.dtype or not chunk.is_contiguous():
                    raise CheckpointError(f"{t.name}: a chunk of {chunk.dtype} (contiguous: "
                                          f"{chunk.is_contiguous()}), expected contiguous {t.dtype}")
                f.write(memoryview(chunk.view(torch.uint8).numpy()))
                n = chunk.numel() * chunk.element_size()
                written += n
                del chunk  # before the generator makes the next one: one chunk alive at a time
                on_bytes(n)
            if written != t.nbytes:
                raise CheckpointError(f"{t.name}: wrote {written} bytes, its shape {t.shape} needs {t.nbytes}")


def write_index(directory: Path, prefix: str, shards: list[ShardPlan]) -> Path | None:
    """``{prefix}.safetensors.index.json`` for a sharded part (None and no file for a single shard)."""
    if len(shards) == 1:
        return None
    weight_map = {t.name: s.file for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": sum(s.data_bytes for s in shards)},
             "weight_map": dict(sorted(weight_map.items()))}
    path = Path(directory) / f"{prefix}.safetensors.index.json"
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path
