"""The TensorRT backend: one deserialized engine, its device buffers, and a device-resident step loop replayed
as a CUDA graph. numpy + tensorrt 10 + cuda-python (`cuda.bindings.runtime`); nothing here imports either at
module level, so `runtime.engine.load_engine` can import this file on any machine and fail with a clear
BundleError only when a TensorRT engine is actually opened.

API used (TensorRT 10 Python API, docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api): Runtime.
deserialize_cuda_engine, ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype /
create_execution_context, IExecutionContext.set_input_shape / get_tensor_shape / set_tensor_address /
execute_async_v3(stream_handle). cuda-python 12.x runtime (nvidia.github.io/cuda-python): every call returns
``(cudaError_t, *values)``.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from metacanvas_deploy.runtime.errors import BundleError, CudaError, ShapeError
from metacanvas_deploy.runtime.manifest import EngineEntry

REBUILD = "python -m mc_export build ... --target tensorrt"
_KEEP_SIGNATURES = 4  # input-shape signatures whose device buffers stay allocated
_CHECKED = (("gpu", "GPU"), ("compute_capability", "compute capability"), ("tensorrt", "TensorRT"))
_JETSON_NAMES = ("orin", "thor", "tegra")


def import_backends():
    """(tensorrt, cuda.bindings.runtime); BundleError naming what to install when either is missing."""
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except (ImportError, OSError) as e:  # OSError: a wheel whose native libraries are missing
        raise BundleError(f"this bundle holds TensorRT engines, which need an NVIDIA GPU with TensorRT 10 and "
                          f"cuda-python installed ({e}). Install them (pip install tensorrt-cu12 cuda-python) on a "
                          "GPU machine, or rebuild the bundle for this one with --target onnxruntime") from e
    return trt, cudart


@functools.cache
def _logger(trt):
    """One TensorRT logger per process (TensorRT warns when runtimes and builders are given different ones)."""
    return trt.Logger(trt.Logger.WARNING)


def _ok(result):
    """cuda-python's ``(err, *values)``: CudaError on an error, else None, the one value or the tuple of them."""
    err, *values = result
    if int(err) != 0:
        from cuda.bindings import runtime as cudart

        raise CudaError(f"CUDA error {getattr(err, 'name', err)}: {cudart.cudaGetErrorString(err)[1].decode()}")
    return None if not values else values[0] if len(values) == 1 else tuple(values)


# --- device identity --------------------------------------------------------------------------------------------

def _cuda_version(v: int) -> str:
    """CUDA's integer version (12090) -> "12.9"."""
    return f"{v // 1000}.{v % 1000 // 10}"


def make_identity(gpu: str, major: int, minor: int, tensorrt: str, cuda_runtime: int, cuda_driver: int,
                  jetson: bool) -> dict:
    """The device identity a TensorRT engine records in its manifest entry (`EngineEntry.device`)."""
    return {"gpu": gpu, "compute_capability": f"{major}.{minor}", "tensorrt": tensorrt,
            "cuda_runtime": _cuda_version(cuda_runtime), "cuda_driver": _cuda_version(cuda_driver),
            "jetson": bool(jetson)}


def device_identity(device: int = 0) -> dict:
    """This machine's GPU ``device`` and TensorRT, as `make_identity` records them. BundleError without a GPU."""
    trt, cudart = import_backends()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count <= device:
        seen = getattr(err, "name", err) if int(err) != 0 else f"{count} device(s)"
        raise BundleError(f"no CUDA device {device} is visible ({seen}): TensorRT engines need an NVIDIA GPU; "
                          "rebuild with --target onnxruntime for a CPU")
    props = _ok(cudart.cudaGetDeviceProperties(device))
    name = bytes(props.name).split(b"\0", 1)[0].decode()
    jetson = Path("/etc/nv_tegra_release").exists() or any(k in name.lower() for k in _JETSON_NAMES)
    return make_identity(name, props.major, props.minor, trt.__version__, _ok(cudart.cudaRuntimeGetVersion()),
                         _ok(cudart.cudaDriverGetVersion()), jetson)


def check_device(entry_device: Mapping, current: Mapping, precision: str | None = None) -> None:
    """Raise BundleError unless an engine built on ``entry_device`` runs on ``current`` (both `make_identity`
    dicts): a TensorRT engine only deserializes with the TensorRT version that built it, and its kernels are
    chosen for one GPU model. Pure (imports nothing), so it is tested without a GPU."""
    diffs = [f"{what} {entry_device.get(key, 'unknown')} (engine) vs {current.get(key, 'unknown')} (here)"
             for key, what in _CHECKED if str(entry_device.get(key)) != str(current.get(key))]
    if diffs:
        rebuild = REBUILD + (f" --precision {precision}" if precision else "")
        raise BundleError(f"this TensorRT engine was built for another GPU or TensorRT: {'; '.join(diffs)}. "
                          f"An engine runs only on the GPU model and TensorRT version that built it: rebuild the "
                          f"bundle on this machine with `{rebuild}`")


def check_step_arguments(entry: EngineEntry, feeds, state_names, per_step) -> list[str]:
    """Validate a device step loop's arguments (`TrtEngine.run_steps`, `runtime.ort_cuda.OrtCudaEngine.run_steps`)
    against the engine's manifest entry; returns the per-step input names."""
    if not per_step:
        raise ShapeError("run_steps needs at least one step")
    names = sorted(per_step[0])
    inputs, outputs = {s.name for s in entry.inputs}, {s.name for s in entry.outputs}
    bad = [f"{o} -> {i}" for o, i in state_names.items() if o not in outputs or i not in inputs or i in names]
    if bad:
        raise ShapeError(f"stage `{entry.stage}`: state {bad} must map an output to a non-per-step input")
    for i, step in enumerate(per_step):
        if sorted(step) != names or any(np.shape(step[n]) != np.shape(per_step[0][n]) for n in names):
            raise ShapeError(f"stage `{entry.stage}`: step {i} gives {sorted(step)} with shapes "
                             f"{[np.shape(step[n]) for n in sorted(step)]}; every step must match step 0")
    entry.check_inputs({**feeds, **per_step[0]})
    return names


# --- the engine -------------------------------------------------------------------------------------------------

def _nbytes(shape: Sequence[int], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class TrtEngine:
    """A TensorRT engine over one bundle stage, with the interface of `runtime.engine.OrtEngine`: ``__call__``
    (host arrays in and out), ``timed``, ``seconds``, ``calls``, ``entry``; plus `run_steps`, the step loop on the GPU.

    The device is checked against the manifest before deserializing; device buffers are allocated once per
    input-shape signature (the last few are kept); everything runs on one CUDA stream.

    Thread-safe by serialising: the execution context, the bound shape signature, the buffers and the stream are
    one state, so `__call__`, `run_steps` and `close` take one lock and concurrent callers wait their turn (the
    seconds `timed` reports exclude that wait). Two requests run in parallel on a GPU with two engines, not
    with one."""

    def __init__(self, path: Path, entry: EngineEntry):
        self._trt, self._cudart = import_backends()
        check_device(entry.device or {}, device_identity(), entry.precision)
        self.entry, self.path = entry, Path(path)
        self._runtime = self._trt.Runtime(_logger(self._trt))
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT cannot deserialize {self.path.name} (see its log above): corrupt or built "
                              f"by another TensorRT. Rebuild with `{REBUILD}`")
        self._check_io()
        self.context = self.engine.create_execution_context()
        self.stream = _ok(self._cudart.cudaStreamCreateWithFlags(self._cudart.cudaStreamNonBlocking))
        self._buffers: dict[tuple, dict[str, int]] = {}  # shape signature -> tensor name -> device pointer
        self._bound: tuple | None = None  # the signature whose shapes and addresses the context holds
        self._lock = threading.Lock()  # one call at a time: see the class docstring
        self.seconds, self.calls = 0.0, 0

    def _check_io(self) -> None:
        """The engine's tensors are the manifest's: names, input/output roles and dtypes."""
        e, trt = self.engine, self._trt
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        got = (sorted(n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT),
               sorted(n for n in names if e.get_tensor_mode(n) != trt.TensorIOMode.INPUT))
        want = sorted(s.name for s in self.entry.inputs), sorted(s.name for s in self.entry.outputs)
        if got != want:
            raise BundleError(f"{self.path.name} does not match its manifest entry: it takes {got[0]} -> {got[1]}, "
                              f"the manifest says {want[0]} -> {want[1]}; rebuild with `{REBUILD}`")
        for spec in self.entry.inputs + self.entry.outputs:
            dtype = np.dtype(trt.nptype(e.get_tensor_dtype(spec.name))).name
            if dtype != spec.dtype:
                raise BundleError(f"{self.path.name}: tensor `{spec.name}` is {dtype} in the engine, {spec.dtype} in "
                                  f"the manifest; rebuild with `{REBUILD}`")

    # buffers and bindings --------------------------------------------------------------------------------------
    def _bind(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """Set the input shapes and every tensor's address for this signature; allocate its buffers on first use."""
        sig = tuple(sorted((n, tuple(int(d) for d in s)) for n, s in shapes.items()))
        if sig not in self._buffers:
            self._set_shapes(shapes)
            out = self.output_shapes()
            sizes = {**{s.name: _nbytes(shapes[s.name], s.dtype) for s in self.entry.inputs},
                     **{s.name: _nbytes(out[s.name], s.dtype) for s in self.entry.outputs}}
            if len(self._buffers) >= _KEEP_SIGNATURES:
                self._free(self._buffers.pop(next(iter(self._buffers))))
            self._buffers[sig] = {n: _ok(self._cudart.cudaMalloc(max(size, 1))) for n, size in sizes.items()}
            self._bound = None
        if self._bound != sig:
            self._set_shapes(shapes)
            for name, ptr in self._buffers[sig].items():
                if not self.context.set_tensor_address(name, ptr):
                    raise BundleError(f"TensorRT refused the address of `{name}` in {self.path.name}")
            self._bound = sig
        return self._buffers[sig]

    def _set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
                raise ShapeError(f"{self.path.name}: TensorRT refused `{name}` of shape {tuple(shape)}, outside the "
                                 f"engine's optimisation profile; the manifest and the engine disagree: rebuild "
                                 f"with `{REBUILD}`")

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every output's shape under the input shapes set last (TensorRT infers them from the profile)."""
        shapes = {s.name: tuple(self.context.get_tensor_shape(s.name)) for s in self.entry.outputs}
        unknown = [n for n, shape in shapes.items() if min(shape, default=0) < 0]
        if unknown:
            raise BundleError(f"{self.path.name}: outputs {unknown} have data-dependent shapes, which this runtime "
                              "does not allocate for; the stage's graph should not produce them")
        return shapes

    def _free(self, ptrs: Mapping[str, int]) -> None:
        for ptr in ptrs.values():
            _ok(self._cudart.cudaFree(ptr))

    # copies ----------------------------------------------------------------------------------------------------
    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        """Enqueue a copy on the engine's stream; ``kind`` is HostToDevice, DeviceToHost or DeviceToDevice."""
        k = getattr(self._cudart.cudaMemcpyKind, f"cudaMemcpy{kind}")
        _ok(self._cudart.cudaMemcpyAsync(dst, src, nbytes, k, self.stream))

    def _upload(self, ptrs: Mapping[str, int], arrays: Mapping[str, np.ndarray]) -> None:
        """Enqueue host -> device copies. From pageable memory CUDA stages the bytes before returning (CUDA
        runtime API, "API synchronization behavior"), so the arrays need not outlive the call."""
        for name, array in arrays.items():
            a = np.ascontiguousarray(array)
            self._copy(ptrs[name], a.ctypes.data, a.nbytes, "HostToDevice")

    def _download(self, ptrs: Mapping[str, int], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Enqueue device -> host copies of outputs ``names`` and wait for the stream."""
        shapes = self.output_shapes()
        out = {n: np.empty(shapes[n], self.entry.spec(n).dtype) for n in names}
        for name, a in out.items():
            self._copy(a.ctypes.data, ptrs[name], a.nbytes, "DeviceToHost")
        _ok(self._cudart.cudaStreamSynchronize(self.stream))
        return out

    def _execute(self, context=None) -> None:
        """Enqueue ``context`` (default: this engine's; step caching's CACHED engine bound to these buffers,
        `runtime.masked_loops`) on this engine's stream."""
        if not (context or self.context).execute_async_v3(int(self.stream)):
            raise CudaError(f"TensorRT could not enqueue {self.path.name} (see its log above)")

    # running ---------------------------------------------------------------------------------------------------
    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine call: inputs checked against the manifest, copied in, run, outputs copied out."""
        return self.timed(feeds)[0]

    def timed(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """(outputs, seconds of this call under the lock: copies and run, not the input checks or the wait)."""
        self.entry.check_inputs(feeds)
        with self._lock:
            start = time.perf_counter()
            ptrs = self._bind({n: np.shape(a) for n, a in feeds.items()})
            self._upload(ptrs, feeds)
            self._execute()
            out = self._download(ptrs, [s.name for s in self.entry.outputs])
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self.calls += 1
        return out, elapsed

    def run_steps(self, feeds: Mapping[str, np.ndarray], state_names: Mapping[str, str],
                  per_step: Sequence[Mapping[str, np.ndarray]], use_cuda_graph: bool = True) -> dict[str, np.ndarray]:
        """``len(per_step)`` engine calls on the GPU with no host round trip between them; returns the outputs
        after the last one (the denoise loop: `mc_export.components.denoise` describes its contract).

        ``feeds``: every input that is not per-step, the state inputs at their step-0 values. ``state_names``:
        output -> the input it becomes at the next step (``{"next_sample": "sample", ...}``). ``per_step[i]``:
        the inputs that change every step (``timestep``, ``coefficients``), same names and shapes each step.

        Static inputs are uploaded once and the per-step values once as a table. Step 0 runs plainly (it is
        TensorRT's warm-up before capture); then one CUDA graph is captured holding the engine call and the
        device-to-device copies of each state output onto its input, and replayed for every later step after a
        copy of that step's slot from the table. The host waits once, for the final outputs. A graph that cannot
        be captured falls back, with a warning, to the same loop without a graph: results are identical."""
        names = check_step_arguments(self.entry, feeds, state_names, per_step)
        with self._lock:
            return self._run_steps(feeds, state_names, per_step, use_cuda_graph, names)

    def _run_steps(self, feeds, state_names, per_step, use_cuda_graph: bool,
                   names: list[str]) -> dict[str, np.ndarray]:
        """`run_steps` under the lock."""
        start = time.perf_counter()
        ptrs = self._bind({n: np.shape(a) for n, a in {**feeds, **per_step[0]}.items()})
        slot = {n: _nbytes(np.shape(per_step[0][n]), self.entry.spec(n).dtype) for n in names}
        copies = self._state_copies(ptrs, feeds, state_names)
        table = self._upload_table(per_step, names)
        graph = None
        try:
            self._upload(ptrs, feeds)
            for i in range(len(per_step)):
                for n in names:
                    self._copy(ptrs[n], table[n] + i * slot[n], slot[n], "DeviceToDevice")
                if graph is not None:
                    _ok(self._cudart.cudaGraphLaunch(graph, self.stream))
                    continue
                self._step(copies)
                if use_cuda_graph and i == 0 and len(per_step) > 1:
                    graph = self._capture(copies)
            out = self._download(ptrs, [s.name for s in self.entry.outputs])
        finally:
            if graph is not None:
                _ok(self._cudart.cudaGraphExecDestroy(graph))
            self._free(table)
        self.seconds += time.perf_counter() - start
        self.calls += len(per_step)
        return out

    def _upload_table(self, per_step, names) -> dict[str, int]:
        """Every step's per-step values on the device, one (steps, ...) table per input."""
        stacked = {n: np.stack([np.asarray(s[n], self.entry.spec(n).dtype) for s in per_step]) for n in names}
        table = {n: _ok(self._cudart.cudaMalloc(max(a.nbytes, 1))) for n, a in stacked.items()}
        self._upload(table, stacked)
        return table

    def _state_copies(self, ptrs, feeds, state_names) -> list[tuple[int, int, int]]:
        """(input pointer, output pointer, bytes) per state pair; ShapeError unless each output's shape under the
        bound inputs is its input's."""
        shapes = self.output_shapes()
        wrong = [f"{o} {shapes[o]} -> {i} {np.shape(feeds[i])}" for o, i in state_names.items()
                 if shapes[o] != np.shape(feeds[i])]
        if wrong:
            raise ShapeError(f"stage `{self.entry.stage}`: a state output must have its input's shape: {wrong}")
        return [(ptrs[i], ptrs[o], _nbytes(shapes[o], self.entry.spec(o).dtype)) for o, i in state_names.items()]

    def _step(self, copies: Sequence[tuple[int, int, int]], context=None) -> None:
        """One engine call, then each state output copied onto the input it feeds (all enqueued, no wait)."""
        self._execute(context)
        for dst, src, nbytes in copies:
            self._copy(dst, src, nbytes, "DeviceToDevice")

    def _capture(self, copies: Sequence[tuple[int, int, int]], context=None):
        """`_step` captured as an instantiated CUDA graph, or None (with a warning) if it cannot be captured."""
        cudart = self._cudart
        _ok(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            self._step(copies, context)
        except CudaError as e:
            problem = str(e)
        else:
            problem = None
        err, graph = cudart.cudaStreamEndCapture(self.stream)  # always: it leaves capture mode
        if int(err) != 0:
            problem = problem or f"cudaStreamEndCapture: {getattr(err, 'name', err)}"
        elif problem is not None:
            _ok(cudart.cudaGraphDestroy(graph))
        if problem is not None:
            warnings.warn(f"{self.path.name}: the step cannot be captured as a CUDA graph ({problem}); running the "
                          "loop without one", RuntimeWarning, stacklevel=3)
            return None
        try:
            return _ok(cudart.cudaGraphInstantiate(graph, 0))
        finally:
            _ok(cudart.cudaGraphDestroy(graph))

    def close(self) -> None:
        """Free the device buffers and the stream (after a call in flight ends); the engine cannot be used
        afterwards."""
        with self._lock:
            for ptrs in self._buffers.values():
                self._free(ptrs)
            self._buffers.clear()
            if self.stream is not None:
                _ok(self._cudart.cudaStreamDestroy(self.stream))
                self.stream = None
            self.context = self.engine = None
