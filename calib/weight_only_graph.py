"""Weight-only graph rewrite, on onnx-ir graphs, one weight at a time (`calib.weight_only` holds the arithmetic).

The same function serves two callers, so that their files are identical:
- the lazy export (`mc_export.export.onnx_export`): every weight is still a `LazyTensor` that reads its checkpoint
  tensor when the file is written; the quantized tensors here are lazy too, computed from it then. A stage's fp32
  graph never exists, on disk or in memory: at most one layer's fp32 weight and its codes are held at a time.
- a float raw export on disk (`rewrite_file`): `onnx_ir.load` maps its external data, so the same holds.

Forms: ``"matmulnbits"`` (ONNX Runtime: `com.microsoft.MatMulNBits`, embedding tables `GatherBlockQuantized`) and
``"dequantize"`` (TensorRT: opset-21 blocked `DequantizeLinear` on the weight, the MatMul unchanged).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metacanvas_deploy.calib import weight_only as wo
from metacanvas_deploy.calib.errors import RecipeError

FORMS = ("matmulnbits", "dequantize")
MS_DOMAIN = "com.microsoft"
DQ_OPSET = 21  # blocked DequantizeLinear (block_size attribute), int4 types
_TRANSPOSED = ".T"


@dataclass
class Rewritten:
    """What a rewrite did: weight name -> bits of each quantized layer, the float layers the choice kept,
    the embedding tables quantized."""

    layers: dict[str, int] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)
    embeddings: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"layers": dict(self.layers), "kept_float": list(self.kept_float), "embeddings": dict(self.embeddings)}


def layer_name(node, weight) -> str:
    """The module path of a weight layer (`.T` stripped; the exporter's folded `val_N` named by the node's scope),
    as `calib.graph.weight_layers` names it."""
    name = weight.name.removesuffix(_TRANSPOSED)
    if not name.endswith(".weight"):
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
        scopes = ast.literal_eval(scopes) if scopes else []
        if len(scopes) >= 2 and scopes[-2]:
            name = f"{scopes[-2]}.weight"
    return name


def _float_2d(value) -> bool:
    import onnx_ir as ir

    return (value is not None and value.is_initializer() and value.const_value is not None
            and value.const_value.dtype == ir.DataType.FLOAT and len(value.const_value.shape) == 2)


def weight_nodes(graph) -> tuple[list, list]:
    """(MatMul nodes whose B is a 2-D float initializer, Gather nodes on axis 0 of a 2-D float `*.weight`
    initializer: embedding tables)."""
    matmuls = [n for n in graph if n.op_type == "MatMul" and n.domain == "" and _float_2d(n.inputs[1])]
    gathers = [n for n in graph if n.op_type == "Gather" and n.domain == "" and _float_2d(n.inputs[0])
               and n.inputs[0].name.endswith(".weight")
               and (n.attributes["axis"].as_int() if "axis" in n.attributes else 0) == 0]
    return matmuls, gathers


class _Shared:
    """One layer's quantized tensors, computed once from its weight when the first of them is written and
    dropped after the last: the writer holds one layer's codes at a time."""

    def __init__(self, make: Callable[[], dict[str, np.ndarray]], uses: int):
        import threading

        self.make, self.uses, self.value = make, uses, None
        self.lock = threading.Lock()  # onnx-ir may write external tensors from several threads

    def take(self, key: str) -> np.ndarray:
        with self.lock:
            if self.value is None:
                self.value = self.make()
            out = self.value[key]
            self.uses -= 1
            if self.uses <= 0:
                self.value, self.uses = None, 0
            return out


def _lazy_initializers(graph, prefix: str, shared: _Shared, shapes: dict[str, tuple[tuple, object]]) -> dict:
    """Register one lazy initializer per key of ``shapes`` (key -> (shape, ir dtype)); returns key -> ir.Value.
    A weight read by several layers (the planner's base weights serve the prompt and, under LoRA, the canvas)
    is quantized once: its initializers are reused."""
    import onnx_ir as ir

    if f"{prefix}.{next(iter(shapes))}" in graph.initializers:
        return {key: graph.initializers[f"{prefix}.{key}"] for key in shapes}
    out = {}
    for key, (shape, dtype) in shapes.items():
        value = ir.Value(name=f"{prefix}.{key}", shape=ir.Shape(shape), type=ir.TensorType(dtype))
        value.const_value = ir.LazyTensor(lambda key=key: ir.tensor(shared.take(key)), dtype=dtype,
                                          shape=ir.Shape(shape), name=value.name)
        graph.register_initializer(value)
        out[key] = value
    return out


def _replace(graph, old, new) -> None:
    """``new`` (one output) takes ``old``'s place and output name; ``old`` leaves the graph."""
    name = old.outputs[0].name
    graph.insert_before(old, new)
    old.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    old.outputs[0].name = None
    graph.remove(old, safe=True)
    new.outputs[0].name = name


def _drop_if_unused(graph, value) -> None:
    if not value.uses() and value.name in graph.initializers and value not in graph.outputs:
        graph.initializers.pop(value.name)


def _matmul(graph, node, spec: wo.BlockSpec, form: str, name: str, scale: np.ndarray | None = None) -> None:
    """Quantize ``node``'s weight in ``form``; with an input-channel ``scale`` (AWQ, `calib.weight_only`), the
    codes are those of ``scale * W`` and a `Mul` by 1 / scale on the input comes first."""
    import onnx_ir as ir

    weight = node.inputs[1]
    k, n = (int(d) for d in weight.const_value.shape)
    wo.check_divisible(name, k, spec.block_size)
    tensor = weight.const_value
    if scale is not None:
        tensor = _Scaled(tensor, scale)
        inverse = graph.initializers.get(f"{weight.name}.awq_inv")
        if inverse is None:
            inverse = ir.Value(name=f"{weight.name}.awq_inv", shape=ir.Shape([k]),
                               type=ir.TensorType(ir.DataType.FLOAT))
            inverse.const_value = ir.tensor((np.float32(1) / scale).astype(np.float32), name=inverse.name)
            graph.register_initializer(inverse)
        mul = ir.node("Mul", [node.inputs[0], inverse], name=f"{node.name or weight.name}.awq")
        graph.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])
    bs, blocks = spec.block_size, k // spec.block_size
    u8 = ir.DataType.UINT8
    if form == "matmulnbits":
        shapes = {"B": ((n, blocks, bs * spec.bits // 8), u8), "scales": ((n * blocks,), ir.DataType.FLOAT)}
        if not spec.symmetric:
            shapes["zero_points"] = ((n * (-(-blocks * spec.bits // 8)),), u8)
        shared = _Shared(lambda: wo.matmul_nbits_tensors(wo.quantize_blocks(tensor.numpy(), spec)), len(shapes))
        inits = _lazy_initializers(graph, f"{weight.name}.q{spec.bits}", shared, shapes)
        new = ir.node("MatMulNBits", [node.inputs[0], *inits.values()], domain=MS_DOMAIN,
                      attributes={"K": k, "N": n, "bits": spec.bits, "block_size": bs},
                      name=f"{node.name or weight.name}.nbits")
        _replace(graph, node, new)
    else:
        code = {(4, True): ir.DataType.INT4, (8, True): ir.DataType.INT8, (4, False): ir.DataType.UINT4,
                (8, False): ir.DataType.UINT8}[(spec.bits, spec.symmetric)]
        shapes = {"x": ((k, n), code), "scale": ((blocks, n), ir.DataType.FLOAT), "zero_point": ((blocks, n), code)}
        shared = _Shared(lambda: wo.dequantize_linear_tensors(wo.quantize_blocks(tensor.numpy(), spec)), 3)
        inits = _lazy_initializers(graph, f"{weight.name}.q{spec.bits}", shared, shapes)
        dq = ir.node("DequantizeLinear", list(inits.values()), attributes={"axis": 0, "block_size": bs},
                     name=f"{weight.name}.dq")
        dq.outputs[0].name = f"{weight.name}.dq"
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
    _drop_if_unused(graph, weight)


class _Scaled:
    """A weight tensor read as ``scale[:, None] * W`` (float32), still lazily."""

    def __init__(self, tensor, scale: np.ndarray):
        self.tensor, self.scale = tensor, np.asarray(scale, np.float32)

    def numpy(self) -> np.ndarray:
        return self.tensor.numpy() * self.scale[:, None]


def _gather(graph, node, spec: wo.BlockSpec) -> None:
    import onnx_ir as ir

    table = node.inputs[0]
    v, d = (int(x) for x in table.const_value.shape)
    wo.check_divisible(table.name, d, spec.block_size)
    tensor = table.const_value
    u8 = ir.DataType.UINT8
    shapes = {"data": ((v, d * spec.bits // 8), u8), "scales": ((v, d // spec.block_size), ir.DataType.FLOAT)}
    if not spec.symmetric:
        shapes["zero_points"] = ((v, -(-(d // spec.block_size) * spec.bits // 8)), u8)
    shared = _Shared(lambda: wo.gather_block_tensors(tensor.numpy(), spec), len(shapes))
    inits = _lazy_initializers(graph, f"{table.name}.q{spec.bits}", shared, shapes)
    ins = [inits["data"], node.inputs[1], inits["scales"], *([inits["zero_points"]] if not spec.symmetric else [])]
    new = ir.node("GatherBlockQuantized", ins, domain=MS_DOMAIN, name=f"{node.name or table.name}.q{spec.bits}",
                  attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": spec.block_size, "bits": spec.bits})
    _replace(graph, node, new)
    _drop_if_unused(graph, table)


def fold_transposes(graph) -> int:
    """Each `Transpose` of a 2-D float initializer becomes the initializer ``W.T`` (lazy: transposed when
    written), as the lazy export and `calib.graph.fold_weight_transposes` fold them. Returns how many."""
    import onnx_ir as ir

    folded = 0
    for node in [n for n in graph if n.op_type == "Transpose" and n.domain == "" and _float_2d(n.inputs[0])]:
        weight = node.inputs[0]
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else (1, 0)
        if perm != (1, 0):
            continue
        tensor = weight.const_value
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        name = weight.name + _TRANSPOSED
        if name in graph.initializers:
            node.outputs[0].replace_all_uses_with(graph.initializers[name], replace_graph_outputs=True)
        else:
            value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
            value.const_value = ir.LazyTensor(
                lambda tensor=tensor: ir.tensor(np.ascontiguousarray(tensor.numpy().T)), dtype=ir.DataType.FLOAT,
                shape=ir.Shape(shape), name=name)
            graph.register_initializer(value)
            node.outputs[0].replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        _drop_if_unused(graph, weight)
        folded += 1
    return folded


def rewrite(model, choose: Callable[[str], wo.BlockSpec | None], form: str = "matmulnbits",
            embeddings: wo.BlockSpec | None = None, scales: dict[str, np.ndarray] | None = None) -> Rewritten:
    """Rewrite ``model`` (an onnx-ir Model) in place: every weight MatMul whose weight name ``choose`` maps to a
    BlockSpec is quantized in ``form``; None keeps it float. ``embeddings``: embedding tables too (ONNX Runtime's
    form only). ``scales``: layer name -> AWQ input-channel scale (`calib.weight_only.awq_scale`). Lazy: no
    weight is read here."""
    if form not in FORMS:
        raise RecipeError(f"weight-only form must be one of {FORMS}, got {form!r}")
    graph = model.graph
    fold_transposes(graph)
    matmuls, gathers = weight_nodes(graph)
    done = Rewritten()
    for node in matmuls:
        name = layer_name(node, node.inputs[1])
        spec = choose(name)
        if spec is None:
            done.kept_float.append(name)
            continue
        _matmul(graph, node, spec, form, name, (scales or {}).get(name))
        done.layers[name] = spec.bits
    if embeddings is not None and form == "matmulnbits":
        for node in gathers:
            done.embeddings[node.inputs[0].name] = embeddings.bits
            _gather(graph, node, embeddings)
    opsets = graph.opset_imports
    if form == "dequantize" and done.layers:
        opsets[""] = max(opsets.get("", DQ_OPSET), DQ_OPSET)
    elif done.layers or done.embeddings:
        opsets[MS_DOMAIN] = 1
    return done


def candidates(path: Path) -> dict[str, tuple[int, ...]]:
    """Weight name -> weight shape (K, N) of every weight MatMul of the ONNX file at ``path`` (weights not read)."""
    import onnx_ir as ir

    model = ir.load(str(path))
    fold_transposes(model.graph)
    return {layer_name(n, n.inputs[1]): tuple(int(d) for d in n.inputs[1].const_value.shape)
            for n in weight_nodes(model.graph)[0]}


def save(model, path: Path) -> None:
    """Write an onnx-ir model; weights past `calib.graph.EXTERNAL_DATA_BYTES` to ``<path>.data``, each tensor
    aligned for memory mapping (as the exporter writes them)."""
    from metacanvas_deploy.calib import graph as calib_graph
    from metacanvas_deploy.calib.external_data import IR_SAVE_ALIGNED, check_aligned, ir_save

    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > calib_graph.EXTERNAL_DATA_BYTES:
        ir_save(model, path, external_data=data.name, **IR_SAVE_ALIGNED)
        check_aligned(path)
    else:
        ir_save(model, path)


def rewrite_file(src: Path, dst: Path, choose: Callable[[str], wo.BlockSpec | None], form: str = "matmulnbits",
                 embeddings: wo.BlockSpec | None = None, scales: dict[str, np.ndarray] | None = None) -> Rewritten:
    """`rewrite` a float ONNX file into ``dst`` (weights read from ``src``'s mapped data one at a time)."""
    import onnx_ir as ir

    model = ir.load(str(src))
    done = rewrite(model, choose, form, embeddings, scales)
    save(model, dst)
    return done
