"""`python -m mc_export triton`: engine bundles -> a Triton Inference Server model repository.

One Python-backend model per bundle, each self-contained:

    REPO/
      metacanvas_triton.json        what this command wrote (lets a second run replace the repository)
      <model>/config.pbtxt          typed inputs and outputs (`runtime.serving.INPUTS`/`OUTPUTS`), dynamic
                                    batching, instance group, parameters, a one-step warm-up request
      <model>/warmup/               the warm-up request's input files
      <model>/1/model.py            `mc_export/triton_model.py`: a request is one `Pipeline` call
      <model>/1/bundle/             the bundle, copied and re-verified (sizes, sha256) after the copy
      <model>/1/metacanvas_deploy/runtime/   this runtime's source, so the server needs only its dependencies

The repository is written atomically (`runtime.bundle.write_atomically`): a new or empty folder, or one this
command wrote before, holding nothing else, is replaced whole; anything else is refused untouched.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.runtime import serving
from metacanvas_deploy.runtime.bundle import (
    REPLACE_ADVICE,
    Bundle,
    load_bundle,
    occupied,
    refuse_foreign,
    write_atomically,
)
from metacanvas_deploy.runtime.bundle_verify import listed_files, read_manifest
from metacanvas_deploy.runtime.errors import BundleWriteError
from metacanvas_deploy.runtime.limits import check_int, max_threads
from metacanvas_deploy.runtime.manifest import MANIFEST_NAME, Manifest

INDEX_NAME = "metacanvas_triton.json"
TEMPLATE = Path(__file__).with_name("triton_model.py")
RUNTIME_SOURCE = Path(serving.__file__).parent
VERSION = "1"
DEVICES = ("auto", "cpu", "gpu")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_IGNORED = ("__pycache__",)  # written by the server's Python when it imports model.py; never ours to refuse on


@dataclass(frozen=True)
class TritonConfig:
    """What `write_repository` writes. ``names``: one model name per bundle (default: each bundle's folder name);
    ``device``: auto = gpu for TensorRT bundles, cpu for ONNX Runtime ones; ``max_batch_size``: requests one
    instance runs at once (the dynamic batcher gathers them); ``threads``: ONNX Runtime intra-op threads per
    session (None: the server's cores divided by instances x max_batch_size)."""

    bundles: tuple[Path, ...]
    out: Path
    names: tuple[str, ...] = ()
    instances: int = 1
    device: str = "auto"
    max_batch_size: int = 4
    queue_delay_us: int = 1000
    threads: int | None = None
    low_memory: bool = False
    warmup: bool = True

    def validate(self) -> TritonConfig:
        """Every "X requires Y" rule, before any file is read; returns the config with names filled in."""
        if not self.bundles:
            raise ConfigError("give at least one --bundle")
        names = self.names or tuple(Path(b).resolve().name for b in self.bundles)
        if len(names) != len(self.bundles):
            raise ConfigError(f"{len(self.bundles)} bundles but {len(names)} names: give one --name per --bundle, "
                              "in the same order, or none")
        for name in names:
            if not _NAME.fullmatch(name):
                raise ConfigError(f"model name {name!r} is not usable by Triton: letters, digits, '_', '.', '-' "
                                  "(not first), at most 128; give --name")
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must differ, got {list(names)}; give --name for each --bundle")
        check_int("--instances", self.instances, 1, 64, ConfigError)
        check_int("--max-batch", self.max_batch_size, 1, 64, ConfigError)
        check_int("--queue-delay-us", self.queue_delay_us, 0, 10_000_000, ConfigError)
        if self.threads is not None:
            check_int("--threads", self.threads, 1, max_threads(), ConfigError)
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        return replace(self, names=names)


@dataclass(frozen=True)
class ServedModel:
    name: str
    source: Path
    backbone: str
    tasks: tuple[str, ...]
    device: str  # cpu | gpu


def write_repository(cfg: TritonConfig, log: Callable[[str], None] = print) -> list[ServedModel]:
    """Write the model repository ``cfg.out`` (see the module docstring); returns the models it serves."""
    cfg = cfg.validate()
    bundles = [_source_bundle(Path(b)) for b in cfg.bundles]
    served = [ServedModel(n, b.path, b.manifest.backbone, b.manifest.tasks, _device(cfg.device, b.manifest, n))
              for n, b in zip(cfg.names, bundles)]

    def fill(tmp: Path) -> list[ServedModel]:
        files: list[str] = []
        for model, bundle in zip(served, bundles):
            files += _write_model(tmp / model.name, model, bundle, cfg)
            log(f"  {model.name}: {model.backbone} ({', '.join(model.tasks)}) on {model.device}, "
                f"{cfg.instances} instance(s), bundle {model.source}")
        index = {"written_by": "python -m mc_export triton", "models": {m.name: str(m.source) for m in served},
                 "files": sorted(files)}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
        return served

    write_atomically(cfg.out, fill, _refuse_foreign, what="model repository")
    log(f"wrote {Path(cfg.out).resolve()}: serve it with `tritonserver --model-repository {Path(cfg.out).resolve()}`")
    return served


def _source_bundle(path: Path) -> Bundle:
    """The bundle, verified with hashes. The backends' versions are checked where it is served, not here (a
    TensorRT bundle is packaged on machines without TensorRT)."""
    if not path.is_dir():
        load_bundle(path)  # the loader's own "no bundle at" message
    manifest = read_manifest(path.resolve())
    recorded = {e.backend: e.backend_version for e in manifest.engines.values()}
    return load_bundle(path, verify_hashes=True, backend_versions=recorded)


def _device(device: str, manifest: Manifest, name: str) -> str:
    """cpu or gpu: this runtime runs ONNX Runtime engines on the CPU and TensorRT engines on a GPU."""
    backends = {e.backend for e in manifest.engines.values()}
    needs = "gpu" if "tensorrt" in backends else "cpu"
    if device not in ("auto", needs):
        what = "TensorRT engines need" if needs == "gpu" else "ONNX Runtime engines run on the CPU in this runtime:"
        raise ConfigError(f"model {name!r}: {what} --device {needs}, got --device {device}")
    return needs


def _write_model(folder: Path, model: ServedModel, bundle: Bundle, cfg: TritonConfig) -> list[str]:
    """One model's folder; returns the repository-relative paths written."""
    version = folder / VERSION
    version.mkdir(parents=True)
    shutil.copyfile(TEMPLATE, version / "model.py")
    _copy_bundle(bundle, version / "bundle")
    _copy_runtime(version / "metacanvas_deploy" / "runtime")
    warmup = _warmup_inputs(bundle.manifest) if cfg.warmup else {}
    if warmup:
        (folder / "warmup").mkdir()
        for key, (_, _, data) in warmup.items():
            (folder / "warmup" / key).write_bytes(data)
    (folder / "config.pbtxt").write_text(model_config(model, cfg, warmup))
    root = folder.parent
    return [p.relative_to(root).as_posix() for p in folder.rglob("*") if p.is_file()]


def _copy_bundle(bundle: Bundle, dest: Path) -> None:
    """The manifest and every file it lists (nothing else), then the copy verified as `Pipeline.load` will."""
    dest.mkdir()
    for rel in [MANIFEST_NAME] + [rel for _, rel, _, _ in listed_files(bundle.manifest)]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.path / rel, dest / rel)
    recorded = {e.backend: e.backend_version for e in bundle.manifest.engines.values()}
    copied = load_bundle(dest, verify_hashes=True, backend_versions=recorded)
    if copied.manifest != bundle.manifest:
        raise BundleWriteError(f"the copy of {bundle.path} in {dest} changed while it was copied; write again")


def _copy_runtime(dest: Path) -> None:
    """This runtime's Python source (no caches), importable as `metacanvas_deploy.runtime` beside model.py."""
    shutil.copytree(RUNTIME_SOURCE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _refuse_foreign(out: Path) -> None:
    """``out`` may be replaced when missing, empty, or a repository this command wrote holding nothing else."""
    if not occupied(out):
        return
    try:
        listed = set(json.loads((out / INDEX_NAME).read_text())["files"]) | {INDEX_NAME}
    except (OSError, ValueError, KeyError, TypeError):
        raise BundleWriteError(f"{out} exists, is not empty and has no readable {INDEX_NAME}: it is not a model "
                               f"repository this command wrote, so it is not replaced. {REPLACE_ADVICE}") from None
    present = {p.relative_to(out).as_posix() for p in out.rglob("*")
               if not p.is_dir() and not set(p.relative_to(out).parts) & set(_IGNORED)}
    refuse_foreign(out, present, listed, "a model repository this command wrote")


# --- config.pbtxt ------------------------------------------------------------------------------------------------

def model_config(model: ServedModel, cfg: TritonConfig, warmup: dict) -> str:
    """The model's `config.pbtxt` (protobuf text of Triton's `ModelConfig`)."""
    kind = "KIND_GPU" if model.device == "gpu" else "KIND_CPU"
    params = {"threads": "" if cfg.threads is None else str(cfg.threads),
              "low_memory": "true" if cfg.low_memory else "false"}
    source = str(model.source).replace("\n", " ")
    header = (f"# Written by `python -m mc_export triton` from {source}: {model.backbone} "
              f"({', '.join(model.tasks)}). One request = one generation.")
    lines = [header,
             f'name: "{model.name}"', 'backend: "python"', f"max_batch_size: {cfg.max_batch_size}",
             "input [", ",\n".join(_tensor(w, input_=True) for w in serving.INPUTS), "]",
             "output [", ",\n".join(_tensor(w, input_=False) for w in serving.OUTPUTS), "]",
             f"dynamic_batching {{\n  max_queue_delay_microseconds: {cfg.queue_delay_us}\n}}",
             f"instance_group [\n  {{\n    count: {cfg.instances}\n    kind: {kind}\n  }}\n]"]
    lines += [f'parameters {{\n  key: "{k}"\n  value {{ string_value: "{v}" }}\n}}' for k, v in params.items()]
    if warmup:
        lines.append(_warmup_text(warmup))
    return "\n".join(lines) + "\n"


def _tensor(wire: serving.WireTensor, input_: bool) -> str:
    body = [f'name: "{wire.name}"', f"data_type: {wire.data_type}", f"dims: [ {', '.join(map(str, wire.dims))} ]"]
    if input_ and wire.optional:
        body.append("optional: true")
    if input_ and -1 in wire.dims:
        body.append("allow_ragged_batch: true")  # requests with different counts may share a batch
    return "  {\n" + "".join(f"    {line}\n" for line in body) + "  }"


def _warmup_text(warmup: dict) -> str:
    inputs = "".join(f'    inputs {{\n      key: "{k}"\n      value {{\n        data_type: {t}\n        dims: '
                     f'[ {", ".join(map(str, dims))} ]\n        input_data_file: "{k}"\n      }}\n    }}\n'
                     for k, (t, dims, _) in warmup.items())
    return f'model_warmup [\n  {{\n    name: "one_step"\n    batch_size: 1\n{inputs}  }}\n]'


def _warmup_inputs(manifest: Manifest) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """input name -> (Triton type, dims, raw bytes) of one short request of the bundle's first task at its
    default size: one step, so that loading pays for first-call allocations once, not the first user."""
    from metacanvas_deploy.runtime.media import synthetic_media

    d, task = manifest.defaults, manifest.tasks[0]
    wire = {w.name: w for w in serving.INPUTS}
    values: dict[str, list] = {"prompt": [b"warm-up"], "task": [task.encode()], "num_inference_steps": [1]}
    for name, media in synthetic_media(task, d["height"], d["width"], d["num_frames"]).items():
        values[name] = [_encode(m, gif=name == "video") for m in (media if isinstance(media, list) else [media])]
    return {k: (wire[k].data_type, (len(v),), _raw(wire[k].data_type, v)) for k, v in values.items()}


def _raw(data_type: str, values: list) -> bytes:
    """Triton's warm-up file layout: BYTES elements as a 4-byte little-endian length then the bytes; numbers
    as little-endian row-major values."""
    if data_type == "TYPE_STRING":
        return b"".join(struct.pack("<I", len(v)) + v for v in values)
    return np.asarray(values, dtype=np.dtype(serving.NUMPY_TYPES[data_type]).newbyteorder("<")).tobytes()


def _encode(media: np.ndarray, gif: bool) -> bytes:
    """An image as PNG bytes, a video (F, H, W, 3) as GIF bytes (Pillow: no codec needed)."""
    from PIL import Image

    buf = io.BytesIO()
    if gif:
        frames = [Image.fromarray(f) for f in media]
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=62, loop=0)
    else:
        Image.fromarray(media).save(buf, format="PNG")
    return buf.getvalue()
