"""Checkpoints too large for memory: the model's structure on the `meta` device, its weights left on disk.

A full-size checkpoint (FLUX.1-Kontext 12B = 48 GB in fp32, Qwen2.5-VL-7B = 30 GB) does not fit a 24 GiB machine.
`MetaCanvas.from_pretrained(path, lazy=True)` builds the model with every parameter on `meta` (buffers such as
RoPE frequencies are computed for real: they are small and derived from the config), and `LazyWeights` records
where each parameter lives: a `TensorRef` (file, key, dtype, shape) in the checkpoint's safetensors. Export then
traces the meta model and streams each weight from disk into the ONNX file one tensor at a time
(`mc_export.export.onnx_export`); a stage small enough to hold is materialised alone to be gated
(`materialized`), then dropped again. Nothing is read but safetensors headers until a tensor is asked for.
This module knows checkpoint files and torch modules, never the model class built from them (which imports it).

The key mapping is checked when the model is built: every parameter must resolve to exactly one checkpoint
tensor of the same shape, or the load fails naming what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from metacanvas_deploy.mc_export.errors import CheckpointError
from metacanvas_deploy.mc_export.models import checkpoint as ckpt
from metacanvas_deploy.runtime.memory import available_bytes

# safetensors dtype names -> torch
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is corrupt, not big


@dataclass(frozen=True)
class TensorRef:
    """One tensor in a safetensors file, not yet read."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes_fp32(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return 4 * n

    def load(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Read this tensor alone (safetensors seeks to it) and cast it to ``dtype``."""
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as f:
            t = f.get_tensor(self.key)
        if tuple(t.shape) != self.shape:
            raise CheckpointError(f"{self.file}: {self.key} changed on disk ({tuple(t.shape)} != {self.shape})")
        return t.to(dtype).contiguous()


def read_header(file: Path) -> dict[str, TensorRef]:
    """The tensors of one safetensors file, from its JSON header only (stdlib; no tensor bytes read)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise CheckpointError(f"{file}: safetensors header of {n} bytes; the file is corrupt")
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the safetensors header of {file}: {e}") from e
    refs = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{file}: {key} has unsupported dtype {info.get('dtype')!r}")
        refs[key] = TensorRef(Path(file), key, _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]))
    return refs


def index_part(directory: Path) -> dict[str, TensorRef]:
    """Every tensor of a checkpoint part (one or many `*.safetensors` shards), by key. A sharded part's
    ``*.safetensors.index.json`` must agree with its shards (`_check_index`)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{directory} holds {len(indexes)} safetensors indexes "
                              f"({', '.join(i.name for i in indexes)}); a part has one")
    if not files and not indexes:
        raise CheckpointError(f"{directory} holds no .safetensors weights")
    weight_map = _read_index(indexes[0]) if indexes else None
    if weight_map is not None:
        stray = sorted({f.name for f in files} - set(weight_map.values()))
        if stray:  # transformers would load a lone model.safetensors and ignore the index: refuse to guess
            raise CheckpointError(f"{directory} holds {', '.join(stray)} beside {indexes[0].name}, which does not "
                                  "name it; keep either the index and its shards or a single file")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    refs: dict[str, TensorRef] = {}
    for f in files:
        if not f.is_file():
            n = sum(1 for v in weight_map.values() if v == f.name)
            raise CheckpointError(f"{indexes[0]} names the shard {f.name} ({n} tensors) but {directory} has no such "
                                  "file: the checkpoint is incomplete; copy the missing shard or write it again")
        for key, ref in read_header(f).items():
            if key in refs:
                raise CheckpointError(f"{directory}: tensor {key} is in both {refs[key].file.name} and {f.name}")
            refs[key] = ref
    if weight_map is not None:
        _check_index(indexes[0], weight_map, refs)
    return refs


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file name) of a Hugging Face safetensors index."""
    index = ckpt.read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path} has no weight_map of tensor names to shard files")
    if any(Path(v).name != v for v in weight_map.values()):
        raise CheckpointError(f"{path} names a shard outside its folder; shards sit beside their index")
    return weight_map


def _check_index(path: Path, weight_map: dict[str, str], refs: dict[str, TensorRef]) -> None:
    """Every tensor the index names is in the shard it names, and every shard tensor is in the index (the
    libraries' loaders read only what the index lists: a disagreement is a weight silently lost)."""
    wrong = [(k, f) for k, f in weight_map.items() if k not in refs or refs[k].file.name != f]
    if wrong:
        key, file = wrong[0]
        where = f"it is in {refs[key].file.name}" if key in refs else "no shard holds it"
        raise CheckpointError(f"{path} puts {len(wrong)} tensors in shards that do not hold them, e.g. {key} in "
                              f"{file} ({where}); the index and the shards are from different checkpoints")
    unlisted = sorted(set(refs) - set(weight_map))
    if unlisted:
        raise CheckpointError(f"{path} does not list {len(unlisted)} tensors its shards hold, e.g. {unlisted[0]} "
                              f"in {refs[unlisted[0]].file.name}; the index and the shards disagree")


def check_weight_files(path: Path) -> None:
    """Each weight part's safetensors files and index agree (headers only, no tensor read)."""
    for part in ("planner", "transformer", "vae", "metacanvas"):
        index_part(Path(path) / part)


def _qwen_candidates(module_key: str) -> tuple[str, ...]:
    """Checkpoint names of one Qwen2.5-VL parameter: its module name (transformers 5 layout, LoRA wrapper
    removed) and the legacy layout the published checkpoints use (`model.layers.*`, `visual.*`)."""
    key = module_key.replace(".base_layer.", ".")
    out = [key]
    if key.startswith("model.language_model."):
        out.append("model." + key[len("model.language_model."):])
    elif key.startswith("model.visual."):
        out.append("visual." + key[len("model.visual."):])
    return tuple(out)


# model-level name prefix -> (checkpoint part, how a name under it is found in that part)
_PARTS = (("planner.qwen.", "planner", _qwen_candidates),
          ("transformer.", "transformer", lambda k: (k,)),
          ("vae.", "vae", lambda k: (k,)))


class LazyWeights:
    """Where every parameter of a meta-built `MetaCanvas` lives on disk (by parameter identity)."""

    def __init__(self, model: nn.Module, path: Path):
        self.path = Path(path)
        indexes = {part: index_part(self.path / part) for part in ("planner", "transformer", "vae", "metacanvas")}
        self._refs: dict[int, TensorRef] = {}
        names: dict[int, list[str]] = {}  # tied parameters (lm_head = embed_tokens) have several names
        params = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
        problems = []
        for pid, p in params.items():
            found = [self._find(indexes, name) for name in names[pid]]
            hits = [ref for ref, _ in found if ref is not None]
            if not hits:
                problems.append(found[0][1])
            elif hits[0].shape != tuple(p.shape):
                problems.append(f"{hits[0].file.parent.name}/{hits[0].key} has shape {hits[0].shape}, the "
                                f"config needs {tuple(p.shape)}")
            else:
                self._refs[pid] = hits[0]
        if problems:
            raise CheckpointError(f"checkpoint {self.path} does not fit its configs: {len(problems)} weights: "
                                  + "; ".join(problems[:5]))

    @staticmethod
    def _find(indexes, name: str) -> tuple[TensorRef | None, str]:
        """The checkpoint tensor of one model-level parameter name, or None and why not."""
        part, candidates = "metacanvas", (name,)  # canvas tokens, LoRA, connectors: by model-level name
        for prefix, part_name, cands in _PARTS:
            if name not in indexes["metacanvas"] and name.startswith(prefix):
                part, candidates = part_name, cands(name[len(prefix):])
                break
        found = [indexes[part][c] for c in candidates if c in indexes[part]]
        if len(found) != 1:
            return None, f"{part}/{candidates[0]} ({'missing' if not found else 'ambiguous'})"
        return found[0], ""

    def refs(self, module: nn.Module) -> dict[str, TensorRef]:
        """``module``'s parameters (every name of a tied one: torch.export may use either) -> where they live."""
        out = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) not in self._refs:
                raise CheckpointError(f"parameter {name} does not belong to the checkpoint's model")
            out[name] = self._refs[id(p)]
        return out

    def content_hash(self) -> str:
        """sha256 over every file of the checkpoint's parts (configs and weights), streamed: the build's
        content key without reading the weights into memory."""
        h = hashlib.sha256()
        for part in ckpt.PARTS:
            for f in sorted((self.path / part).iterdir()):
                if f.is_file():
                    h.update(f"{part}/{f.name}|{f.stat().st_size}|".encode())
                    with open(f, "rb") as fh:
                        for block in iter(lambda: fh.read(2**24), b""):
                            h.update(block)
        return h.hexdigest()


def checkpoint_fp32_bytes(path: str | Path) -> int:
    """What the checkpoint's weights take in fp32 (the export precision), from the safetensors headers alone."""
    return sum(ref.nbytes_fp32 for part in ("planner", "transformer", "vae", "metacanvas")
               for ref in index_part(Path(path) / part).values())


def memory_budget() -> int:
    """Bytes a build may hold in weights at once: half of the memory available now (the other half for
    activations, ONNX Runtime's copy of a graph being gated, and the rest of the process)."""
    return available_bytes() // 2


def fp32_bytes(module: nn.Module) -> int:
    return sum(4 * p.numel() for p in module.parameters())


@contextlib.contextmanager
def materialized(module: nn.Module, weights: LazyWeights) -> Iterator[nn.Module]:
    """Load ``module``'s weights (fp32) for the duration of the block, then put its parameters back on `meta`:
    one stage in memory at a time. Shared (tied) parameters are loaded once."""
    slots = [(owner, name, p) for owner in module.modules() for name, p in owner._parameters.items()
             if p is not None and p.is_meta]
    refs = weights.refs(module)
    by_id = {id(p): refs[n] for n, p in module.named_parameters()}
    real: dict[int, nn.Parameter] = {}
    try:
        for owner, name, p in slots:
            if id(p) not in real:
                real[id(p)] = nn.Parameter(by_id[id(p)].load(p.dtype), requires_grad=False)
            owner._parameters[name] = real[id(p)]
        yield module
    finally:
        for owner, name, p in slots:
            owner._parameters[name] = p


@contextlib.contextmanager
def buffers_on_meta(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Move ``module``'s (real) buffers to `meta` for the block, so that a trace sees one device; yields their
    real values by name (as torch.export names them) to be written into the graph."""
    slots = [(owner, name, b) for owner in module.modules() for name, b in owner._buffers.items()
             if b is not None and not b.is_meta]
    values = {name: b for name, b in module.named_buffers() if not b.is_meta}
    try:
        for owner, name, b in slots:
            owner._buffers[name] = b.to("meta")
        yield values
    finally:
        for owner, name, b in slots:
            owner._buffers[name] = b
