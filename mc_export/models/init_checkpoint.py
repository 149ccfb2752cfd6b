"""`init-checkpoint`: a checkpoint folder with seeded random weights, up to the paper's full sizes.

Two writers, one folder layout (`mc_export.models.checkpoint`):
- ``module`` (tiny, small): the model is built in memory with torch's own initialisers and saved by
  transformers/diffusers (`MetaCanvas.save_pretrained`): the weights ``MetaCanvas.from_preset`` gives.
- ``streamed`` (any preset; the only one for ``full``): the model is built on the `meta` device, its configs are
  written by the libraries themselves, and each tensor is generated from a per-name seeded generator
  (`random_init`) straight into bf16 safetensors shards with an index, as the public checkpoints ship them
  (`safetensors_stream`). Memory: the meta model plus one tensor chunk (~100 MB), whatever the model's size.

Both write into a temporary sibling folder renamed into place at the end; ``--out`` may be new or an empty folder,
never one holding anything. The streamed writer checks the free space first (the byte count is known from the
meta model) and removes its partial folder if the disk fills anyway, saying how much was needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from metacanvas_deploy.mc_export.errors import CheckpointError, ConfigError
from metacanvas_deploy.mc_export.models import random_init
from metacanvas_deploy.mc_export.models import safetensors_stream as st
from metacanvas_deploy.mc_export.models.presets import PLANNERS, PRESETS, get_preset

WRITERS = ("module", "streamed")
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
WEIGHT_DTYPE = torch.bfloat16  # the public checkpoints' dtype
_SLACK_BYTES = 64 * 2**20  # configs, tokenizer.json (~5 MB at Qwen's vocabulary), filesystem overhead
_MAX_SEED = 2**63 - 1


def parse_size(text: str) -> int:
    """``5GB`` (decimal, as Hugging Face's ``max_shard_size``), ``512MiB`` (binary) or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"a size is a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), got {text!r}")
    unit = (m.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class InitCheckpointConfig:
    """What `init-checkpoint` writes. ``writer`` None picks ``module`` for tiny/small and ``streamed`` for full."""

    backbone: str
    preset: str
    out: Path
    seed: int = 0
    planner: str | None = None  # full only: "7b" (default) or "3b"
    random_canvas: bool = False
    writer: str | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    progress: bool = True

    @property
    def resolved_writer(self) -> str:
        return self.writer or ("streamed" if self.preset == "full" else "module")

    def validate(self) -> InitCheckpointConfig:
        """Every "X requires Y" rule of init-checkpoint, checked before any work."""
        from metacanvas_deploy.mc_export.backbones import get

        get(self.backbone)
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        if self.planner is not None and (self.planner not in PLANNERS or self.preset != "full"):
            raise ConfigError(f"--planner {self.planner} needs --preset full and one of {', '.join(PLANNERS)}")
        if self.resolved_writer not in WRITERS:
            raise ConfigError(f"unknown writer {self.writer!r}; expected one of {', '.join(WRITERS)}")
        if self.preset == "full" and self.resolved_writer != "streamed":
            raise ConfigError("the full preset is written streamed: it is never built in memory")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= _MAX_SEED:
            raise ConfigError(f"--seed must be in 0..{_MAX_SEED}, got {self.seed!r}")
        if self.max_shard_bytes < 1:
            raise ConfigError(f"--max-shard-size must be positive, got {self.max_shard_bytes}")
        check_new_folder(Path(self.out))
        return self


def check_new_folder(out: Path) -> None:
    """``out`` must not exist, or be an empty folder: a checkpoint never replaces anything a user has."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; init-checkpoint writes only a new or empty "
                          "folder and never replaces one: remove it or give another --out")


@contextlib.contextmanager
def _new_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out``, renamed to ``out`` when the block succeeds and removed when it fails. An
    existing ``out`` is replaced only while empty (``os.rmdir`` refuses anything else)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # the umask's permissions (mkdtemp's 0700 would be the checkpoint's)
    try:
        yield tmp
        if out.exists():
            try:
                os.rmdir(out)
            except OSError as e:
                raise CheckpointError(f"{out} was filled while the checkpoint was written; it is left as it is "
                                      f"and nothing was written there") from e
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class PartPlan:
    """One checkpoint part's weights: its folder, file prefix, shards, and per tensor its rule."""

    part: str
    prefix: str
    shards: tuple[st.ShardPlan, ...]
    rules: dict  # file tensor name -> InitRule

    @property
    def parameters(self) -> int:
        return sum(t.numel for s in self.shards for t in s.tensors)

    @property
    def file_bytes(self) -> int:
        return sum(s.file_bytes for s in self.shards)


def _planner_key(module_key: str) -> str:
    """A Qwen2.5-VL parameter's name in the public checkpoints (`model.layers.*`, `visual.*`, `lm_head.*`),
    from its module name (transformers 5 nests them under `model.language_model` / `model.visual`)."""
    key = module_key.replace(".base_layer.", ".")
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(new):
            return old + key[len(new):]
    return key


def _part_tensors(model) -> dict[str, list[tuple[str, str]]]:
    """part -> [(name in the part's files, model-level parameter name)], in module order. LoRA weights go to
    `metacanvas/` (with the canvas tokens and connectors), never to the stock planner."""
    stock = {"planner": ("planner.qwen.", _planner_key), "transformer": ("transformer.", str),
             "vae": ("vae.", str)}
    extra = set(model.metacanvas_state_dict())
    parts: dict[str, list[tuple[str, str]]] = {p: [] for p in (*stock, "metacanvas")}
    for name, _ in model.named_parameters():  # a tied parameter once, under its first name
        if name in extra:
            parts["metacanvas"].append((name, name))
            continue
        for part, (prefix, to_key) in stock.items():
            if name.startswith(prefix):
                parts[part].append((to_key(name[len(prefix):]), name))
                break
        else:
            raise ConfigError(f"parameter {name} belongs to no checkpoint part")
    missing = extra - {n for n, _ in parts["metacanvas"]}
    if missing:
        raise ConfigError(f"metacanvas tensors that are not parameters cannot be generated: {sorted(missing)[:3]}")
    return parts


def plan_checkpoint(model, max_shard_bytes: int, random_canvas: bool = False) -> list[PartPlan]:
    """Every part's shards, from a (meta) model's parameter shapes. `metacanvas/` is one file, as the loader
    expects; the stock parts are sharded at ``max_shard_bytes`` with the libraries' names."""
    for part, module in (("transformer", model.transformer), ("vae", model.vae), ("planner", model.planner.qwen)):
        buffers = set(module.state_dict()) - {n for n, _ in module.named_parameters(remove_duplicate=False)}
        if buffers:
            raise ConfigError(f"{part} has persistent buffers {sorted(buffers)[:3]} that a random checkpoint "
                              "cannot generate")
    rules = random_init.model_init_rules(model, random_canvas)
    params = dict(model.named_parameters())
    prefixes = {"planner": st.TRANSFORMERS_PREFIX, "transformer": st.DIFFUSERS_PREFIX,
                "vae": st.DIFFUSERS_PREFIX, "metacanvas": st.TRANSFORMERS_PREFIX}
    plans = []
    for part, names in _part_tensors(model).items():
        tensors = [st.TensorPlan(key, tuple(params[name].shape), WEIGHT_DTYPE) for key, name in names]
        limit = max_shard_bytes if part != "metacanvas" else max(sum(t.nbytes for t in tensors), 1)
        shards = st.plan_shards(tensors, prefixes[part], limit)
        plans.append(PartPlan(part, prefixes[part], tuple(shards), {key: rules[name] for key, name in names}))
    return plans


def _write_configs(folder: Path, model, preset) -> None:
    """Every config file, written by the library that reads it; the tokenizer; the MetaCanvas config."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig

    from metacanvas_deploy.mc_export.models.tokenizer import (
        build_qwen_layout_tokenizer,
        build_tiny_tokenizer,
        save_tokenizer,
    )

    qwen = Qwen2_5_VLConfig(**preset.planner)
    qwen.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    qwen.dtype = WEIGHT_DTYPE
    qwen.save_pretrained(folder / "planner")
    GenerationConfig.from_model_config(qwen).save_pretrained(folder / "planner")
    vocab = qwen.text_config.vocab_size
    save_tokenizer(folder / "planner", build_qwen_layout_tokenizer(vocab) if preset.name == "full"
                   else build_tiny_tokenizer())
    model.transformer.save_config(folder / "transformer")
    model.vae.save_config(folder / "vae")
    model.adapter.scheduler.save_pretrained(folder / "scheduler")
    (folder / "metacanvas").mkdir()
    model.cfg.save(folder / "metacanvas" / "config.json")
    (folder / "metacanvas" / "sampling.json").write_text(json.dumps(dataclasses.asdict(model.defaults), indent=2))


def _write_weights(folder: Path, plans: list[PartPlan], seed: int, on_bytes: Callable[[int], None]) -> None:
    """Every shard, one tensor chunk at a time, and each sharded part's index."""
    for plan in plans:
        directory = folder / plan.part
        directory.mkdir(exist_ok=True)
        for shard in plan.shards:
            st.write_shard(directory, shard, lambda t, p=plan: random_init.tensor_chunks(
                seed, f"{p.part}/{t.name}", t.shape, p.rules[t.name], t.dtype), on_bytes)
        st.write_index(directory, plan.prefix, list(plan.shards))


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


@dataclass(frozen=True)
class WrittenCheckpoint:
    path: Path
    parameters: int
    file_bytes: int
    shards: dict  # part -> number of weight files


def write_streamed(cfg: InitCheckpointConfig, log: Callable[[str], None] = print) -> WrittenCheckpoint:
    """The streamed writer (see the module docstring)."""
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
    from metacanvas_deploy.mc_export.progress import Progress

    preset = get_preset(cfg.backbone, cfg.preset, cfg.planner)
    model = MetaCanvas.from_preset(cfg.backbone, preset, device="meta")
    plans = plan_checkpoint(model, cfg.max_shard_bytes, cfg.random_canvas)
    need = sum(p.file_bytes for p in plans) + _SLACK_BYTES
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise CheckpointError(f"{out.parent} has {_human(free)} free; this checkpoint needs {_human(need)}: free "
                              "some space or give an --out on another disk")
    for p in plans:
        log(f"{p.part}: {p.parameters:,} parameters, {len(p.shards)} file(s), {_human(p.file_bytes)}")
    weight_bytes = sum(s.data_bytes for p in plans for s in p.shards)
    done = [0]
    try:
        progress = Progress("checkpoint weights", weight_bytes, log if cfg.progress else None)
        with _new_folder(out) as tmp:
            _write_configs(tmp, model, preset)

            def on_bytes(n: int) -> None:
                done[0] += n
                progress.update(n)

            _write_weights(tmp, plans, cfg.seed, on_bytes)
        progress.close()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CheckpointError(f"the disk filled after {_human(done[0])} of {_human(weight_bytes)} of weights: the "
                              f"checkpoint needs {_human(need)} ({_human(free)} were free at the start); the partial "
                              f"folder was removed and {out} was not written") from e
    return WrittenCheckpoint(out, sum(p.parameters for p in plans), sum(p.file_bytes for p in plans),
                             {p.part: len(p.shards) for p in plans})


def init_checkpoint(cfg: InitCheckpointConfig, log: Callable[[str], None] = print) -> WrittenCheckpoint:
    """Write the checkpoint ``cfg`` describes (validated first) and say what was written."""
    cfg.validate()
    if cfg.resolved_writer == "streamed":
        return write_streamed(cfg, log)
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas

    model = MetaCanvas.from_preset(cfg.backbone, cfg.preset, seed=cfg.seed, random_canvas=cfg.random_canvas)
    with _new_folder(Path(cfg.out)) as tmp:
        model.save_pretrained(tmp)
    files = [f for f in Path(cfg.out).rglob("*") if f.is_file()]
    return WrittenCheckpoint(Path(cfg.out), sum(p.numel() for p in model.parameters()),
                             sum(f.stat().st_size for f in files),
                             {part: len(list((Path(cfg.out) / part).glob("*.safetensors")))
                              for part in ("planner", "transformer", "vae", "metacanvas")})
