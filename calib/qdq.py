"""Q/DQ quantization of a prepared float graph on calibrated ranges: INT8 with ONNX Runtime's quantizer, FP8 with
`calib.graph.qdq_fp8`. Used on the whole stage (`calib.quantize`) and, for a block pass whose next blocks
calibrate on the quantized outputs, on one block (`calib.blockwise`).

Memory: FP8 reads one weight at a time. ONNX Runtime's quantizer loads the whole graph with its weights (and
copies them), so INT8 with ``by_block`` runs it on one segment at a time (`calib.partition`: prologue, each
block, epilogue) and stitches the quantized segments back together (`stitch`): a Wan2.2-5B DiT's 20 GB of fp32
weights are then never in memory at once, only one block's and the int8 result's, nor copied on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo

from metacanvas_deploy.calib.graph import external_data, qdq_fp8, save_model
from metacanvas_deploy.calib.partition import extract, partition, segment_model
from metacanvas_deploy.calib.progress import Progress
from metacanvas_deploy.calib.ranges import method
from metacanvas_deploy.calib.recipes import Recipe


def quantize_model(prepared: Path, out: Path, recipe: Recipe, nodes: list[str], ranges_cache: Path,
                   by_block: bool = False, log: Callable[[str], None] | None = None, label: str = "quantize") -> None:
    """QDQ-quantize ``nodes`` of ``prepared`` into ``out`` with the calibrated ranges of ``ranges_cache``: INT8
    with ONNX Runtime's quantizer (``by_block``: one segment of the recipe's ``block_pattern`` at a time), FP8
    with `calib.graph.qdq_fp8` (per-tensor amax, as TensorRT calibrates). ``log``: progress in layers quantized,
    as ``label: 40% (120 of 300), ...`` (per layer for FP8, per segment for INT8 by block, at the end otherwise)."""
    from onnxruntime.quantization import load_tensors_data

    progress = Progress(f"{label} (layers)", len(nodes), log, unit_bytes=False)
    if recipe.format == "fp8":  # the weights read one layer at a time: only the FP8 copies are held
        ranges = load_tensors_data(str(ranges_cache)).data
        model = onnx.load(str(prepared), load_external_data=False)
        by_name = {n.name: n for n in model.graph.node}
        amax = {by_name[n].input[0]: max(abs(float(v)) for v in ranges[by_name[n].input[0]].range_value)
                for n in nodes}
        base = Path(prepared).parent
        save_model(qdq_fp8(model, nodes, amax, base_dir=base, done=progress.update), out, base_dir=base)
    elif by_block:
        _int8_by_block(prepared, out, recipe, nodes, ranges_cache, progress.update)
    else:
        _int8(prepared, out, recipe, nodes, ranges_cache)
        progress.update(len(nodes))
    progress.close()


def _int8(prepared: Path, out: Path, recipe: Recipe, nodes: list[str], ranges_cache: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(prepared), str(out), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Conv", "Gemm"], nodes_to_quantize=nodes,
        per_channel=recipe.per_channel_weights, reduce_range=recipe.reduce_range,
        # uint8 activations, int8 weights: the pair ONNX Runtime's CPU integer kernels are fast with
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method(recipe),
        calibration_cache_path=str(ranges_cache), use_external_data_format=_external(prepared),
        extra_options={"MatMulConstBOnly": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})


def _external(path: Path) -> bool:
    """Whether the model at ``path`` keeps weights in external data (its own ``.data`` or, prepared without
    loading, its raw export's)."""
    if external_data(path) is not None:
        return True
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)


def _int8_by_block(prepared: Path, out: Path, recipe: Recipe, nodes: list[str], ranges_cache: Path,
                   done: Callable[[int], None] = lambda n: None) -> None:
    """`_int8` one segment at a time: each segment with quantizable layers is written beside ``out`` with a copy
    of its weights, quantized on its own (the same ranges, so the same scales) and its float copy removed; the
    others stay as they are, their weights in ``prepared``'s data. Then `stitch`, and the result's weights read
    one at a time from both folders: ``prepared``'s (a float bundle's) is only read, and the disk holds the
    quantized segments and one float block beside the result, never a second float stage. ``done(n)`` after each
    segment's ``n`` layers."""
    prepared, out = Path(prepared), Path(out)
    model = onnx.load(str(prepared), load_external_data=False)
    wanted = set(nodes)
    folders = dict.fromkeys(_locations(model), prepared.parent)  # external data file -> its folder
    pieces, written = [], []
    try:
        for k, seg in enumerate(partition(model.graph, recipe.block_pattern)):
            layers = [n.name for n in model.graph.node[seg.start:seg.stop] if n.name in wanted]
            if not layers:  # (an empty list would mean "every node" to ONNX Runtime's quantizer)
                if seg.stop > seg.start:
                    pieces.append(segment_model(model, seg))
                continue
            path, quantized = out.with_name(f"{out.stem}.block{k:03d}.onnx"), out.with_name(
                f"{out.stem}.block{k:03d}.qdq.onnx")
            written += [path, quantized]
            extract(model, seg, path, prepared.parent)
            _int8(path, quantized, recipe, layers, ranges_cache)
            _remove(path)
            piece = onnx.load(str(quantized), load_external_data=False)
            folders.update(dict.fromkeys(_locations(piece), out.parent))
            pieces.append(piece)
            done(len(layers))
        save_model(stitch(model, pieces), out, base_dir=folders)
    finally:
        for p in written:
            _remove(p)


def _locations(model: onnx.ModelProto) -> set[str]:
    return {ExternalDataInfo(t).location for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def stitch(model: onnx.ModelProto, pieces: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One graph from ``model``'s segments, each as a model of its own (``pieces``, in order), quantized or not:
    their nodes in order, with ``model``'s inputs and outputs. A tensor read in several segments (a side input
    such as the text states) gets the same Q/DQ pair in each, from the same range: the first is kept and the
    others dropped, as the whole-graph quantizer shares one pair. Initializers keep their external data
    locations (each piece's own file, or ``model``'s), all relative to one folder."""
    nodes, inits, infos = [], {}, {}
    producer: dict[str, onnx.NodeProto] = {}
    for piece in pieces:
        g = piece.graph
        for node in g.node:
            seen = [producer[o] for o in node.output if o in producer]
            if seen:
                if any(not _same(node, s) for s in seen):
                    raise ValueError(f"segments disagree on how tensor {node.output[0]!r} is computed")
                continue
            producer.update((o, node) for o in node.output)
            nodes.append(node)
        for t in g.initializer:
            inits.setdefault(t.name, t)
        for v in g.value_info:
            infos.setdefault(v.name, v)
    opsets: dict[str, int] = {}
    for piece in (model, *pieces):
        for op in piece.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    used = {i for n in nodes for i in n.input}
    g = model.graph
    graph = onnx.helper.make_graph(nodes, g.name, list(g.input), list(g.output),
                                   [t for name, t in inits.items() if name in used],
                                   value_info=[v for name, v in infos.items() if name not in
                                               {*(i.name for i in g.input), *(o.name for o in g.output)}])
    out = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
                                 ir_version=max(p.ir_version for p in (model, *pieces)))
    out.functions.extend(model.functions)
    return out


def _same(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    return (a.op_type, a.domain, list(a.input), list(a.output)) == (b.op_type, b.domain, list(b.input),
                                                                    list(b.output)) and a.attribute == b.attribute
