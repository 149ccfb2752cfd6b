"""The environment fingerprint every benchmark JSON carries: enough to tell whether two results are comparable."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")
# CPU features that decide which kernels ONNX Runtime and PyTorch pick (fp32 FMA width, 8-bit dot products).
_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
_REPO = Path(__file__).resolve().parent.parent


def _usable_cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_info() -> dict:
    """CPU model, logical CPUs, physical cores, the CPUs this process may run on, and the relevant ISA flags.
    Reads /proc/cpuinfo where it exists; elsewhere the model comes from `platform` and cores and flags are
    unknown (None, [])."""
    models, cores, flags = [], set(), set()
    socket = None
    if _CPUINFO.is_file():
        for line in _CPUINFO.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                models.append(value)
            elif key == "physical id":
                socket = value
            elif key == "core id":
                cores.add((socket, value))
            elif key == "flags":
                flags.update(value.split())
    return {"model": models[0] if models else platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(), "physical_cores": len(cores) or None, "usable_cpus": _usable_cpus(),
            "flags": [f for f in _FLAGS if f in flags]}


def gpu_name() -> str:
    """The first GPU's name from nvidia-smi, or "none" (no nvidia-smi, or it finds no GPU)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none"
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "none"
    return out.splitlines()[0] if out else "none"


def library_versions() -> dict[str, str]:
    """Python, numpy and onnxruntime; torch only when this process imported it (a runtime-only benchmark never
    does)."""
    import numpy
    import onnxruntime

    versions = {"python": platform.python_version(), "numpy": numpy.__version__,
                "onnxruntime": onnxruntime.__version__}
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    return versions


def git_commit() -> dict | None:
    """The repository's HEAD and whether the tree has local changes; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def bundle_identity(bundle_dir: str | Path) -> dict:
    """Which build a bundle is: sha256 of its manifest.json, the build's cache key, backbone, preset and the
    denoise engine's precision."""
    path = Path(bundle_dir) / "manifest.json"
    raw = path.read_bytes()
    manifest = json.loads(raw)
    denoise = manifest.get("engines", {}).get("denoise", {})
    return {"path": str(Path(bundle_dir).resolve()), "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "cache_key": manifest.get("build", {}).get("cache_key"), "backbone": manifest.get("backbone"),
            "preset": manifest.get("preset"), "precision": denoise.get("precision")}


def fingerprint(threads: int, bundles: Mapping[str, str | Path] | None = None) -> dict:
    """The environment of one benchmark run. ``bundles``: label -> bundle directory (e.g. {"fp32": ...})."""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "threads": threads,
        # 1/5/15-minute load: on a shared machine, other work steals cores (2-thread torch suffers most)
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                       if k in os.environ},
        "gpu": gpu_name(),
        "versions": library_versions(),
        "git": git_commit(),
        "bundles": {label: bundle_identity(path) for label, path in (bundles or {}).items()},
    }
