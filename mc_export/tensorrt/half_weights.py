"""The ONNX file a TensorRT export ships: sequences lowered (`builder.lower_sequences`) and, for fp16/bf16, the
weights stored in 16 bits (half the bytes to copy to the GPU machine and for TensorRT to read).

What is converted: a float32 initializer of two or more dims whose every use is a weight slot (MatMul/Gemm
operands, Conv/ConvTranspose kernels, Gather tables), directly or through ops that only move values (Transpose,
Reshape...). Everything else stays float32: normalisation scales and biases, every bias and scalar (SANA's
`+ 1e-15` is 0 in fp16), position and coefficient tables, integer tensors. Each converted weight ``W`` becomes an
initializer ``W_fp16`` (or ``_bf16``), its value ``W`` rounded to nearest even, read by one ``Cast(to=FLOAT)`` node
whose output is named ``W``: every other node, the graph's inputs and outputs and their types are unchanged, so
ONNX Runtime runs the file on a CPU (the export's own gate) and the engine's I/O is the manifest's. A weight with
a value the 16-bit type cannot hold (inf, NaN, or past fp16's 65504) is refused by name when it is written.

The conversion runs on the exported onnx-ir model before it is written (`store_weights`, the exporter's
``graph_transform``): each 16-bit tensor is lazy, computed from its float32 tensor (itself read from the
checkpoint, for a lazy export) when the file is written, one tensor in memory at a time. A stage's float32 graph
is never written: FLUX.1's 12B DiT exports as 24 GB, not 48 GB of float32 and then the 24 GB copy.

Why weights only, with the math left to TensorRT: our builder makes fp16/bf16 engines as weakly typed networks
with the FP16/BF16 builder flag (`precision.RULES`); there the graph's float32 types are not binding and TensorRT
chooses half-precision kernels itself, folding each ``Cast`` of a constant into the weights. A strongly typed
network (TensorRT's only mode from 11.0; weak typing is deprecated since 10.12) takes every type from the graph
and would compute these layers in float32: it needs a mixed-precision graph (casts around the layers that run in
16 bits) instead, which this package does not write yet. Nothing here has run on a GPU.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto

from metacanvas_deploy.mc_export.errors import ExportError
from metacanvas_deploy.mc_export.tensorrt.builder import lower_sequences

# precision -> (numpy type, ONNX type, name suffix, largest finite value)
HALF = {"fp16": (np.dtype(np.float16), TensorProto.FLOAT16, "_fp16", 65504.0),
        "bf16": (np.dtype(ml_dtypes.bfloat16), TensorProto.BFLOAT16, "_bf16", float(ml_dtypes.finfo(
            ml_dtypes.bfloat16).max))}
WEIGHT_SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,)}
MOVES_VALUES = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")  # no arithmetic
SHAPE_ONLY = ("Shape", "Size")  # read the shape, not the values


def store_weights(model, precision: str) -> dict:
    """Convert the weights of the onnx-ir ``model`` (not yet written; weights maybe lazy) for ``precision``, in
    place (see the module doc); initializers no node reads are dropped (nothing should copy them to the GPU
    machine). Returns the weights record for the export's index."""
    import onnx_ir as ir

    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(name)
    uses = defaultdict(list)  # value name -> [(op type, input index, first output's name)]
    for node in graph:
        for i, value in enumerate(node.inputs):
            if value is not None:
                uses[value.name].append((node.op_type, i, node.outputs[0].name if node.outputs else ""))
    floats = [n for n, v in graph.initializers.items()
              if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and len(v.shape) >= 2]
    chosen = _weights_only(floats, uses, {o.name for o in graph.outputs}) if precision in HALF else []
    before = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    record = {"dtype": HALF[precision][0].name if precision in HALF else "float32", "converted": len(chosen),
              "kept_float32": len(floats) - len(chosen), "bytes_before": before, "bytes_after": before}
    if not chosen:
        return record
    _, onnx_type, suffix, _ = HALF[precision]
    half_type = ir.DataType(onnx_type)
    taken = set(uses) | set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    clash = sorted(n + suffix for n in chosen if n + suffix in taken)
    if clash:
        raise ExportError(f"cannot store weights in 16 bits: the graph already uses the names {clash[:5]}")
    casts = []
    for name in chosen:
        value = graph.initializers.pop(name)
        source, shape = value.const_value, ir.Shape(value.const_value.shape)
        half = ir.Value(name=name + suffix, shape=shape, type=ir.TensorType(half_type))
        half.const_value = ir.LazyTensor(lambda source=source, name=name: ir.tensor(_rounded(source, name, precision)),
                                         dtype=half_type, shape=shape, name=half.name)
        graph.register_initializer(half)
        cast = ir.node("Cast", [half], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_to_float")
        value.replace_all_uses_with(cast.outputs[0], replace_graph_outputs=True)
        value.const_value = None  # renaming a value renames its tensor: ``source`` keeps its name
        value.name = None
        cast.outputs[0].name = name
        casts.append(cast)
        record["bytes_after"] -= source.nbytes - half.const_value.nbytes
    graph.insert_before(graph.node(0), casts)  # first: the graph stays topologically sorted
    return record


def finish_graph(path: Path) -> None:
    """Lower ``path``'s sequence ops for TensorRT, in place (the graph only: its weights' file is not touched)."""
    model = onnx.load(str(path), load_external_data=False)
    if lower_sequences(model):
        _drop_unused(model)
        onnx.save_model(model, str(path))


def _weights_only(names: list[str], uses: dict, graph_outputs: set[str]) -> list[str]:
    """Those of ``names`` read only as weights, directly or through ops that move values (shape reads aside), at
    least once. ``uses``: value name -> [(op type, input index, the node's first output)]."""

    def feeds_weights_only(name: str, depth: int = 0) -> tuple[bool, bool]:
        """(every use is a weight slot or shape-only, at least one is a weight slot)"""
        if name in graph_outputs or depth > 8:
            return False, False
        ok, any_weight = True, False
        for op, i, output in uses.get(name, ()):
            if op in WEIGHT_SLOTS and i in WEIGHT_SLOTS[op]:
                any_weight = True
            elif op in MOVES_VALUES and i == 0:
                sub_ok, sub_weight = feeds_weights_only(output, depth + 1)
                ok, any_weight = ok and sub_ok, any_weight or sub_weight
            elif op not in SHAPE_ONLY:
                ok = False
        return ok, any_weight

    return [n for n in names if all(feeds_weights_only(n))]


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove initializers and Constant nodes no node reads (lowering sequences frees their sizes and positions):
    ONNX Runtime drops them at load time with a warning each, and nothing should copy them to the GPU machine."""
    used = _read_names(model.graph) | {o.name for o in model.graph.output}
    nodes = [n for n in model.graph.node if n.op_type != "Constant" or n.output[0] in used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs (If/Loop/Scan bodies read outer names) reads."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= _read_names(sub)
    return names


def _rounded(source, name: str, precision: str) -> np.ndarray:
    """``source``'s values rounded to nearest even in the 16-bit type; ExportError for one it cannot hold."""
    value = source.numpy()
    np_type, _, _, largest = HALF[precision]
    if not np.isfinite(value).all() or float(np.max(np.abs(value), initial=0.0)) > largest:
        raise ExportError(f"weight {name} holds values {precision} cannot store (non-finite, or past {largest:g}); "
                          f"export it with --precision {'bf16' if precision == 'fp16' else 'fp32'}")
    return value.astype(np_type)
