"""Test doubles of TensorRT and the CUDA runtime for tests/test_tensorrt.py and tests/test_tensorrt_export.py: they
execute with ONNX Runtime and keep TensorRT's and cuda-python's calling conventions, so that the step loop's and the
builder's logic runs on a machine without a GPU. Nothing here is a GPU result. onnx is imported only where a double
reads op types: the target-build test runs them with onnx made unimportable."""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path

import numpy as np

from metacanvas_deploy.runtime.trt_engine import make_identity

H100 = make_identity("NVIDIA H100 80GB HBM3", 9, 0, "10.16.1.11", 12090, 12090, False)  # what the doubles report


def install(monkeypatch, trt, cudart) -> None:
    """Make ``trt`` and ``cudart`` what `import tensorrt` and `cuda.bindings.runtime` give for the test."""
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    for name, module in {"tensorrt": trt, "cuda": types.ModuleType("cuda"), "cuda.bindings": bindings,
                         "cuda.bindings.runtime": cudart}.items():
        monkeypatch.setitem(sys.modules, name, module)


class FakeCudart(types.ModuleType):
    """The slice of `cuda.bindings.runtime` TrtEngine uses, with its calling convention (every call returns
    ``(err, *values)``). Device memory is a set of bytearrays at fake addresses (pointer arithmetic works); the
    one stream runs each operation at once, except between BeginCapture and EndCapture, where operations are
    recorded into the graph that GraphLaunch replays."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h",
                                           cudaMemcpyDeviceToDevice="d2d")
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)
    cudaStreamNonBlocking = 1

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.blocks, self.next, self.capture, self.launches, self.captures = {}, 1 << 32, None, 0, 0

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetDeviceProperties(self, device):
        return 0, types.SimpleNamespace(name=b"Fake GPU\0\0", major=9, minor=0, integrated=0)

    def cudaRuntimeGetVersion(self):
        return 0, 12090

    cudaDriverGetVersion = cudaRuntimeGetVersion

    def cudaStreamCreateWithFlags(self, flags):
        return 0, 7

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMalloc(self, n):
        base, self.next = self.next, self.next + n + (1 << 16)
        self.blocks[base] = bytearray(n)
        return 0, base

    def cudaFree(self, ptr):
        del self.blocks[ptr]
        return (0,)

    def view(self, ptr: int, n: int) -> memoryview:
        base = max(b for b in self.blocks if b <= ptr)
        assert ptr + n <= base + len(self.blocks[base]), "copy past the end of an allocation"
        return memoryview(self.blocks[base])[ptr - base: ptr - base + n]

    def enqueue(self, op) -> None:
        self.capture.append(op) if self.capture is not None else op()

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        def copy():
            if kind == "h2d":
                self.view(dst, n)[:] = ctypes.string_at(src, n)
            elif kind == "d2h":
                ctypes.memmove(dst, bytes(self.view(src, n)), n)
            else:
                self.view(dst, n)[:] = bytes(self.view(src, n))
        self.enqueue(copy)
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capture = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capture = self.capture, None
        self.captures += 1
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphDestroy(self, graph):
        return (0,)

    cudaGraphExecDestroy = cudaGraphDestroy

    def cudaGraphLaunch(self, graph, stream):
        self.launches += 1
        for op in graph:
            op()
        return (0,)


class FakeTensorRT(types.ModuleType):
    """The slice of `tensorrt` TrtEngine uses: the "engine" is the stage's ONNX file, run by ONNX Runtime on the
    fake device memory at the addresses the context was given."""

    __version__ = H100["tensorrt"]
    TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    def __init__(self, cudart: FakeCudart, fail_capture: bool = False):
        super().__init__("tensorrt")
        self.cudart, self.fail_capture, self.deserialized = cudart, fail_capture, 0

    @staticmethod
    def nptype(dtype):
        return dtype

    def Runtime(self, logger):
        return types.SimpleNamespace(deserialize_cuda_engine=self._deserialize)

    def _deserialize(self, blob: bytes):
        import onnxruntime as ort

        self.deserialized += 1
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        return FakeEngine(ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"]), self)


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8}


class FakeEngine:
    def __init__(self, session, trt: FakeTensorRT):
        self.session, self.trt = session, trt
        self.io = {a.name: ("in", a) for a in session.get_inputs()}
        self.io.update({a.name: ("out", a) for a in session.get_outputs()})
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return _ORT_TYPES[self.io[name][1].type]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses, self._out = engine, {}, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        key = tuple(sorted(self.shapes.items()))
        if key not in self._out:  # TensorRT infers these; the double runs the graph once on zeros
            zeros = {n: np.zeros(s, self.engine.get_tensor_dtype(n)) for n, s in self.shapes.items()}
            outs = self.engine.session.run(None, zeros)
            self._out[key] = {a.name: o.shape for a, o in zip(self.engine.session.get_outputs(), outs)}
        return self._out[key][name]

    def execute_async_v3(self, stream):
        cudart = self.engine.trt.cudart
        if self.engine.trt.fail_capture and cudart.capture is not None:
            return False

        def run():
            feeds = {}
            for n, s in self.shapes.items():
                dtype = np.dtype(self.engine.get_tensor_dtype(n))
                nbytes = int(np.prod(s)) * dtype.itemsize
                feeds[n] = np.frombuffer(bytes(cudart.view(self.addresses[n], nbytes)), dtype).reshape(s)
            for a, out in zip(self.engine.session.get_outputs(), self.engine.session.run(None, feeds)):
                cudart.view(self.addresses[a.name], out.nbytes)[:] = np.ascontiguousarray(out).tobytes()
        cudart.enqueue(run)
        return True


class FakeBuilderTRT(FakeTensorRT):
    """The builder slice of `tensorrt`: records the network flags, builder flags, profile and timing cache it is
    given; its parser reads the ONNX with `onnx` and, like TensorRT's, has no importer for ``unsupported`` ops."""

    NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16", TF32="TF32", REFIT="REFIT",
                                        WEIGHT_STREAMING="WEIGHT_STREAMING")
    MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO = 0, 1, 2, 3

        def __init__(self):
            pass

    def __init__(self, cudart, unsupported=("SplitToSequence", "SequenceAt"), runnable: bool = False):
        super().__init__(cudart)
        self.unsupported, self.record, self.runnable = set(unsupported), {}, runnable

    def Builder(self, logger):
        trt = self

        class Builder:
            def create_network(self, flags):
                trt.record["network_flags"] = flags
                return types.SimpleNamespace(inputs=[], outputs=[], num_inputs=0, num_outputs=0,
                                             get_input=lambda i: trt.record["net"].inputs[i],
                                             get_output=lambda i: trt.record["net"].outputs[i])

            def create_builder_config(self):
                return FakeConfig(trt.record)

            def create_optimization_profile(self):
                return types.SimpleNamespace(set_shape=lambda n, lo, opt, hi: trt.record.setdefault(
                    "profile", {}).update({n: (tuple(lo), tuple(opt), tuple(hi))}))

            def build_serialized_network(self, network, config):
                logger.log(trt.ILogger.WARNING, "building (fake)")
                # runnable: the "engine" is the parsed ONNX file itself, which FakeTensorRT runs with ONNX Runtime
                return Path(trt.record["parsed"]).read_bytes() if trt.runnable else b"fake engine"

        return Builder()

    def OnnxParser(self, network, logger):
        trt = self

        class Parser:
            num_errors = 0

            def parse_from_file(self, path):
                import onnxruntime as ort

                trt.record["parsed"] = path
                bad = sorted(_op_types(path) & trt.unsupported) if trt.unsupported else []
                self.errors = [f"No importer registered for op: {op}" for op in bad]
                self.num_errors = len(self.errors)
                if bad:
                    return False
                session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                network.inputs = [types.SimpleNamespace(name=i.name) for i in session.get_inputs()]
                network.outputs = [types.SimpleNamespace(name=o.name) for o in session.get_outputs()]
                network.num_inputs, network.num_outputs = len(network.inputs), len(network.outputs)
                trt.record["net"] = network
                return True

            def get_error(self, i):
                return self.errors[i]

        return Parser()


def _op_types(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}


class FakeConfig:
    def __init__(self, record):
        self.record, self.builder_optimization_level = record, 3
        record.update(flags=set(), cleared=set(), pools={})

    def set_flag(self, flag):
        self.record["flags"].add(flag)

    def clear_flag(self, flag):
        self.record["cleared"].add(flag)

    def set_memory_pool_limit(self, pool, size):
        self.record["pools"][pool] = size

    def add_optimization_profile(self, profile):
        self.record["level"] = self.builder_optimization_level
        return 0

    def create_timing_cache(self, blob):
        return types.SimpleNamespace(blob=bytes(blob), serialize=lambda: b"fake timings")

    def set_timing_cache(self, cache, ignore_mismatch):
        self.record.setdefault("caches", []).append(cache.blob)
        return cache.blob in (b"", b"fake timings")  # anything else: "from another device"

    def get_timing_cache(self):
        return self.create_timing_cache(b"")


def gpu_ready() -> bool:
    """A real TensorRT and a CUDA device are here (the `gpu` tests run); the doubles above stand in otherwise."""
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime as cudart
    except (ImportError, OSError):
        return False
    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0
