"""ONNX Runtime on an NVIDIA GPU (`--target onnxruntime-gpu`): the bundle's ONNX files run by the CUDA execution
provider, and the denoise loop kept in device memory with IO binding and ONNX Runtime's CUDA graphs.

A CUDA bundle's engines are ordinary ONNX Runtime entries (``backend: onnxruntime``) whose ``device`` records
the provider and the GPU they were built and gated for (`cuda_identity`). The ONNX file itself is portable
across GPUs (unlike a TensorRT engine), so at load only what this machine must have is checked: onnxruntime-gpu
(``CUDAExecutionProvider`` in `onnxruntime.get_available_providers()`) and a session that actually placed the
graph on the CUDA provider (ONNX Runtime silently falls back to the CPU when no device is usable).

The step loop (`OrtCudaEngine.run_steps`, the contract of `runtime.trt_engine.TrtEngine.run_steps`): every
tensor lives in an `OrtValue` on the device, bound once with `session.io_binding()`. Each state tensor (the
sample, UniPC's last sample and history) has two buffers used in turn, A -> B on even steps and B -> A on odd
ones, so no state is ever copied, not even on the device. The per-step inputs (a timestep and a coefficient
row, tens of bytes) are written into their bound buffers in place before each step. With ``use_cuda_graph``, a
second session with the CUDA provider's ``enable_cuda_graph`` runs the loop: ONNX Runtime captures one graph per
``gpu_graph_id`` (one for each ping-pong parity and shape signature) at its first runs and replays it after, so
the addresses the graphs hold stay bound for the engine's life. Host copies: the static inputs once, the
per-step values per step, the final outputs once. ONNX Runtime waits for the device at the end of each Run (its
default; the in-place writes of the next step's values rely on it), so unlike the TensorRT loop there is one
host wait per step, but no latents traffic.

The TensorRT execution provider (a bundle built with ``--ort-provider tensorrt``: the entry's ``device`` names
``TensorrtExecutionProvider``): ONNX Runtime hands the graph to TensorRT, which builds an engine at the first run
and caches it, with its timing cache, in `engine_cache_dir` (keyed like this package's TensorRT engines: GPU
model, compute capability and onnxruntime version, plus the engine file's sha256); nodes TensorRT does not take
run on the CUDA provider. fp16 bundles enable TensorRT's fp16. The loop runs with IO binding but without ONNX
Runtime's CUDA-graph capture (that is the CUDA provider's).

API used (onnxruntime 1.32 Python API): InferenceSession(providers=[(name, options)]), get_providers, io_binding,
IOBinding.bind_ortvalue_input/bind_ortvalue_output, run_with_iobinding(binding, RunOptions),
RunOptions.add_run_config_entry("gpu_graph_id", ...), OrtValue.ortvalue_from_shape_and_type / update_inplace /
numpy. Nothing here has run on a GPU: the loop is tested on the CPU provider (`device="cpu"`), bit-identical to
the per-step host loop.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from metacanvas_deploy.runtime.errors import BundleError
from metacanvas_deploy.runtime.manifest import EngineEntry
from metacanvas_deploy.runtime.ort_engine import OrtEngine
from metacanvas_deploy.runtime.trt_engine import check_step_arguments

CUDA_PROVIDER = "CUDAExecutionProvider"
TRT_PROVIDER = "TensorrtExecutionProvider"
GPU_PROVIDERS = {"cuda": CUDA_PROVIDER, "tensorrt": TRT_PROVIDER}  # build's --ort-provider -> ONNX Runtime's name
INSTALL = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.32.0 (the `gpu-ort` extra's pin; it "
           "replaces onnxruntime: the two packages cannot be installed together)")
REBUILD_CPU = "python -m mc_export build ... --target onnxruntime"
INSTALL_TRT = ("onnxruntime-gpu finds TensorRT's libraries (pip install tensorrt-cu12==10.16.1.11, the `gpu` extra's "
               "pin, on the library path), or rebuild with --ort-provider cuda")
_KEEP_SIGNATURES = 4  # shape signatures whose device buffers (and captured graphs) are kept


def is_cuda_entry(entry: EngineEntry | None) -> bool:
    """Whether a manifest entry is an ONNX Runtime engine built for the CUDA execution provider."""
    return (entry is not None and entry.backend == "onnxruntime"
            and (entry.device or {}).get("provider") in GPU_PROVIDERS.values())


def entry_provider(entry: EngineEntry) -> str:
    """The execution provider a CUDA bundle's entry was built and gated with (CUDA's or TensorRT's)."""
    return (entry.device or {}).get("provider", CUDA_PROVIDER)


def require_cuda_provider(ort=None, provider: str = CUDA_PROVIDER) -> None:
    """BundleError naming the fix unless this onnxruntime has the CUDA execution provider (and ``provider``)."""
    if ort is None:
        import onnxruntime as ort
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise BundleError(f"this bundle runs on ONNX Runtime's {CUDA_PROVIDER} (built with --target onnxruntime-gpu); "
                          f"the installed onnxruntime {ort.__version__} offers {', '.join(available)}. On a machine "
                          f"with an NVIDIA GPU: {INSTALL}; for a CPU, rebuild with `{REBUILD_CPU}`")
    if provider not in available:
        raise BundleError(f"this bundle runs on ONNX Runtime's {provider} (built with --ort-provider tensorrt); the "
                          f"installed onnxruntime {ort.__version__} offers {', '.join(available)}: {INSTALL_TRT}")


def engine_cache_dir(entry: EngineEntry, root: Path | None = None) -> Path:
    """Where the TensorRT execution provider caches the engine (and timing cache) it builds for ``entry`` on this
    kind of GPU: ``<root>/<gpu>-sm<cc>-ort<version>/<sha256 of the ONNX file, 16 hex>``, root
    ``~/.cache/metacanvas/ort-tensorrt``. An engine fits one GPU model and TensorRT build, so the GPU identity
    recorded at build (checked against this machine at load) names the folder, and the file's hash the stage."""
    import re

    device = entry.device or {}
    root = Path(root) if root is not None else Path.home() / ".cache" / "metacanvas" / "ort-tensorrt"
    gpu = re.sub(r"[^a-z0-9]+", "-", str(device.get("gpu", "unknown")).lower()).strip("-")
    kind = f"{gpu}-sm{device.get('compute_capability', 'unknown')}-ort{device.get('onnxruntime', 'unknown')}"
    return root / kind / (entry.sha256[:16] or Path(entry.file).stem)


def cuda_identity(device_id: int = 0) -> dict:
    """What a CUDA bundle records in each engine's ``device``: provider, GPU name, compute capability, driver and
    CUDA versions, onnxruntime version. BundleError without onnxruntime-gpu or without a visible GPU (read with
    nvidia-smi, which comes with the driver)."""
    import onnxruntime as ort

    require_cuda_provider(ort)
    smi = shutil.which("nvidia-smi")
    query = [smi or "nvidia-smi", f"--id={device_id}", "--query-gpu=name,compute_cap,driver_version",
             "--format=csv,noheader"]
    try:
        line = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        name, cc, driver = (part.strip() for part in line.splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        raise BundleError(f"no NVIDIA GPU {device_id} is visible (nvidia-smi: {e}); --target onnxruntime-gpu needs "
                          f"one with its driver. Build for this machine with `{REBUILD_CPU}`") from e
    try:
        from onnxruntime.capi import build_and_package_info as info
        cuda = str(getattr(info, "cuda_version", "unknown"))
    except ImportError:
        cuda = "unknown"
    return {"provider": CUDA_PROVIDER, "gpu": name, "compute_capability": cc, "cuda_runtime": cuda,
            "cuda_driver": driver, "onnxruntime": ort.__version__}


def cuda_usable() -> bool:
    """True when onnxruntime-gpu is installed and nvidia-smi sees a GPU (the build's check before any work)."""
    try:
        cuda_identity()
    except (BundleError, ImportError):
        return False
    return True


def _providers(device: str, device_id: int, cuda_graph: bool, trt_cache: Path | None = None,
               fp16: bool = False) -> list:
    """The session's providers: the CUDA provider (with ``enable_cuda_graph`` for the graph session), after
    TensorRT's when ``trt_cache`` is given (its engine and timing caches go there), then the CPU's. TF32 is off
    for fp32 bundles (the CUDA provider's default is on: ~1e-3 relative error, over the fp32 gate's 1e-4; our
    TensorRT fp32 engines turn it off too)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    options = {"device_id": str(device_id), **({"enable_cuda_graph": "1"} if cuda_graph else {}),
               **({} if fp16 else {"use_tf32": "0"})}
    providers = [(CUDA_PROVIDER, options)] + ([] if cuda_graph else ["CPUExecutionProvider"])
    if trt_cache is not None:
        cache = str(trt_cache)
        providers.insert(0, (TRT_PROVIDER, {"device_id": str(device_id), "trt_engine_cache_enable": "True",
                                            "trt_engine_cache_path": cache, "trt_timing_cache_enable": "True",
                                            "trt_timing_cache_path": cache,
                                            "trt_fp16_enable": "True" if fp16 else "False"}))
    return providers


class OrtCudaEngine(OrtEngine):
    """An ONNX Runtime session on the CUDA execution provider, with `run_steps`, the step loop in device memory
    (module docstring). ``device="cpu"`` runs the same IO-binding loop on the CPU provider (tests; no graphs).

    Thread-safe: ``__call__``/``timed`` are `OrtEngine`'s (concurrent `run`); `run_steps` calls take one lock,
    since their device buffers and graphs are one state."""

    def __init__(self, path: Path, entry: EngineEntry, threads: int | None = None, mapped: bool = False,
                 device: str = "cuda", device_id: int = 0, provider: str | None = None,
                 cache_root: Path | None = None):
        self.device, self.device_id = device, device_id
        self.provider = provider or entry_provider(entry)
        trt_cache = None
        if device == "cuda":
            require_cuda_provider(provider=self.provider)
            if self.provider == TRT_PROVIDER:
                trt_cache = engine_cache_dir(entry, cache_root)
                trt_cache.mkdir(parents=True, exist_ok=True)
        super().__init__(path, entry, threads, mapped,
                         providers=_providers(device, device_id, False, trt_cache, entry.precision == "fp16"))
        if device == "cuda" and self.provider not in self.session.get_providers():
            raise BundleError(f"{Path(path).name}: ONNX Runtime could not place the graph on {self.provider} (it "
                              f"fell back to {self.session.get_providers()}): no usable CUDA device or CUDA/cuDNN "
                              f"libraries. Check `nvidia-smi` and {INSTALL}, or rebuild with `{REBUILD_CPU}`")
        self._path, self._threads, self._mapped = Path(path), threads, mapped
        self._loop_lock = threading.Lock()
        self._graph_session = None  # created on the first graph loop; None also after a failed creation
        self._graph_failed = False
        self._loops: dict[tuple, dict] = {}  # shape signature -> {"values": name -> [OrtValue, ...], "graph_id"}

    # device buffers --------------------------------------------------------------------------------------------
    def _ortvalue(self, shape, dtype: str):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(tuple(int(d) for d in shape), np.dtype(dtype),
                                                         self.device, self.device_id)

    def _loop_buffers(self, feeds, state_names, step0) -> dict:
        """This signature's OrtValues: one per input and output, two per state pair (index 0 and 1)."""
        shapes = {n: np.shape(a) for n, a in {**feeds, **step0}.items()}
        sig = tuple(sorted((n, tuple(s)) for n, s in shapes.items())) + tuple(sorted(state_names.items()))
        if sig not in self._loops:
            if len(self._loops) >= _KEEP_SIGNATURES:  # graphs cannot be freed one by one: start afresh
                self._loops.clear()
                self._graph_session = None
            state_in = {i: o for o, i in state_names.items()}
            values = {n: [self._ortvalue(s, self.entry.spec(n).dtype)] for n, s in shapes.items()}
            for name in state_in:  # the second buffer of each state pair (output and input share a dtype)
                values[name].append(self._ortvalue(shapes[name], self.entry.spec(name).dtype))
            others = [s for s in self.entry.outputs if s.name not in state_names]
            out_shapes = self._output_shapes(shapes) if others else {}
            for spec in others:
                values[spec.name] = [self._ortvalue(out_shapes[spec.name], spec.dtype)]
            self._loops[sig] = {"values": values, "graph_id": 2 * len(self._loops)}
        return self._loops[sig]

    def _output_shapes(self, shapes: Mapping[str, tuple]) -> dict[str, tuple]:
        """Every output's concrete shape: one plain run on zeros, once per signature, only for a stage with
        outputs besides its state (a state output has its input's shape; the denoise stage has no others)."""
        zeros = {n: np.zeros(s, self.entry.spec(n).dtype) for n, s in shapes.items()}
        outs = self.session.run(self.output_names, zeros)
        return {n: np.shape(a) for n, a in zip(self.output_names, outs)}

    def _bind(self, session, values, state_names, parity: int):
        """An IOBinding of ``values`` for a step of ``parity``: state inputs read buffer ``parity``, their
        outputs write buffer ``1 - parity``."""
        binding = session.io_binding()
        state_in = {i: o for o, i in state_names.items()}
        for spec in self.entry.inputs:
            binding.bind_ortvalue_input(spec.name, values[spec.name][parity if spec.name in state_in else 0])
        for spec in self.entry.outputs:
            if spec.name in state_names:
                binding.bind_ortvalue_output(spec.name, values[state_names[spec.name]][1 - parity])
            else:
                binding.bind_ortvalue_output(spec.name, values[spec.name][0])
        return binding

    def _session_for_graphs(self):
        """The session with ``enable_cuda_graph`` (None, with a warning, when ONNX Runtime refuses it: a graph
        with nodes the CUDA provider does not take cannot be captured)."""
        import onnxruntime as ort

        from metacanvas_deploy.runtime.ort_engine import session_options

        if self.provider == TRT_PROVIDER:  # the CUDA provider's capture; TensorRT's sessions loop without it
            return None
        if self._graph_session is None and not self._graph_failed:
            try:
                self._graph_session = ort.InferenceSession(str(self._path),
                                                           session_options(self._threads, self._mapped),
                                                           providers=_providers("cuda", self.device_id, True))
            except Exception as e:  # noqa: BLE001 -- ORT raises its own pybind classes (Fail, RuntimeException)
                self._graph_failed = True
                warnings.warn(f"{self._path.name}: ONNX Runtime cannot capture this graph as a CUDA graph ({e}); "
                              "running the loop without one", RuntimeWarning, stacklevel=4)
        return self._graph_session

    # the loop --------------------------------------------------------------------------------------------------
    def run_steps(self, feeds: Mapping[str, np.ndarray], state_names: Mapping[str, str],
                  per_step, use_cuda_graph: bool = True) -> dict[str, np.ndarray]:
        """``len(per_step)`` engine calls with the state in device memory; returns the outputs after the last one.
        Arguments as `runtime.trt_engine.TrtEngine.run_steps`; the results equal the per-step host loop's."""
        names = check_step_arguments(self.entry, feeds, state_names, per_step)
        with self._loop_lock:
            start = time.perf_counter()
            out = self._run_steps(feeds, state_names, per_step, names, use_cuda_graph and self.device == "cuda")
            elapsed = time.perf_counter() - start
        with self._counters:
            self.seconds += elapsed
            self.calls += len(per_step)
        return out

    def _run_steps(self, feeds, state_names, per_step, names, use_cuda_graph: bool) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        loop = self._loop_buffers(feeds, state_names, per_step[0])
        values = loop["values"]
        session = self._session_for_graphs() if use_cuda_graph else None
        options = [ort.RunOptions(), ort.RunOptions()]
        if session is not None:
            for parity, o in enumerate(options):  # one captured graph per parity and signature
                o.add_run_config_entry("gpu_graph_id", str(loop["graph_id"] + parity))
        session = session or self.session
        bindings = [self._bind(session, values, state_names, parity) for parity in (0, 1)]
        for name, array in feeds.items():  # the static inputs and the step-0 state, once
            values[name][0].update_inplace(np.ascontiguousarray(array, self.entry.spec(name).dtype))
        for i, step in enumerate(per_step):
            for name in names:  # tens of bytes per step, written where the graph reads them
                values[name][0].update_inplace(np.ascontiguousarray(step[name], self.entry.spec(name).dtype))
            session.run_with_iobinding(bindings[i % 2], options[i % 2])
        last = (len(per_step) - 1) % 2
        return {o: (values[state_names[o]][1 - last] if o in state_names else values[o][0]).numpy()
                for o in self.output_names}

    def close(self) -> None:
        """Drop the loop's device buffers and graph session (a loop in flight finishes first)."""
        with self._loop_lock:
            self._loops.clear()
            self._graph_session = None
