"""The machine's measured GEMM peaks, the yardstick of the efficiency figures.

One large square GEMM (n x n x n, 2 n^3 operations) per precision, on the thread count of the benchmark:
fp32 through ONNX Runtime's MatMul and through torch.mm (the better of the two is the fp32 peak: it is the
machine's, not one library's), int8 through ONNX Runtime's MatMulInteger with uint8 activations and int8
weights (the combination the INT8 bundles use). Weights are initializers, as in a bundle, so ONNX Runtime
pre-packs them. The statistic is the p50 over runs, as for the step it is set against.
"""

from __future__ import annotations

import numpy as np

from benchmarks.timing import run_alternating, summarize

DEFAULT_SIZE = 2048


def gemm_model(precision: str, n: int) -> bytes:
    """A serialized ONNX model computing one n x n x n GEMM: ``a`` (n, n) input times a constant ``b``.
    fp32: MatMul (float32); int8: MatMulInteger (uint8 x int8 -> int32) with 7-bit weights in [-64, 63], as
    ONNX Runtime's quantizer writes them with reduce_range: on AVX2 without VNNI the u8s8 kernel adds pairs of
    products in saturating int16, and full-range weights would give wrong sums (the speed is the same)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if precision == "fp32":
        a_type, out_type, op = TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
        b = rng.standard_normal((n, n)).astype(np.float32)
    elif precision == "int8":
        a_type, out_type, op = TensorProto.UINT8, TensorProto.INT32, "MatMulInteger"
        b = rng.integers(-64, 64, (n, n), dtype=np.int8)
    else:
        raise ValueError(f"precision must be fp32 or int8, got {precision!r}")
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], f"gemm_{precision}",
                              [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("y", out_type, [n, n])],
                              initializer=[numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _rate(seconds: list[float], n: int, source: str) -> dict:
    stats = summarize(seconds)
    return {"source": source, "n": n, "ops_per_s": 2.0 * n**3 / (stats["p50_ms"] / 1000.0), **stats}


def ort_gemm_peak(precision: str, n: int = DEFAULT_SIZE, threads: int = 2, runs: int = 5, warmup: int = 1) -> dict:
    """Operations per second of `gemm_model` in ONNX Runtime (CPU, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(gemm_model(precision, n), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((n, n)).astype(np.float32) if precision == "fp32"
         else rng.integers(0, 256, (n, n), dtype=np.uint8))
    timed = run_alternating({"gemm": lambda: session.run(None, {"a": a})}, runs, warmup)["gemm"]
    return _rate(timed.seconds, n, f"onnxruntime {'MatMul' if precision == 'fp32' else 'MatMulInteger u8s8'}")


def torch_mm_peak(n: int = DEFAULT_SIZE, threads: int = 2, runs: int = 5, warmup: int = 1) -> dict:
    """Operations per second of an fp32 torch.mm at ``threads`` torch threads (torch is imported here only)."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    timed = run_alternating({"mm": lambda: torch.mm(a, b)}, runs, warmup)["mm"]
    return _rate(timed.seconds, n, "torch.mm")


def measure_peaks(n: int = DEFAULT_SIZE, threads: int = 2, runs: int = 5) -> dict:
    """{"fp32": the better of ORT MatMul and torch.mm, "int8": ORT MatMulInteger, "all": every measurement};
    ops/s in ``ops_per_s`` (FLOP/s for fp32, integer OP/s for int8)."""
    fp32 = [ort_gemm_peak("fp32", n, threads, runs), torch_mm_peak(n, threads, runs)]
    int8 = ort_gemm_peak("int8", n, threads, runs)
    return {"fp32": max(fp32, key=lambda r: r["ops_per_s"]), "int8": int8, "all": [*fp32, int8]}
