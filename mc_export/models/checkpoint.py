"""Checkpoint folders in Hugging Face layouts, loaded offline.

```
DIR/
  planner/      transformers: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
  transformer/  diffusers: config.json, diffusion_pytorch_model.safetensors
  vae/          diffusers
  scheduler/    diffusers: scheduler_config.json
  metacanvas/   config.json (MetaCanvasConfig) + model.safetensors: canvas tokens, LoRA, connectors
```
Nothing here unpickles: weights are safetensors only (``use_safetensors=True`` everywhere).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from metacanvas_deploy.mc_export.errors import CheckpointError

PARTS = ("planner", "transformer", "vae", "scheduler", "metacanvas")

# The file each part must hold for the checkpoint to be complete.
_REQUIRED = {
    "planner": ("config.json", "tokenizer.json"),
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "scheduler": ("scheduler_config.json",),
    "metacanvas": ("config.json", "model.safetensors"),
}

def check_layout(path: Path) -> None:
    """Raise CheckpointError naming every missing part or file; a clear message beats a deep traceback."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    missing = [f"{part}/{name}" for part in PARTS for name in _REQUIRED[part] if not (path / part / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: missing {', '.join(missing)}. Expected the parts "
            f"{', '.join(p + '/' for p in PARTS)} (write a complete one with `python -m mc_export init-checkpoint`)"
        )


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def check_class(path: Path, part: str, expected: str) -> None:
    """A part whose config names another class (a FLUX transformer in a Wan checkpoint) is refused."""
    cfg = read_json(path / part / "config.json")
    found = cfg.get("_class_name")
    if found is not None and found != expected:
        raise CheckpointError(f"{path / part} holds a {found}, but this checkpoint's backbone needs a {expected}")


def atomic_dir(out: Path):
    """Context manager yielding a temp dir that replaces ``out`` only when the block succeeds."""
    return _AtomicDir(Path(out))


class _AtomicDir:
    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # a fresh name created with the umask's permissions (mkdtemp's 0700 would become the checkpoint's)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
