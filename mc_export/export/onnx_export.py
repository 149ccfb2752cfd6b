"""Component -> ONNX: dynamo export from the spec, graph checks TensorRT needs, ORT offline optimisation,
and the parity gate every stage must pass."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from metacanvas_deploy.calib import graph as calib_graph
from metacanvas_deploy.calib.external_data import IR_SAVE_ALIGNED, check_aligned, ir_save
from metacanvas_deploy.mc_export.components.spec import Component, Tolerance
from metacanvas_deploy.mc_export.errors import ExportError
from metacanvas_deploy.mc_export.export import attention
from metacanvas_deploy.mc_export.export.parity import TABLE_HEADER, ParityRow, check_rows, compare  # noqa: F401 (moved)
from metacanvas_deploy.mc_export.models.lazy import buffers_on_meta

OPSET = 20


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and warnings per export; the build has its own progress bar."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def export_component(comp: Component, path: Path, opset: int = OPSET, weights=None,
                     fused_attention: bool = True, log=None, graph_transform=None) -> list[Path]:
    """Export ``comp`` to ``path`` (one graph covering every shape its spec allows). Returns the files written:
    the .onnx, plus ``<name>.data`` when the weights pass `calib.graph.EXTERNAL_DATA_BYTES` (2 GB: ONNX external
    data, each tensor aligned for memory mapping, `calib.external_data`).

    ``fused_attention``: unmasked attention as ONNX Runtime's fused `MultiHeadAttention` (memory linear in
    tokens; `mc_export.export.attention`); False keeps the decomposed graph TensorRT fuses itself.

    ``weights`` (`mc_export.models.lazy.LazyWeights`): the module's parameters are on `meta`; the graph is
    traced from the structure alone and each weight is streamed from the checkpoint into the file as it is
    written, so a model larger than memory exports (tests/test_lazy_weights.py).

    ``graph_transform``: called on the onnx-ir model before it is written (weights still lazy), which it then
    writes (`calib.weight_only_graph.save`): weight-only quantization while the weights stream
    (`mc_export.weight_only_build`), so the stage's fp32 graph is never written.
    """
    from metacanvas_deploy.mc_export.export.patches import export_patches

    spec = comp.spec
    args = comp.torch_inputs(comp.sample_inputs("opt", seed=0))
    module = comp.module().eval()
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > calib_graph.EXTERNAL_DATA_BYTES
    if weights is not None:
        args = tuple(a.to("meta") for a in args)
    path = Path(path)
    # FakeTensor's dispatch cache costs more than it saves on these graphs (symbolic 5-D shapes): ~1.5x faster
    # exports without it (torch 2.13).
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(export_patches())
        if fused_attention:
            stack.enter_context(attention.fused_attention())
        stack.enter_context(_quiet())
        stack.enter_context(torch._dynamo.config.patch(fake_tensor_cache_enabled=False))
        buffers = stack.enter_context(buffers_on_meta(module)) if weights is not None else {}
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=comp.export_dynamic_shapes(), opset_version=opset,
            custom_translation_table=attention.TRANSLATIONS if fused_attention else None,
            # onnxscript's optimizer folds constants: it would read the (absent) meta weights
            optimize=spec.optimize and weights is None, external_data=external, verbose=False)
        if weights is not None:
            _stream_weights(program, weights.refs(module), buffers, path, log)
        if graph_transform is not None:
            from metacanvas_deploy.calib.weight_only_graph import save as save_ir

            graph_transform(program.model)
            save_ir(program.model, path)
        else:
            _save(program, path, external)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    check_graph(path)
    return files


def _save(program, path: Path, external: bool) -> None:
    """Write the exported graph; with ``external``, its weights to ``<name>.data``, each at an offset ONNX
    Runtime can memory-map (torch's own `save` packs them densely). Lazy weights are read one at a time here."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if not external:
        program.save(str(path))
        return
    ir_save(program.model, path, external_data=data.name, **IR_SAVE_ALIGNED)
    check_aligned(path)


def _stream_weights(program, refs, buffers: dict[str, torch.Tensor], path: Path, log=None) -> None:
    """Point every initializer of a meta export at its checkpoint tensor (read when the file is written) or at
    its buffer's real value. ``log``: progress of the weights read, with the time left (`mc_export.progress`)."""
    import onnx_ir as ir

    from metacanvas_deploy.mc_export.progress import Progress

    progress = Progress(f"{path.stem}: weights", sum(r.nbytes_fp32 for r in refs.values()), log)

    def load(ref, transform=lambda t: t):
        tensor = transform(ref.load(torch.float32)).contiguous()
        progress.update(ref.nbytes_fp32)
        return ir.tensor(tensor.numpy())

    graph = program.model.graph
    for name, value in buffers.items():
        if name in graph.initializers:
            graph.initializers[name].const_value = ir.tensor(value.numpy(), name=name)
    for name, ref in refs.items():
        value = graph.initializers.get(name)
        if value is None:  # a parameter the traced graph does not use
            continue
        if value.const_value.dtype != ir.DataType.FLOAT:
            raise ExportError(f"{path.name}: weight {name} is {value.const_value.dtype}, expected float32")
        value.const_value = ir.LazyTensor(lambda ref=ref: load(ref), dtype=ir.DataType.FLOAT,
                                          shape=ir.Shape(ref.shape), name=name)
    missing = [n for n, v in graph.initializers.items() if _is_meta(v.const_value)]
    if missing:
        raise ExportError(f"{path.name}: initializers without values after a meta export: {missing[:5]}")
    _fold_weight_transposes(graph, refs, load)


def _fold_weight_transposes(graph, refs, load) -> None:
    """A meta export skips onnxscript's constant folding, so `linear` stays MatMul(x, Transpose(W)): a session
    would transpose (copy) every weight at run time, into private memory, and a mapped stage larger than memory
    would then hold all of it. Each such Transpose of a checkpoint weight becomes the initializer ``W.T``, read
    from the checkpoint and transposed as it is written (exact; the name `calib.graph.fold_weight_transposes`
    gives the same fold)."""
    import onnx_ir as ir

    for node in [n for n in graph if n.op_type == "Transpose" and n.domain == ""]:
        weight = node.inputs[0]
        if weight is None or not weight.is_initializer() or weight.name not in refs:
            continue
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else None
        ref = refs[weight.name]
        shape = tuple(ref.shape[i] for i in perm) if perm else tuple(reversed(ref.shape))
        folded = ir.Value(name=weight.name + ".T", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
        order = perm or tuple(reversed(range(len(ref.shape))))
        folded.const_value = ir.LazyTensor(lambda ref=ref, order=order: load(ref, lambda t: t.permute(*order)),
                                           dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=folded.name)
        graph.register_initializer(folded)
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        if not weight.uses():
            graph.initializers.pop(weight.name)


def _is_meta(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.is_meta


def check_graph(path: Path) -> None:
    """Raise ExportError if the graph holds what TensorRT rejects: DOUBLE tensors, or Scatter nodes (they
    serialise the kernel; every one we met had an exact gather/concat rewrite)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    g = model.graph
    doubles = [vi.name for vi in (*g.value_info, *g.input, *g.output)
               if vi.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE]
    doubles += [t.name for t in g.initializer if t.data_type == onnx.TensorProto.DOUBLE]
    doubles += [n.name for n in g.node if n.op_type == "Cast" and any(
        a.name == "to" and a.i == onnx.TensorProto.DOUBLE for a in n.attribute)]
    scatters = [n.name for n in g.node if n.op_type.startswith("Scatter")]
    if doubles or scatters:
        raise ExportError(f"{path.name}: TensorRT-hostile content: DOUBLE tensors {doubles[:5]}, Scatter nodes "
                          f"{scatters[:5]}; keep float64 math on the host and rewrite scatters")


def parity_gate(comp: Component, engine, cases: dict[str, dict] | None = None,
                tolerance: Tolerance | None = None, mapped: bool = False) -> list[ParityRow]:
    """An engine vs the PyTorch module on fresh random inputs at several profile points.

    ``mapped``: the ONNX file's session maps its weights (a stage larger than memory).
    ``engine``: an ONNX file (run with ONNX Runtime) or a callable ``feeds -> {output: array}`` (a TensorRT
    engine). ``cases``: name -> dict(which=..., seed=..., overrides=...) for ``comp.sample_inputs``; default: the
    opt and min points. ``tolerance``: the spec's unless given (reduced-precision engines). Raises
    StageParityError with the whole table if any output misses it.
    """
    run = engine if callable(engine) else _ort_runner(Path(engine), comp.spec.output_names, mapped)
    cases = cases or {"opt": dict(which="opt", seed=101), "min": dict(which="min", seed=102)}
    tol, rows = tolerance or comp.spec.tolerance, []
    for case, kw in cases.items():
        feeds = comp.sample_inputs(**kw)
        ref = comp.reference(feeds)
        outs = run(feeds)
        rows += [compare(comp.spec.stage, case, n, outs[n], ref[n]) for n in comp.spec.output_names]
    return check_rows(comp.spec.stage, rows, tol)


def _ort_runner(path: Path, output_names: list[str], mapped: bool = False):
    """An ONNX Runtime session on ``path``; ``mapped``: weights mapped from the file, never copied (a stage
    larger than memory: `runtime.engine.session_options`)."""
    import onnxruntime as ort

    from metacanvas_deploy.runtime.engine import session_options

    sess = ort.InferenceSession(str(path), session_options(mapped=mapped) if mapped else None,
                                providers=["CPUExecutionProvider"])
    return lambda feeds: dict(zip(output_names, sess.run(output_names, feeds)))
