"""The step loop of a step-cached bundle (`runtime.step_cache`): FULL (``denoise``) or CACHED (``denoise_cached``)
per the mask, the residual FULL writes handed to the CACHED steps after it.

On the host each step is one engine call, as in the plain loop; the residual is the array FULL returned, passed as
it is (no copy). On a GPU the loop runs in device memory (`runtime.masked_loops`): ONNX Runtime's CUDA provider with
the residual one preallocated buffer, FULL's output binding and CACHED's input binding; TensorRT with each step kind
one captured CUDA graph, replayed per the mask, the host waiting once at the end. An all-FULL mask never reaches
this module (`request_mask` returns None): the plain loop runs, bit for bit today's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from metacanvas_deploy.runtime.errors import BundleError
from metacanvas_deploy.runtime.step_cache import CACHED_STAGE, FULL_STAGE, RESIDUAL


def check_mask(mask: Sequence[bool], steps: int) -> None:
    """A mask has one entry per step and starts with a FULL step (a CACHED step needs a residual before it)."""
    if len(mask) != steps or not mask or not mask[0]:
        raise BundleError(f"a step-cache mask needs {steps} entries starting with a FULL step, got "
                          f"{''.join('F' if m else 'C' for m in mask) or 'none'}")


def cached_loop(run, feeds: Mapping[str, np.ndarray], state: dict, per_step: Sequence[Mapping], mask, names,
                on_gpu: bool, steps: Iterable) -> np.ndarray:
    """Run ``per_step`` per ``mask`` from ``state`` (the step-0 sample and multistep state, updated in place);
    returns the final sample. ``run``: the request's engines (`runtime.stage_calls.RequestEngines`); ``names``:
    state output -> input; ``steps``: ``per_step`` (maybe behind a progress bar)."""
    check_mask(mask, len(per_step))
    for stage in (FULL_STAGE, CACHED_STAGE):
        if stage not in run:
            raise BundleError(f"step caching needs the {stage!r} stage, which this bundle lacks; rebuild with "
                              "`python -m mc_export build ... --cache auto` or run with cache='off'")
    full = run.engine(FULL_STAGE)
    if on_gpu and hasattr(full, "run_steps") and not (run.observed(FULL_STAGE) or run.observed(CACHED_STAGE)):
        out = run.run_masked_steps(FULL_STAGE, CACHED_STAGE, {**feeds, **state}, names, per_step, mask)
        return out["next_sample"]
    residual = None
    for i, step in enumerate(steps):
        if mask[i]:
            out = run[FULL_STAGE]({**feeds, **state, **step})
            residual = out[RESIDUAL]
        else:
            out = run[CACHED_STAGE]({**feeds, **state, **step, RESIDUAL: residual})
        for output, name in names.items():
            state[name] = out[output]
    return state["sample"]
