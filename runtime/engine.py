"""One compiled stage, as the runtime calls it: checks every input against the manifest, runs, times.

The ONNX Runtime backend lives here; the TensorRT backend (device buffers, CUDA graphs) is imported lazily
by `load_engine` only for a TensorRT engine, so CPU users never need TensorRT installed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from metacanvas_deploy.runtime.errors import BundleError
from metacanvas_deploy.runtime.manifest import EngineEntry


class OrtEngine:
    """An ONNX Runtime session over one bundle engine. Inputs are checked against the manifest's specs (names,
    dtypes, shapes within the build's ranges) before running; `seconds` accumulates wall time per call."""

    def __init__(self, path: Path, entry: EngineEntry, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.entry = entry
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own classes for corrupt graphs
            raise BundleError(f"ONNX Runtime cannot load {path.name} ({e}); rebuild the bundle") from e
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        expected = [s.name for s in entry.inputs], [s.name for s in entry.outputs]
        if sorted(names[0]) != sorted(expected[0]) or sorted(names[1]) != sorted(expected[1]):
            raise BundleError(f"{path.name} does not match its manifest entry: it takes {names[0]} -> {names[1]}, "
                              f"the manifest says {expected[0]} -> {expected[1]}; rebuild the bundle")
        self.output_names = expected[1]
        self.seconds, self.calls = 0.0, 0

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entry.check_inputs(feeds)
        start = time.perf_counter()
        outs = self.session.run(self.output_names, dict(feeds))
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return dict(zip(self.output_names, outs))


def _open(path: Path, entry: EngineEntry, threads: int | None):
    if entry.backend == "tensorrt":
        from metacanvas_deploy.runtime.trt_engine import TrtEngine

        return TrtEngine(path, entry)
    return OrtEngine(path, entry, threads)


def load_engine(path: Path, entry: EngineEntry, threads: int | None = None, on_demand: bool = False):
    """The engine object for a manifest entry's backend (the manifest allows onnxruntime and tensorrt). A TensorRT
    engine imports tensorrt and cuda-python only here; without them it is a BundleError that says to run the
    bundle on an NVIDIA GPU with TensorRT or to rebuild it with --target onnxruntime. ``on_demand``: the
    low-memory mode (`OnDemandEngine`)."""
    if on_demand:
        return OnDemandEngine(path, entry, threads)
    return _open(path, entry, threads)


class OnDemandEngine:
    """Low-memory mode (Jetson, where the GPU shares the board's RAM; full-size models on small CPUs): the engine
    is opened at its first call and freed by `release()`, so a pipeline that releases each stage when it is done
    holds one stage's weights and buffers at a time. Same interface as the engine it wraps; a TensorRT engine's
    device identity is checked at construction, before anything is loaded."""

    def __init__(self, path: Path, entry: EngineEntry, threads: int | None = None):
        if entry.backend == "tensorrt":
            from metacanvas_deploy.runtime.trt_engine import check_device, device_identity

            check_device(entry.device or {}, device_identity(), entry.precision)
        self.path, self.entry, self.threads = Path(path), entry, threads
        self._engine = None
        self.seconds, self.calls = 0.0, 0

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def _timed(self, run, calls: int):
        if self._engine is None:
            self._engine = _open(self.path, self.entry, self.threads)
        before = self._engine.seconds
        out = run(self._engine)
        self.seconds += self._engine.seconds - before
        self.calls += calls
        return out

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._timed(lambda e: e(feeds), 1)

    def run_steps(self, feeds, state_names, per_step, use_cuda_graph: bool = True) -> dict[str, np.ndarray]:
        """TensorRT's device-resident step loop (`runtime.trt_engine.TrtEngine.run_steps`)."""
        return self._timed(lambda e: e.run_steps(feeds, state_names, per_step, use_cuda_graph), len(per_step))

    def release(self) -> None:
        """Free the engine (its session, or its GPU memory); the next call opens it again."""
        if self._engine is not None:
            close = getattr(self._engine, "close", None)
            if close is not None:
                close()
            self._engine = None
