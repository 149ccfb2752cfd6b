"""A numpy stepper over a `runtime.schedulers.SchedulePlan`: the coefficient table applied on the host, step by
step, keeping UniPC's history. The runtime never steps on the host (every denoise-step graph applies the table
itself, `mc_export.components.denoise.scheduler_update`); tests use this to drive a plan against diffusers' own
schedulers and to state the table's algebra in numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metacanvas_deploy.runtime.errors import ShapeError
from metacanvas_deploy.runtime.schedulers import COL_LAST, ROW_LAST, ROW_M, ROW_NEXT, SchedulePlan


class StepOrderError(ValueError):
    """`Stepper.step` called out of order (UniPC's multistep history would be wrong), with an index outside the
    plan, or a coefficient reading state that is empty; call `reset()` and step 0..N-1 in order."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def combine(row: np.ndarray, terms: Sequence[np.ndarray | None], dtype: np.dtype) -> np.ndarray | None:
    """sum_j row[j] * terms[j] in `dtype`, skipping zero coefficients; None when the row is all zeros.

    A coefficient of exactly 1 adds the term unscaled, so Euler's x + dt * v rounds as diffusers does.
    """
    acc, owned = None, False
    for j, c in enumerate(row):
        if c == 0:
            continue
        if terms[j] is None:
            raise StepOrderError(f"coefficient column {j} reads state that is empty: step from 0 after reset()")
        term = terms[j] if c == 1 else dtype.type(c) * terms[j]
        if acc is None:
            acc, owned = term, term is not terms[j]
        elif owned:
            acc += term
        else:
            acc, owned = acc + term, True
    # never hand back (or keep as state) the caller's own array: the caller may edit it in place afterwards
    return acc if acc is None or owned else acc.copy()


def step_update(coefficients: np.ndarray, sample: np.ndarray, model_output: np.ndarray,
                last_sample: np.ndarray | None, history: Sequence[np.ndarray | None]):
    """One step as pure algebra: `coefficients` (3, 3 + K) applied to [x_i, v_i, xc_{i-1}, m_{i-1}.., m_{i-K}].

    Computes in sample.dtype. Returns (x_{i+1}, xc_i or None, m_i or None); None where a row is all zero.
    """
    terms = [sample, model_output, last_sample, *history]
    return tuple(combine(coefficients[r], terms, sample.dtype) for r in (ROW_NEXT, ROW_LAST, ROW_M))


class Stepper:
    """Runs a `SchedulePlan`: `step(i, v_i, x_i) -> x_{i+1}` for i = 0..N-1, keeping UniPC's history.

    Arrays: any shape, model_output.shape == sample.shape; computed in float32 or wider (the promoted dtype of
    the two inputs). A plan whose steps read state (UniPC) must be stepped 0, 1, ... in order from `reset()`.
    """

    def __init__(self, plan: SchedulePlan):
        self.plan = plan
        self._coefficients = plan.coefficient_array()  # (N, 3, 3 + K)
        self._stateful = bool(np.any(self._coefficients[:, :, COL_LAST:] != 0))
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next call must be step 0."""
        self._next = 0
        self._last: np.ndarray | None = None
        self._history: list[np.ndarray | None] = [None] * self.plan.history

    def step(self, i: int, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The sample after step i (what the model sees at step i + 1, or the final latents after N - 1)."""
        n = self.plan.num_inference_steps
        if not _is_int(i) or not 0 <= i < n:
            raise StepOrderError(f"step index must be an int in [0, {n}), got {i!r}")
        if self._stateful and i != self._next:
            raise StepOrderError(f"step {i} called but the multistep history is at step {self._next}; "
                                     "step in order 0..N-1, or call reset() to start a new sample")
        sample, model_output = np.asarray(sample), np.asarray(model_output)
        if sample.shape != model_output.shape:
            raise ShapeError(f"model_output shape {model_output.shape} differs from sample shape {sample.shape}")
        if self._last is not None and self._last.shape != sample.shape:
            raise ShapeError(f"sample shape {sample.shape} differs from the previous step's {self._last.shape}; "
                             "call reset() before a new request")
        if sample.dtype.kind != "f" or model_output.dtype.kind != "f":
            raise ShapeError(f"sample and model_output must be float arrays, got {sample.dtype}, {model_output.dtype}")
        dtype = np.result_type(sample.dtype, model_output.dtype, np.float32)
        x, v = sample.astype(dtype, copy=False), model_output.astype(dtype, copy=False)
        x_next, last, m = step_update(self._coefficients[i], x, v, self._last, self._history)
        if self._stateful:
            self._last = last
            self._history = [m, *self._history[:-1]] if self._history else []
        self._next = i + 1
        return x_next
