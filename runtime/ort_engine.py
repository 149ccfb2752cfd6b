"""`OrtEngine`, the ONNX Runtime backend, and its `session_options` (mapped weights: see `runtime.engine`'s
docstring). In its own module so that `runtime.ort_cuda` (the CUDA provider's engine) can build on it while
`runtime.engine.load_engine` picks between them; `runtime.engine` re-exports both names."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from metacanvas_deploy.runtime.errors import BundleError
from metacanvas_deploy.runtime.manifest import EngineEntry


class OrtEngine:
    """An ONNX Runtime session over one bundle engine. Inputs are checked against the manifest's specs (names,
    dtypes, shapes within the build's ranges) before running; `seconds` accumulates wall time per call.
    Thread-safe: ONNX Runtime runs concurrent `run` calls on one session; only the counters need a lock."""

    def __init__(self, path: Path, entry: EngineEntry, threads: int | None = None, mapped: bool = False,
                 providers: list | None = None):
        import onnxruntime as ort

        self.entry, self.mapped = entry, mapped
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads, mapped),
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own classes for corrupt graphs
            raise BundleError(f"ONNX Runtime cannot load {path.name} ({e}); rebuild the bundle") from e
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        expected = [s.name for s in entry.inputs], [s.name for s in entry.outputs]
        if sorted(names[0]) != sorted(expected[0]) or sorted(names[1]) != sorted(expected[1]):
            raise BundleError(f"{path.name} does not match its manifest entry: it takes {names[0]} -> {names[1]}, "
                              f"the manifest says {expected[0]} -> {expected[1]}; rebuild the bundle")
        self.output_names = expected[1]
        self._counters = threading.Lock()
        self.seconds, self.calls = 0.0, 0

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.timed(feeds)[0]

    def timed(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """(outputs, seconds inside the session for this call): the figure a caller can call its own when other
        threads use the engine too (input checks excluded)."""
        self.entry.check_inputs(feeds)
        start = time.perf_counter()
        outs = self.session.run(self.output_names, dict(feeds))
        elapsed = time.perf_counter() - start
        with self._counters:
            self.seconds += elapsed
            self.calls += 1
        return dict(zip(self.output_names, outs)), elapsed


# ONNX Runtime's log level for our sessions: errors only. Its warnings at session creation are the optimiser's
# notes to itself (e.g. "Could not find a CPU kernel and hence can't constant fold CastLike node", three lines per
# full-size weight-only planner build); failures still raise.
QUIET = 3


def session_options(threads: int | None = None, mapped: bool = False):
    """ONNX Runtime's options for a bundle engine: every graph optimisation, or with ``mapped`` (see the module
    docstring) none, no prepacking and no arena, so that external-data weights stay memory-mapped."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = QUIET
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if mapped:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_cpu_mem_arena = False
    return so
