"""One compiled stage, as the runtime calls it: checks every input against the manifest, runs, times.

Every engine here may be called from several threads at once: `OrtEngine` because ONNX Runtime's
`InferenceSession.run` is thread-safe (its counters take a lock), `OnDemandEngine` by a lock and a reference
count (see its docstring), `runtime.trt_engine.TrtEngine` by serialising its calls. The counters (`seconds`,
`calls`) add up over the engine's life; per-request figures are the pipeline's (`GenerationOutput.timings`).

The ONNX Runtime backend lives here; the TensorRT backend (device buffers, CUDA graphs) is imported lazily
by `load_engine` only for a TensorRT engine, so CPU users never need TensorRT installed.

Mapped weights (``mapped=True``, the low-memory mode's default; `session_options`): ONNX Runtime memory-maps
external data, so weights stay in the page cache, shared and file-backed, rather than copied into the
process's private memory, unless something copies them. Three things do, and a mapped session turns them off:
MLAS prepacking (every constant MatMul/Conv weight repacked into private memory), the graph optimisers at load
(layout transforms such as NCHWc rewrite Conv weights as new private initializers: measured, a Conv stack of
75 MB of weights held 145 MB private under ORT_ENABLE_ALL without prepacking, 1.4 MB with optimisation off) and
the CPU arena (it keeps freed activation blocks). A bundle's ONNX Runtime files were optimised at build time
(`calib.graph.optimize_for_ort`, EXTENDED) and load with optimisation off; a stage too large to optimise at
build time then runs unoptimised, slower but within memory. The price: the results differ from a copying
session's by float32 rounding (prepacked GEMMs block K differently, ALL-level kernels differ; measured on every
stage of the tiny bundles: <= 1.2e-6 of the largest output, final latents <= 4.9e-7, frames within one uint8
level); mapped sessions agree with each other bit for bit, resident or on demand (tests/test_mapped_weights.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from metacanvas_deploy.runtime.bundle_verify import hash_all
from metacanvas_deploy.runtime.errors import BundleIntegrityError
from metacanvas_deploy.runtime.manifest import EngineEntry
from metacanvas_deploy.runtime.ort_engine import OrtEngine, session_options

__all__ = ["OnDemandEngine", "OrtEngine", "check_unchanged", "load_engine", "session_options"]


def _open(path: Path, entry: EngineEntry, threads: int | None, mapped: bool = False):
    if entry.backend == "tensorrt":
        from metacanvas_deploy.runtime.trt_engine import TrtEngine

        return TrtEngine(path, entry)
    from metacanvas_deploy.runtime.ort_cuda import is_cuda_entry

    if is_cuda_entry(entry):  # --target onnxruntime-gpu
        from metacanvas_deploy.runtime.ort_cuda import OrtCudaEngine

        return OrtCudaEngine(path, entry, threads, mapped)
    return OrtEngine(path, entry, threads, mapped)


def load_engine(path: Path, entry: EngineEntry, threads: int | None = None, on_demand: bool = False,
                expected: Mapping[Path, tuple[str, int | None]] | None = None, verify_hashes: bool = True,
                mapped: bool | None = None):
    """The engine object for a manifest entry's backend (the manifest allows onnxruntime and tensorrt). A TensorRT
    engine imports tensorrt and cuda-python only here; without them it is a BundleError that says to run the
    bundle on an NVIDIA GPU with TensorRT or to rebuild it with --target onnxruntime. ``on_demand``: the
    low-memory mode (`OnDemandEngine`, which re-checks ``expected`` files at every open). ``mapped``: an ONNX
    Runtime session that maps its weights instead of copying them (module docstring); default: as
    ``on_demand``. TensorRT engines ignore it."""
    mapped = on_demand if mapped is None else mapped
    if on_demand:
        return OnDemandEngine(path, entry, threads, expected, verify_hashes, mapped)
    return _open(path, entry, threads, mapped)


class OnDemandEngine:
    """Low-memory mode (Jetson, where the GPU shares the board's RAM; full-size models on small CPUs): the engine
    is opened at its first use and freed by `release()`, so a pipeline that releases each stage when it is done
    holds one stage's weights and buffers at a time. Same interface as the engine it wraps; a TensorRT engine's
    device identity is checked at construction, before anything is loaded.

    Thread-safe by a lock and a reference count: every call, and every `hold()` block, counts as a user of the
    open engine. `release()` frees it at once when nobody uses it, otherwise when the last user leaves; so a
    `release()` from one thread never pulls the engine from under a call running in another, and a call after
    a release opens it again. ``mapped`` (`load_engine`'s default for it): its ONNX Runtime session maps the
    weights (module docstring), so an open costs page-ins from the page cache rather than a private copy.

    ``expected`` (path -> (sha256, size or None), the engine file and its external data as the manifest lists
    them): every open first re-checks those files, sizes always and sha256 unless ``verify_hashes`` is False,
    and refuses a file that changed since the bundle was verified with a BundleIntegrityError. The check reads
    the files once more per open (sha256 at ~1 GB/s per core); the file is then opened by path, so a change in
    the instant between the check and the open is not seen (the hashes detect corruption and stale copies, not
    an adversary: see `runtime.bundle_verify`). Without ``expected`` (an engine outside a bundle, e.g. a
    calibration candidate) the caller vouches for the file."""

    def __init__(self, path: Path, entry: EngineEntry, threads: int | None = None,
                 expected: Mapping[Path, tuple[str, int | None]] | None = None, verify_hashes: bool = True,
                 mapped: bool = False):
        if entry.backend == "tensorrt":
            from metacanvas_deploy.runtime.trt_engine import check_device, device_identity

            check_device(entry.device or {}, device_identity(), entry.precision)
        else:
            from metacanvas_deploy.runtime.ort_cuda import entry_provider, is_cuda_entry, require_cuda_provider

            if is_cuda_entry(entry):
                require_cuda_provider(provider=entry_provider(entry))
        self.path, self.entry, self.threads, self.mapped = Path(path), entry, threads, mapped
        self._expected = dict(expected or {})
        self._verify_hashes = verify_hashes
        self._lock = threading.Lock()  # guards _engine, _users, _free_when_idle and the counters
        self._engine = None
        self._users = 0
        self._free_when_idle = False
        self.seconds, self.calls = 0.0, 0

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def _enter(self):
        with self._lock:
            if self._engine is None:
                check_unchanged(self._expected, self._verify_hashes, self.entry.stage)
                self._engine = _open(self.path, self.entry, self.threads, self.mapped)
            self._users += 1
            return self._engine

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._free_when_idle:
                self._close()

    @contextlib.contextmanager
    def hold(self) -> Iterator[object]:
        """The open engine (opened, files re-checked, if it is not), kept open at least until the block exits."""
        engine = self._enter()
        try:
            yield engine
        finally:
            self._leave()

    def _count(self, seconds: float, calls: int) -> None:
        with self._lock:
            self.seconds += seconds
            self.calls += calls

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.timed(feeds)[0]

    def timed(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """The wrapped engine's `timed` (opening it, if needed, is not counted)."""
        with self.hold() as engine:
            out, seconds = engine.timed(feeds)
        self._count(seconds, 1)
        return out, seconds

    def run_steps(self, feeds, state_names, per_step, use_cuda_graph: bool = True) -> dict[str, np.ndarray]:
        """The wrapped engine's device-resident step loop (`runtime.trt_engine.TrtEngine.run_steps`,
        `runtime.ort_cuda.OrtCudaEngine.run_steps`)."""
        with self.hold() as engine:
            start = time.perf_counter()
            out = engine.run_steps(feeds, state_names, per_step, use_cuda_graph)
            self._count(time.perf_counter() - start, len(per_step))
        return out

    def release(self) -> None:
        """Free the engine (its session, or its GPU memory) now if no call or `hold()` uses it, else when the
        last one ends; the next call opens it again."""
        with self._lock:
            if self._users:
                self._free_when_idle = True
            else:
                self._close()

    def _close(self) -> None:
        """Under the lock: free the engine."""
        self._free_when_idle = False
        if self._engine is not None:
            close = getattr(self._engine, "close", None)
            if close is not None:
                close()
            self._engine = None


def check_unchanged(expected: Mapping[Path, tuple[str, int | None]], verify_hashes: bool, stage: str) -> None:
    """Raise BundleIntegrityError unless every file still has its manifest size (and sha256)."""
    for path, (_, size) in expected.items():
        try:
            got = path.stat().st_size
        except OSError as e:
            raise BundleIntegrityError(f"engine `{stage}`: {path} is gone since the bundle was loaded ({e}); "
                                       "restore the bundle and load it again") from None
        if size is not None and got != size:
            raise BundleIntegrityError(f"engine `{stage}`: {path.name} is {got} bytes, the manifest says {size}: it "
                                       "changed after the bundle was loaded. Restore the bundle (or rebuild it) "
                                       "and load it again")
    if verify_hashes and expected:
        got = hash_all({str(p): p for p in expected})
        bad = [p.name for p, (sha, _) in expected.items() if got[str(p)][0] != sha]
        if bad:
            raise BundleIntegrityError(f"engine `{stage}`: {', '.join(bad)} no longer hash to the manifest's sha256: "
                                       "changed after the bundle was loaded (an edit, a partial copy, a disk "
                                       "error). Restore the bundle (or rebuild it) and load it again")
