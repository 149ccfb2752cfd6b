"""ONNX graph passes around quantization: naming the weight layers, folding exported weight transposes,
SmoothQuant, reading which kernels a quantized graph runs on; writing graphs past protobuf's 2 GB limit and ONNX
Runtime's offline optimisation (used for float and quantized stages alike)."""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from metacanvas_deploy.calib.external_data import MIN_EXTERNAL_BYTES, realign, save_aligned

TWO_GB = 2**31 - 2**20  # protobuf's hard limit, less a margin for the graph itself
# Layers with a weight: the quantizable ones. Attention's activation x activation MatMuls have no initializer.
WEIGHT_OPS = ("MatMul", "Conv", "Gemm")
# What ONNX Runtime's CPU provider runs integer GEMMs/convolutions with (after its QDQ fusions).
INTEGER_OPS = ("MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "QLinearConv",
               "DynamicQuantizeMatMul", "QGemm")
_TRANSPOSED = ".T"  # suffix of a folded `Transpose(W)` initializer
# Weights past this go to `<file>.data`, as the exporter does. A module value, so that a test can send a tiny
# model down the full-size path.
EXTERNAL_DATA_BYTES = TWO_GB


def external_data(path: Path) -> Path | None:
    """``<path>.data`` if the model at ``path`` keeps its weights there (the naming every writer here uses)."""
    data = Path(path).with_name(Path(path).name + ".data")
    return data if data.exists() else None


def optimize_for_ort(src: Path, dst: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
    """ONNX Runtime's offline graph optimisation (constant folding, fusions) saved to ``dst``; with external data,
    its weights go to ``<dst>.data``, each tensor aligned for memory mapping (`calib.external_data.realign`).

    EXTENDED, not ALL: ALL adds layout transforms for the building machine's CPU, which ORT applies again at
    load time anyway; an EXTENDED file stays valid on any CPU running the same ORT minor release. Prepacking and
    the arena are off: neither changes the saved graph, and prepacking would copy every weight into private
    memory for a session that is only built to be saved. ``providers``: the execution providers the file is
    optimised for (fusions are assigned per provider; `mc_export.ort_gpu` passes the CUDA provider's).
    """
    import onnxruntime as ort

    from metacanvas_deploy.runtime.ort_engine import QUIET

    so = ort.SessionOptions()
    so.log_severity_level = QUIET
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.enable_cpu_mem_arena = False
    so.add_session_config_entry("session.disable_prepacking", "1")
    external = Path(str(src) + ".data").exists()
    if external:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(MIN_EXTERNAL_BYTES))
    ort.InferenceSession(str(src), so, providers=list(providers))
    if external:
        realign(dst)


def save_model(model: onnx.ModelProto, path: Path, base_dir: Path | Mapping[str, Path] | None = None) -> None:
    """Write ``model`` to ``path``, its weights to ``<path>.data`` (each aligned for memory mapping) when they pass
    `EXTERNAL_DATA_BYTES`. (The weights then leave ``model``'s memory.) ``base_dir``: where the external data of a
    graph loaded without its weights lives (those tensors are copied into ``<path>.data`` one at a time;
    `calib.external_data.save_aligned`)."""
    path = Path(path)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    external = onnx.TensorProto.EXTERNAL
    streamed = base_dir is not None and any(t.data_location == external for t in model.graph.initializer)
    if streamed or sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES:
        save_aligned(model, path, base_dir)
    else:
        onnx.save(model, str(path))


def fold_weight_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """torch's exporter writes `linear` as MatMul(x, Transpose(W)). Fold each Transpose of an initializer into a
    new initializer named ``W.T``, so that every weight layer reads its weight directly, under its module path
    (the names recipes and fallback lists use), and the quantizer sees a constant weight. Exact (a copy)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers = Counter(i for n in g.node for i in n.input)
    keep, folded = [], {}
    for node in g.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            name = node.input[0] + _TRANSPOSED
            if name not in folded.values():
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), name))
            folded[node.output[0]] = name
            consumers[node.input[0]] -= 1
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in folded:
                node.input[i] = folded[name]
    del g.node[:]
    g.node.extend(keep)
    unused = {n for n in inits if consumers[n] <= 0 and n not in {o.name for o in g.output}}
    kept = [t for t in g.initializer if t.name not in unused]
    del g.initializer[:]
    g.initializer.extend(kept)
    return model


def has_weight_transposes(model: onnx.ModelProto) -> bool:
    """Whether `fold_weight_transposes` has anything to fold (graph only: no weight is read)."""
    inits = {t.name for t in model.graph.initializer}
    return any(n.op_type == "Transpose" and n.input[0] in inits for n in model.graph.node)


def weight_layers(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> weight name (module path, `.T` stripped) of every layer whose weight is an initializer.

    With onnxscript's optimizer on, the exporter folds `Transpose(W)` itself and names the result `val_N`; the
    node's `pkg.torch.onnx.name_scopes` metadata (the module path, then the op) then gives the module path."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits:
            name = node.input[1].removesuffix(_TRANSPOSED)
            if not name.endswith(".weight"):
                scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
                scopes = ast.literal_eval(scopes) if scopes else []
                if len(scopes) >= 2 and scopes[-2]:
                    name = f"{scopes[-2]}.weight"
            out[node.name] = name
    return out


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def integer_kernels(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each integer-kernel type a (quantized, ORT-optimised) graph holds."""
    counts = op_counts(model)
    return {op: counts[op] for op in INTEGER_OPS if counts[op]}


def smooth(model: onnx.ModelProto, act_absmax: dict[str, np.ndarray], alpha: float) -> list[str]:
    """SmoothQuant on MatMul layers: per input channel j, s_j = max|X_j|^a / max|W_j|^(1-a); the weight rows
    are scaled by s (in place) and the activation divided by s by a new Mul node before the MatMul: the
    product is unchanged, the activation's outliers move into the (per-channel quantized) weight.
    ``act_absmax``: node name -> per-channel max |X| over calibration data. Returns the smoothed node names."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    done, new_nodes = [], []
    for node in g.node:
        if node.op_type == "MatMul" and node.name in act_absmax and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # (K, N)
            a = np.maximum(act_absmax[node.name].astype(np.float32), 1e-5)
            if w.ndim != 2 or a.shape != (w.shape[0],):
                continue
            wmax = np.maximum(np.abs(w).max(axis=1), 1e-5)
            s = (a**alpha / wmax ** (1 - alpha)).astype(np.float32)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], node.input[1]))
            inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{node.name}.smooth_inv")
            g.initializer.append(inv)
            x = node.input[0]
            node.input[0] = f"{node.name}.smoothed_input"
            new_nodes.append((node.name, onnx.helper.make_node("Mul", [x, inv.name], [node.input[0]],
                                                               name=f"{node.name}.smooth")))
            done.append(node.name)
    for name, mul in new_nodes:  # insert each Mul right before its MatMul (topological order holds)
        idx = next(i for i, n in enumerate(g.node) if n.name == name)
        g.node.insert(idx, mul)
    return done


FP8_MAX = 448.0  # largest finite E4M3FN value
FP8_OPSET = 21


def qdq_fp8(model: onnx.ModelProto, nodes: list[str], act_amax: dict[str, float], base_dir: Path | None = None,
            done: Callable[[int], None] = lambda n: None) -> onnx.ModelProto:
    """FP8 E4M3 explicit quantization, TensorRT's recipe: per-tensor scale = amax / 448 for each listed layer's
    input activation (``act_amax``, calibrated) and weight (its own max |W|). Activations get a
    QuantizeLinear -> DequantizeLinear pair; weights are stored in FLOAT8E4M3FN behind a DequantizeLinear.
    The graph moves to opset 21 (FP8 Q/DQ). ONNX Runtime's quantizer scales FP8 by a Gaussian fit of the
    standard deviation instead, which is not what TensorRT calibrates; hence this pass. ``base_dir``: ``model`` was
    loaded without its external data, which lives there; each weight is read when its layer is quantized (only
    the FP8 copies stay in memory); ``done(1)`` after each layer."""
    import ml_dtypes

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    zero = "fp8_zero_point"
    g.initializer.append(numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), zero))
    consumers = Counter(i for n in g.node for i in n.input)
    dq_of: dict[str, str] = {}
    out_nodes = []
    for node in g.node:
        if node.name in nodes and node.input[1] in inits:
            x, w = node.input[0], node.input[1]
            if x not in dq_of:
                scale = f"{x}.fp8_scale"
                g.initializer.append(numpy_helper.from_array(
                    np.array(max(act_amax[x], 1e-12) / FP8_MAX, np.float32), scale))
                out_nodes += [onnx.helper.make_node("QuantizeLinear", [x, scale, zero], [f"{x}.fp8"],
                                                    name=f"{x}.fp8_q", saturate=1),
                              onnx.helper.make_node("DequantizeLinear", [f"{x}.fp8", scale, zero], [f"{x}.fp8_dq"],
                                                    name=f"{x}.fp8_dq")]
                dq_of[x] = f"{x}.fp8_dq"
            weight = numpy_helper.to_array(inits[w], base_dir=str(base_dir or "")).astype(np.float32)
            w_scale = np.float32(max(float(np.abs(weight).max()), 1e-12) / FP8_MAX)
            g.initializer.extend([
                numpy_helper.from_array((weight / w_scale).astype(ml_dtypes.float8_e4m3fn), f"{w}.fp8"),
                numpy_helper.from_array(np.array(w_scale, np.float32), f"{w}.fp8_scale")])
            out_nodes.append(onnx.helper.make_node("DequantizeLinear", [f"{w}.fp8", f"{w}.fp8_scale", zero],
                                                   [f"{w}.fp8_dq"], name=f"{w}.fp8_dq"))
            consumers[w] -= 1
            node.input[0], node.input[1] = dq_of[x], f"{w}.fp8_dq"
            done(1)
        out_nodes.append(node)
    del g.node[:]
    g.node.extend(out_nodes)
    kept = [t for t in g.initializer if not (t.name in inits and consumers[t.name] <= 0)]
    del g.initializer[:]
    g.initializer.extend(kept)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, FP8_OPSET)
    return model
