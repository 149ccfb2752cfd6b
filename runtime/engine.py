"""One compiled stage, as the runtime calls it: checks every input against the manifest, runs, times.

The ONNX Runtime backend lives here; the TensorRT backend (device buffers, CUDA graphs) is imported lazily
by `load_engine` only for a TensorRT engine, so CPU users never need TensorRT installed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from runtime.errors import BundleError
from runtime.manifest import EngineEntry


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


def load_engine(path: Path, entry: EngineEntry, threads: int | None = None):
    """The engine object for a manifest entry's backend."""
    if entry.backend == "onnxruntime":
        return OrtEngine(path, entry, threads)
    raise BundleError(f"{path.name} is a {entry.backend} engine; this runtime build runs onnxruntime engines only. "
                      "Rebuild with --target onnxruntime")
