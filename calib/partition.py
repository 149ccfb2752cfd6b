"""A stage graph cut at its transformer blocks: a prologue, one segment per block, an epilogue
(`calib.blockwise` calibrates them in order, one segment's weights in memory at a time).

Which nodes belong to which block is read from the exporter: torch.onnx (dynamo) records each node's module path
in its ``pkg.torch.onnx.name_scopes`` metadata (``['', 'transformer', 'transformer.blocks.3', ...]``); the
TorchScript exporter names nodes after it (``/transformer/blocks.3/attn1/...``). The recipe's ``block_pattern``
(a regex the backbone registry supplies: calibration knows no backbone) matches the block's module path in full.

The graph's node list is topologically sorted, so the cut is positional: segment k runs from the first node of
block k to the node before the first node of block k+1 (unscoped helper nodes the exporter placed between them
go with it); the prologue is everything before block 0, the epilogue everything after the last block node.
Whatever a segment consumes and does not produce is an input of its own graph: the hidden state from the
previous segment (the boundary), the side tensors (timestep embedding, rotary tables, text states) from the
prologue, and the stage's own inputs. Running the segments in order on those inputs is running the graph.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from metacanvas_deploy.calib.errors import RecipeError

_SCOPES = "pkg.torch.onnx.name_scopes"
_SMALL = 1024  # elements: shapes, axes and scalars keep their values for shape inference


@dataclass(frozen=True)
class Segment:
    """One contiguous run of the graph's nodes: ``nodes`` (indices), the tensors it takes from outside
    (``inputs``) and hands to later segments or the stage's outputs (``outputs``)."""

    name: str  # "prologue", a block's module path, "epilogue"
    start: int
    stop: int  # nodes[start:stop]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    initializers: tuple[str, ...]


def module_paths(node: onnx.NodeProto) -> list[str]:
    """The module paths enclosing ``node``, outermost first: from the dynamo exporter's name scopes, or from a
    TorchScript-style node name (``/transformer/blocks.3/attn1/MatMul`` -> transformer, transformer.blocks.3,
    ...)."""
    scopes = next((p.value for p in node.metadata_props if p.key == _SCOPES), None)
    if scopes:
        return [s for s in ast.literal_eval(scopes) if s]
    if node.name.startswith("/"):
        parts = [p for p in node.name.split("/")[1:-1] if p]
        return [".".join(parts[: i + 1]) for i in range(len(parts))]
    return []


def block_of(node: onnx.NodeProto, pattern: re.Pattern) -> str | None:
    """The block module path ``node`` belongs to (the innermost enclosing path ``pattern`` matches in full)."""
    return next((p for p in reversed(module_paths(node)) if pattern.fullmatch(p)), None)


def partition(graph: onnx.GraphProto, block_pattern: str, what: str = "graph") -> list[Segment]:
    """Cut ``graph`` into the prologue, one segment per block ``block_pattern`` matches, and the epilogue.
    RecipeError when the pattern matches no block, or when blocks interleave (a node of block k after the first
    node of block k+1: then no cut between them exists; calibrate whole)."""
    pattern = re.compile(block_pattern)
    owner = [block_of(n, pattern) for n in graph.node]
    blocks = list(dict.fromkeys(b for b in owner if b))
    if not blocks:
        raise RecipeError(f"block_pattern {block_pattern!r} names no block of the {what} (its module paths: "
                          f"{_sample_paths(graph)}); fix the recipe's block_pattern or set calibration_pass 'whole'")
    first = {b: owner.index(b) for b in blocks}
    last_node = max(i for i, b in enumerate(owner) if b)
    starts = [0, *(first[b] for b in blocks), last_node + 1]
    for k, b in enumerate(blocks):
        stray = [i for i, o in enumerate(owner) if o == b and not starts[k + 1] <= i < starts[k + 2]]
        if stray:
            raise RecipeError(f"the {what} interleaves block {b} with its neighbours (node "
                              f"{graph.node[stray[0]].name!r}): it cannot be cut between blocks; set "
                              "calibration_pass 'whole' in the recipe")
    names = ["prologue", *blocks, "epilogue"]
    return _segments(graph, names, starts + [len(graph.node)])


def _segments(graph: onnx.GraphProto, names: list[str], bounds: list[int]) -> list[Segment]:
    inits = {t.name for t in graph.initializer}
    stage_inputs = {i.name for i in graph.input}
    produced_in: dict[str, int] = {}
    consumed_by: dict[str, set[int]] = {}
    for k in range(len(names)):
        for node in graph.node[bounds[k]:bounds[k + 1]]:
            for t in _node_inputs(node):
                consumed_by.setdefault(t, set()).add(k)
            for t in node.output:
                if t:
                    produced_in[t] = k
    finals = {o.name for o in graph.output}
    out = []
    for k, name in enumerate(names):
        nodes = graph.node[bounds[k]:bounds[k + 1]]
        used = list(dict.fromkeys(t for n in nodes for t in _node_inputs(n)))
        inputs = tuple(t for t in used if t not in inits and (t in stage_inputs or produced_in.get(t, k) < k))
        outputs = tuple(t for n in nodes for t in n.output if t and (t in finals or any(
            c > k for c in consumed_by.get(t, ()))))
        out.append(Segment(name, bounds[k], bounds[k + 1], inputs, outputs, tuple(t for t in used if t in inits)))
    return out


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors ``node`` reads, those its subgraphs (If/Loop bodies) read from outside included."""
    names = [t for t in node.input if t]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names += [t for n in g.node for t in _node_inputs(n) if t not in inner]
    return names


def _sample_paths(graph: onnx.GraphProto, limit: int = 6) -> str:
    paths = list(dict.fromkeys(p for n in graph.node for p in module_paths(n)[1:3]))
    return ", ".join(paths[:limit]) + (", ..." if len(paths) > limit else "") if paths else "none recorded"


def segment_model(model: onnx.ModelProto, segment: Segment) -> onnx.ModelProto:
    """``segment`` of ``model`` as a model of its own. Its initializers are copies of ``model``'s: tensors that
    live in external data keep their locations (relative to ``model``'s folder), no bytes are read."""
    g = model.graph
    types = {v.name: v for v in (*g.value_info, *g.input, *g.output)}
    missing = [t for t in (*segment.inputs, *segment.outputs) if t not in types]
    if missing:  # the exporter annotates nearly every tensor; `annotate` adds the rest once per pass
        annotate(model)
        types.update({v.name: v for v in g.value_info})
    nodes = g.node[segment.start:segment.stop]
    inits = set(segment.initializers)
    inner = {t for n in nodes for t in n.output}
    sub = helper.make_graph(
        list(nodes), f"{g.name}.{segment.name}", [_typed(types, t) for t in segment.inputs],
        [_typed(types, t) for t in segment.outputs], [t for t in g.initializer if t.name in inits],
        value_info=[v for v in g.value_info if v.name in inner])
    seg = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    seg.functions.extend(model.functions)
    return seg


def extract(model: onnx.ModelProto, segment: Segment, path: Path, base_dir: Path | None = None) -> None:
    """Write ``segment`` of ``model`` as a model of its own at ``path``, with its weights: a session on it reads
    (or, mapped, pages) that segment's weights only. ``base_dir``: the folder of ``model``'s external data when
    it was loaded without it; the segment's tensors are copied from there into ``<path>.data`` one at a time, so
    ``path`` can be anywhere (the model's own folder, a float bundle's, is only read)."""
    from metacanvas_deploy.calib.graph import save_model

    save_model(segment_model(model, segment), path, base_dir)


def annotate(model: onnx.ModelProto) -> None:
    """Add the types shape inference finds to ``model``'s value_info, inferring on a copy without the weights'
    bytes (a segment boundary needs a type; the exporter leaves some tensors unannotated). Small tensors keep
    their values: a Reshape's target shape is one, and without it nothing after the Reshape gets a shape."""
    g = model.graph
    stubs = []
    for t in g.initializer:
        if int(np.prod(t.dims)) <= _SMALL and t.data_location != onnx.TensorProto.EXTERNAL:
            stubs.append(t)
            continue
        stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,  # the bytes are not copied
                                data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="none")
        stubs.append(stub)
    light = helper.make_model(helper.make_graph(list(g.node), g.name, list(g.input), list(g.output), stubs,
                                                value_info=list(g.value_info)),
                              opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.functions.extend(model.functions)
    known = {v.name for v in model.graph.value_info}
    model.graph.value_info.extend(v for v in onnx.shape_inference.infer_shapes(light).graph.value_info
                                  if v.name not in known)


def _typed(types: dict, name: str) -> onnx.ValueInfoProto:
    if name not in types:
        raise RecipeError(f"tensor {name!r} crosses a block boundary without a type the graph records; set "
                          "calibration_pass 'whole' in the recipe")
    v = onnx.ValueInfoProto()
    v.CopyFrom(types[name])
    return v
