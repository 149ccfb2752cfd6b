"""Step caching's device loops (`runtime.cached_steps`): FULL and CACHED steps per a mask, every tensor in device
memory, the residual one buffer that FULL writes and CACHED reads (never copied).

TensorRT (`trt_masked_steps`): the FULL engine's buffers are the loop's; the CACHED engine's execution context is
given the same addresses (its tensors are FULL's, plus the residual as an input), so both run on FULL's stream over
one set of buffers. The first step of each kind runs plainly (TensorRT's warm-up), then is captured as that kind's
CUDA graph (the call and the state copies); every later step is one copy of its per-step values from the uploaded
table and one launch of its kind's graph. The host waits once, for the final outputs.

ONNX Runtime's CUDA provider (`ort_masked_steps`): `OrtCudaEngine.run_steps`' buffers (state ping-ponged between
two OrtValues, per-step values written in place) with one IO binding per step kind and parity; the residual
OrtValue is FULL's output binding and CACHED's input binding. With CUDA graphs each session captures its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from metacanvas_deploy.runtime.errors import BundleError, ShapeError
from metacanvas_deploy.runtime.step_cache import RESIDUAL
from metacanvas_deploy.runtime.trt_engine import _ok, check_step_arguments


def _check(full, cached, feeds, state_names, per_step, mask) -> list[str]:
    names = check_step_arguments(full.entry, feeds, state_names, per_step)
    want = sorted([s.name for s in full.entry.inputs] + [RESIDUAL])
    if sorted(s.name for s in cached.entry.inputs) != want or RESIDUAL not in {s.name for s in full.entry.outputs}:
        raise BundleError(f"`{cached.entry.stage}` must take `{full.entry.stage}`'s inputs and the {RESIDUAL!r} it "
                          "outputs; rebuild the bundle with --cache")
    if len(mask) != len(per_step) or not mask[0]:
        raise ShapeError(f"the mask must give each of the {len(per_step)} steps a kind, step 0 FULL")
    return names


def trt_masked_steps(full, cached, feeds: Mapping[str, np.ndarray], state_names: Mapping[str, str],
                     per_step: Sequence[Mapping[str, np.ndarray]], mask: Sequence[bool],
                     use_cuda_graph: bool = True) -> dict[str, np.ndarray]:
    """The masked loop on two `runtime.trt_engine.TrtEngine`s (module docstring); returns FULL's outputs after
    the last step (the state outputs are the final ones whichever kind ran last)."""
    names = _check(full, cached, feeds, state_names, per_step, mask)
    with full._lock, cached._lock:
        shapes = {n: np.shape(a) for n, a in {**feeds, **per_step[0]}.items()}
        ptrs = full._bind(shapes)
        residual = full.output_shapes()[RESIDUAL]
        cached._set_shapes({**shapes, RESIDUAL: residual})
        for spec in cached.entry.inputs + cached.entry.outputs:
            if not cached.context.set_tensor_address(spec.name, ptrs[spec.name]):
                raise BundleError(f"TensorRT refused the address of `{spec.name}` in {cached.path.name}")
        cached._bound = None  # its context now points at FULL's buffers: rebind before a plain call
        slot = {n: int(np.prod(np.shape(per_step[0][n]))) * np.dtype(full.entry.spec(n).dtype).itemsize
                for n in names}
        copies = full._state_copies(ptrs, feeds, state_names)
        table = full._upload_table(per_step, names)
        contexts = {True: None, False: cached.context}
        graphs: dict[bool, object] = {}
        try:
            full._upload(ptrs, feeds)
            for i, kind in enumerate(mask):
                for n in names:
                    full._copy(ptrs[n], table[n] + i * slot[n], slot[n], "DeviceToDevice")
                if graphs.get(kind) is not None:
                    _ok(full._cudart.cudaGraphLaunch(graphs[kind], full.stream))
                    continue
                full._step(copies, contexts[kind])
                if use_cuda_graph and kind not in graphs and kind in mask[i + 1:]:
                    graphs[kind] = full._capture(copies, contexts[kind])
            out = full._download(ptrs, [s.name for s in full.entry.outputs])
        finally:
            for graph in graphs.values():
                if graph is not None:
                    _ok(full._cudart.cudaGraphExecDestroy(graph))
            full._free(table)
        n_full = sum(bool(m) for m in mask)
        full.calls += n_full
        cached.calls += len(mask) - n_full
    return out


def ort_masked_steps(full, cached, feeds: Mapping[str, np.ndarray], state_names: Mapping[str, str],
                     per_step: Sequence[Mapping[str, np.ndarray]], mask: Sequence[bool],
                     use_cuda_graph: bool = True) -> dict[str, np.ndarray]:
    """The masked loop on two `runtime.ort_cuda.OrtCudaEngine`s (module docstring); results equal the host
    loop's."""
    import onnxruntime as ort

    names = _check(full, cached, feeds, state_names, per_step, mask)
    graphs = use_cuda_graph and full.device == "cuda"
    with full._loop_lock, cached._loop_lock:
        loop = full._loop_buffers(feeds, state_names, per_step[0])
        values = loop["values"]  # FULL's: every input, state pair and output, the residual among them
        runs = {}
        for kind, engine in ((True, full), (False, cached)):
            session = (engine._session_for_graphs() if graphs else None) or engine.session
            for parity in (0, 1):
                options = ort.RunOptions()
                if session is not engine.session:  # one captured graph per kind, parity and signature
                    options.add_run_config_entry("gpu_graph_id", str(loop["graph_id"] + parity))
                runs[kind, parity] = (session, engine._bind(session, values, state_names, parity), options)
        for name, array in feeds.items():
            values[name][0].update_inplace(np.ascontiguousarray(array, full.entry.spec(name).dtype))
        for i, step in enumerate(per_step):
            for name in names:
                values[name][0].update_inplace(np.ascontiguousarray(step[name], full.entry.spec(name).dtype))
            session, binding, options = runs[bool(mask[i]), i % 2]
            session.run_with_iobinding(binding, options)
        last = (len(per_step) - 1) % 2
        out = {o: (values[state_names[o]][1 - last] if o in state_names else values[o][0]).numpy()
               for o in full.output_names}
    n_full = sum(bool(m) for m in mask)
    with full._counters:
        full.calls += n_full
    with cached._counters:
        cached.calls += len(mask) - n_full
    return out


def masked_steps(full, cached, feeds, state_names, per_step, mask) -> dict[str, np.ndarray]:
    """The device loop for these engines' backend."""
    if full.entry.backend == "tensorrt":
        return trt_masked_steps(full, cached, feeds, state_names, per_step, mask)
    return ort_masked_steps(full, cached, feeds, state_names, per_step, mask)
