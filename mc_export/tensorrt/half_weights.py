"""A raw export -> the ONNX file a TensorRT export ships: sequences lowered (`builder.lower_sequences`) and, for
fp16/bf16, the weights stored in 16 bits (half the bytes to copy to the GPU machine and for TensorRT to read).

What is converted: a float32 initializer of two or more dims whose every use is a weight slot (MatMul/Gemm
operands, Conv/ConvTranspose kernels, Gather tables), directly or through ops that only move values (Transpose,
Reshape...), and whose values all stay finite in the 16-bit type. Everything else stays float32: normalisation
scales and biases, every bias and scalar (SANA's `+ 1e-15` is 0 in fp16), position and coefficient tables,
integer tensors. Each converted weight ``W`` becomes an initializer ``W_fp16`` (or ``_bf16``), its value ``W``
rounded to nearest even, read by one ``Cast(to=FLOAT)`` node whose output is named ``W``: every other node, the
graph's inputs and outputs and their types are unchanged, so ONNX Runtime runs the file on a CPU (the export's
own gate) and the engine's I/O is the manifest's.

Why weights only, with the math left to TensorRT: our builder makes fp16/bf16 engines as weakly typed networks
with the FP16/BF16 builder flag (`precision.RULES`); there the graph's float32 types are not binding and TensorRT
chooses half-precision kernels itself, folding each ``Cast`` of a constant into the weights. A strongly typed
network (TensorRT's only mode from 11.0; weak typing is deprecated since 10.12) takes every type from the graph
and would compute these layers in float32: it needs a mixed-precision graph (casts around the layers that run in
16 bits) instead, which this package does not write yet. Nothing here has run on a GPU.

External data is converted tensor by tensor (one tensor in memory at a time), so a full-size stage converts on a
machine with less memory than its weights.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from metacanvas_deploy.mc_export.errors import ExportError
from metacanvas_deploy.mc_export.tensorrt.builder import lower_sequences

# precision -> (numpy type, ONNX type, name suffix, largest finite value)
HALF = {"fp16": (np.dtype(np.float16), TensorProto.FLOAT16, "_fp16", 65504.0),
        "bf16": (np.dtype(ml_dtypes.bfloat16), TensorProto.BFLOAT16, "_bf16", float(ml_dtypes.finfo(
            ml_dtypes.bfloat16).max))}
WEIGHT_SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,)}
MOVES_VALUES = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")  # no arithmetic
SHAPE_ONLY = ("Shape", "Size")  # read the shape, not the values
MIN_EXTERNAL_BYTES = 1024  # with external data: tensors this large go to <file>.data, as the exporter writes them


def prepare_graph(raw: Path, dst: Path, precision: str) -> dict:
    """Write ``raw`` (an export, maybe with ``<raw>.data``) to ``dst`` as TensorRT will parse it: sequences
    lowered, weights in 16 bits for fp16/bf16. Returns the weights record for the export's index."""
    raw, dst = Path(raw), Path(dst)
    model = onnx.load(str(raw), load_external_data=False)
    lower_sequences(model)
    _drop_unused(model)
    external = any(_is_external(t) for t in model.graph.initializer)
    chosen = set(weight_initializers(model)) if precision in HALF else set()
    data = dst.with_name(dst.name + ".data")
    record = {"dtype": HALF[precision][0].name if precision in HALF else "float32", "converted": 0,
              "kept_float32": 0, "bytes_before": 0, "bytes_after": 0}
    casts = []
    with open(data, "wb") if external else _NoFile() as sink:
        for tensor in model.graph.initializer:
            value = numpy_helper.to_array(tensor, base_dir=str(raw.parent))
            record["bytes_before"] += value.nbytes
            if tensor.name in chosen and _fits(value, precision):
                name = tensor.name
                value = value.astype(HALF[precision][0])
                tensor.CopyFrom(numpy_helper.from_array(value, name + HALF[precision][2]))
                casts.append(helper.make_node("Cast", [tensor.name], [name], name=f"{name}_to_float",
                                              to=TensorProto.FLOAT))
                record["converted"] += 1
            elif tensor.data_type == TensorProto.FLOAT and value.ndim >= 2:
                record["kept_float32"] += 1
            record["bytes_after"] += value.nbytes
            if external:
                _externalise(tensor, value, sink, data.name)
    _check_names(model, casts)
    nodes = casts + list(model.graph.node)  # the casts first: the graph stays topologically sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save_model(model, str(dst))
    if external and data.stat().st_size == 0:
        data.unlink()
    return record


def weight_initializers(model: onnx.ModelProto) -> list[str]:
    """Names of the float32 initializers of two or more dims that only feed weight slots (see the module doc)."""
    uses = defaultdict(list)  # value name -> [(node, input index)]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses[name].append((node, i))
    graph_outputs = {o.name for o in model.graph.output}

    def feeds_weights_only(name: str, depth: int = 0) -> tuple[bool, bool]:
        """(every use is a weight slot or shape-only, at least one is a weight slot)"""
        if name in graph_outputs or depth > 8:
            return False, False
        ok, any_weight = True, False
        for node, i in uses[name]:
            if node.op_type in WEIGHT_SLOTS and i in WEIGHT_SLOTS[node.op_type]:
                any_weight = True
            elif node.op_type in MOVES_VALUES and i == 0:
                sub_ok, sub_weight = feeds_weights_only(node.output[0], depth + 1)
                ok, any_weight = ok and sub_ok, any_weight or sub_weight
            elif node.op_type not in SHAPE_ONLY:
                ok = False
        return ok, any_weight

    return [t.name for t in model.graph.initializer
            if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2 and all(feeds_weights_only(t.name))]


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads (the exporter leaves a few, lowering sequences frees their sizes): ONNX
    Runtime drops them at load time with a warning each, and nothing should copy them to the GPU machine."""
    used = _read_names(model.graph) | {o.name for o in model.graph.output}
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


def _fits(value: np.ndarray, precision: str) -> bool:
    """Every value stays finite in the 16-bit type (an fp16 weight past 65504 would become inf)."""
    return bool(np.isfinite(value).all()) and float(np.max(np.abs(value), initial=0.0)) <= HALF[precision][3]


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _externalise(tensor: onnx.TensorProto, value: np.ndarray, sink, location: str) -> None:
    """Store ``value`` (the tensor's array) in ``sink`` at its end and point the tensor there; small tensors stay
    in the graph."""
    raw = np.ascontiguousarray(value).tobytes()
    tensor.ClearField("external_data")
    tensor.data_location = TensorProto.DEFAULT
    if len(raw) < MIN_EXTERNAL_BYTES:
        tensor.raw_data = raw
        return
    offset = sink.tell()
    sink.write(raw)
    tensor.ClearField("raw_data")
    set_external_data(tensor, location, offset, len(raw))
    tensor.data_location = TensorProto.EXTERNAL


def _check_names(model: onnx.ModelProto, casts: list) -> None:
    """The 16-bit initializers' names are new to the graph."""
    taken = {v for n in model.graph.node for v in (*n.input, *n.output)} | {i.name for i in model.graph.input}
    twice = {name for name, n in Counter(t.name for t in model.graph.initializer).items() if n > 1}
    clash = sorted(({c.input[0] for c in casts} & taken) | twice)
    if clash:
        raise ExportError(f"cannot store weights in 16 bits: the graph already uses the names {clash[:5]}")


class _NoFile:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
