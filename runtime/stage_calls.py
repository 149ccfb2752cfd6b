"""The engines as one request calls them: timed into the request's own figures, shown to observers, substituted
where the request asked, held open in low-memory mode; the Pipeline's shared engine objects are never changed.

`Observers` is a Pipeline's registry of observation callbacks (`Pipeline.observe`); `RequestEngines` is one
request's view of the engines (what `RequestContext.engines` holds). A RequestEngines belongs to one request,
so one thread; Observers is shared and thread-safe.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType

import numpy as np

Observer = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], None]


class Observers:
    """stage -> the callbacks watching it. Registration swaps an immutable tuple under a lock, and a call reads
    the tuple current when it has finished: a callback sees every call that ends while it is registered, and
    none that ends after its `watch` block has exited."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_stage: dict[str, tuple[Observer, ...]] = {}

    @contextlib.contextmanager
    def watch(self, stage: str, callback: Observer) -> Iterator[None]:
        """Call ``callback(feeds, outputs)`` after every call of ``stage`` while the block runs."""
        with self._lock:
            self._by_stage[stage] = self._by_stage.get(stage, ()) + (callback,)
        try:
            yield
        finally:
            with self._lock:
                now = list(self._by_stage[stage])
                del now[next(i for i, c in enumerate(now) if c is callback)]
                self._by_stage[stage] = tuple(now)

    def of(self, stage: str) -> tuple[Observer, ...]:
        """The callbacks watching ``stage`` now."""
        return self._by_stage.get(stage, ())


class RequestEngines(Mapping):
    """One request's engine callables by stage (a read-only mapping: ``engines["planner"](feeds)``).

    Each call is timed into this request's `timings` and `calls` (the engine's own seconds for the call, `timed`;
    wall time for a substitute without it), then shown to the stage's observers. ``engines`` are the
    Pipeline's engines with the request's substitutions already in place. ``low_memory``: the first call of a
    stage takes a `hold()` on its engine, so that another request's `release` cannot free it mid-stage, until
    this request `release`s the stage."""

    def __init__(self, engines: Mapping[str, object], observers: Observers, low_memory: bool):
        self._engines = MappingProxyType(dict(engines))
        self._observers = observers
        self._low_memory = low_memory
        self._holds: dict[str, contextlib.ExitStack] = {}
        self._callables = {stage: functools.partial(self.call, stage) for stage in self._engines}
        self.timings: dict[str, float] = {}  # seconds inside each stage's engine, this request only
        self.calls: dict[str, int] = {}

    def __getitem__(self, stage: str):
        return self._callables[stage]

    def __iter__(self):
        return iter(self._callables)

    def __len__(self) -> int:
        return len(self._callables)

    def engine(self, stage: str):
        """The engine object this request uses for ``stage`` (the Pipeline's, or the request's substitute)."""
        return self._engines[stage]

    def observed(self, stage: str) -> bool:
        """Whether a callback watches ``stage`` now."""
        return bool(self._observers.of(stage))

    def _held(self, stage: str):
        engine = self._engines[stage]
        if self._low_memory and stage not in self._holds and hasattr(engine, "hold"):
            stack = contextlib.ExitStack()
            stack.enter_context(engine.hold())
            self._holds[stage] = stack
        return engine

    def _record(self, stage: str, seconds: float, calls: int) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self.calls[stage] = self.calls.get(stage, 0) + calls

    def call(self, stage: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine call of ``stage``, timed and observed."""
        engine = self._held(stage)
        if hasattr(engine, "timed"):  # the engine's own figure for this call: no input checks, no lock wait
            out, seconds = engine.timed(feeds)
        else:  # a substitute that is a plain callable
            start = time.perf_counter()
            out = engine(feeds)
            seconds = time.perf_counter() - start
        self._record(stage, seconds, 1)
        for callback in self._observers.of(stage):
            callback(feeds, out)
        return out

    def run_steps(self, stage: str, feeds, state_names, per_step) -> dict[str, np.ndarray]:
        """The engine's device-resident step loop (TensorRT), timed as ``len(per_step)`` calls. It has no
        per-step outputs to show, so the pipeline uses it only while nobody observes the stage."""
        engine = self._held(stage)
        start = time.perf_counter()
        out = engine.run_steps(feeds, state_names, per_step)
        self._record(stage, time.perf_counter() - start, len(per_step))
        return out

    def run_masked_steps(self, full: str, cached: str, feeds, state_names, per_step, mask) -> dict[str, np.ndarray]:
        """Step caching's device loop over stages ``full`` and ``cached`` (`runtime.masked_loops`): the whole
        loop's seconds go to ``full`` (one figure: the device is not synchronised per step), each stage is
        credited with the steps it ran."""
        from metacanvas_deploy.runtime.masked_loops import masked_steps

        engines = self._held(full), self._held(cached)
        start = time.perf_counter()
        out = masked_steps(*engines, feeds, state_names, per_step, mask)
        n_full = sum(bool(m) for m in mask)
        self._record(full, time.perf_counter() - start, n_full)
        self._record(cached, 0.0, len(mask) - n_full)
        return out

    def release(self, *stages: str) -> None:
        """Low-memory mode: this request is done with ``stages``; each engine is freed once no other request
        holds it (`OnDemandEngine.release`). Stages this request never held are left alone."""
        for stage in stages:
            stack = self._holds.pop(stage, None)
            if stack is not None:
                self._engines[stage].release()
                stack.close()

    def close(self) -> None:
        """Release every stage still held (the end of the request, or its failure)."""
        self.release(*list(self._holds))
