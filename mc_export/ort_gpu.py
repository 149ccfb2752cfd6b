"""`--target onnxruntime-gpu`: the stage graphs ONNX Runtime's CUDA execution provider runs, prepared and gated on
the GPU machine the build runs on (`runtime.ort_cuda` runs them).

fp32: the raw export, optimised offline (`calib.graph.optimize_for_ort`) with the CUDA provider assigned, so the
fusions saved are the ones ONNX Runtime makes for CUDA (an offline pass on the CPU provider can leave CPU-only
fused ops, which would run on the host between device kernels and break CUDA-graph capture).

fp16 (`to_fp16`): ONNX Runtime's own converter (`onnxruntime.transformers.float16`) rewrites the graph's core to
float16, weights and math, while three kinds of node stay float32:
- the **prologue**, every node no weight layer depends on: the timestep's sinusoidal embedding (``sin(t * f)``
  with t up to 1000 has no correct digit left in fp16), RoPE tables, masks, position arithmetic;
- the **epilogue**, every node no weight layer comes after: the CFG combine and the scheduler update, so the
  latents carried from step to step keep float32 (diffusers' fp16 pipelines upcast the scheduler step too);
- **normalisation statistics** (`_STAT_OPS`): a mean of squares overflows fp16's 65504 once activations pass 256,
  which DiT hidden states do.
A weight layer is a MatMul / Gemm / Conv / Gather reading an initializer (weight transposes folded first,
`calib.graph.fold_weight_transposes`). The graph's inputs and outputs keep float32 (``keep_io_types``), so the manifest's tensors, the
runtime's buffers and the step loop are the fp32 bundle's. The gate holds the stage to fp16's rounding
(`mc_export.tensorrt.precision.GATE_TOLERANCE`, as for TensorRT's fp16 engines) and runs on the CUDA provider.

bf16 is not offered: ONNX Runtime's CUDA provider lacks bf16 kernels for several ops the graphs use (TensorRT
builds bf16: `--target tensorrt`). The conversion holds the stage in memory (the GPU machine's, not this one's).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import onnx

from metacanvas_deploy.calib.graph import fold_weight_transposes, optimize_for_ort, save_model

WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")
_STAT_OPS = ("Pow", "ReduceMean", "ReduceSumSquare", "Sqrt", "Reciprocal")
CUDA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def weight_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes that read a float (or fp16) initializer as a weight (any input but the first for MatMul/Gemm/
    Conv, the table of a Gather)."""
    kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    floats = {t.name for t in graph.initializer if t.data_type in kinds and len(t.dims) >= 2}
    out = set()
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        slots = node.input[:1] if node.op_type == "Gather" else node.input[1:]
        if any(name in floats for name in slots):
            out.add(node.name)
    return out


def float32_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes `to_fp16` keeps in float32: prologue, epilogue and normalisation statistics (module docstring)."""
    producers = {o: n.name for n in graph.node for o in n.output}
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.name)
    by_name = {n.name: n for n in graph.node}
    weights = weight_nodes(graph)

    def reach(start: set[str], step) -> set[str]:
        seen, todo = set(start), list(start)
        while todo:
            for nxt in step(by_name[todo.pop()]):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    after = reach(weights, lambda n: [c for o in n.output for c in consumers.get(o, ())])
    before = reach(weights, lambda n: [producers[i] for i in n.input if i in producers])
    core = after & before
    return [n.name for n in graph.node if n.name not in core or n.op_type in _STAT_OPS]


def to_fp16(src: Path, dst: Path) -> None:
    """The fp32 graph at ``src`` -> a mixed fp16 graph at ``dst`` (module docstring), its I/O float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from metacanvas_deploy.mc_export.tensorrt.builder import lower_sequences

    model = onnx.load(str(src))
    lower_sequences(model)  # the converter types tensors, not sequences (SANA's split/chunk export as sequences)
    fold_weight_transposes(model)  # MatMul(x, Transpose(W)) -> MatMul(x, W.T): the weight layer reads W itself
    for i, node in enumerate(model.graph.node):  # the block list is by name: give every node one
        node.name = node.name or f"_unnamed_{i}"
    keep = float32_nodes(model.graph)
    # the converter places its casts by the value types shape inference finds (for every intermediate tensor);
    # ONNX's in-memory inference stops at protobuf's 2 GB, the file-based one does not
    if model.ByteSize() < 2**31 - 2**20:
        model = onnx.shape_inference.infer_shapes(model)
    else:
        named = Path(dst).with_name(Path(dst).name + ".named.onnx")
        save_model(model, named)
        onnx.shape_inference.infer_shapes_path(str(named), str(named))
        model = onnx.load(str(named))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                    node_block_list=keep, disable_shape_infer=True)
    save_model(half, dst)


def prepare(raw: Path, final: Path, precision: str, scratch: Path,
            providers: tuple[str, ...] = CUDA_PROVIDERS) -> None:
    """The raw export -> the bundle's file for ONNX Runtime's CUDA provider (fp16 converted first), optimised
    with ``providers`` assigned (the CUDA provider's; tests on a CPU pass the CPU provider's)."""
    src = raw
    if precision == "fp16":
        src = Path(scratch) / f"{raw.stem}.fp16.onnx"
        to_fp16(raw, src)
    optimize_for_ort(src, final, providers=providers)


def cuda_runner(path: Path, entry, device: str = "cuda"):
    """The gate's engine: the stage on ONNX Runtime's CUDA provider (``device="cpu"``: the same session class on
    the CPU provider, for tests on a machine without a GPU)."""
    from metacanvas_deploy.runtime.ort_cuda import OrtCudaEngine

    return OrtCudaEngine(path, entry, device=device)
