"""One component's ONNX file -> one serialized TensorRT engine, for the GPU this runs on.

The network is parsed from the file (`OnnxParser.parse_from_file`, which also reads external weights beside
it), typed as the precision's rule says (`precision.RULES`: strongly typed for fp32 and Q/DQ graphs, builder
flags for fp16/bf16), given one optimisation profile from the component's spec (`profiles.profile_shapes`) and
built with a persistent timing cache. tensorrt is imported inside the functions that need it.

API used (TensorRT 10 Python API): Builder.create_network / create_builder_config / create_optimization_profile
/ build_serialized_network, OnnxParser.parse_from_file / num_errors / get_error, IBuilderConfig.set_flag /
clear_flag / builder_optimization_level / set_memory_pool_limit / add_optimization_profile /
create_timing_cache / set_timing_cache / get_timing_cache, IOptimizationProfile.set_shape, ILogger.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metacanvas_deploy.mc_export.components.spec_data import ComponentSpec
from metacanvas_deploy.mc_export.errors import BuildError, ConfigError
from metacanvas_deploy.mc_export.tensorrt.precision import PrecisionRule, check_precision, rule
from metacanvas_deploy.mc_export.tensorrt.profiles import profile_shapes
from metacanvas_deploy.runtime.trt_engine import device_identity

# onnx-tensorrt's operators.md for TensorRT 10.15: "supports operators in the inclusive range of opset 9 to
# opset 24"; it lists every Sequence op as unsupported (`lower_sequences` rewrites the ones our exports hold).
MAX_OPSET = 24
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_SEQUENCE_OPS = ("SplitToSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
                 "SequenceInsert", "SequenceLength", "SequenceMap", "ConcatFromSequence")


@dataclass(frozen=True)
class BuildOptions:
    """How one engine is built. ``static_shapes``: None for the spec's full ranges; a mapping (even empty)
    pins every symbol (given values, else opt) for a static engine, the CUDA-graph case."""

    precision: str = "fp32"
    optimization_level: int = 3  # TensorRT's builder_optimization_level, 0 (fast build) .. 5 (most tactics)
    timing_cache: Path | None = None  # read if present, rewritten after the build
    static_shapes: Mapping[str, int] | None = None
    weight_streaming: bool = False  # weights may stay in host memory, streamed in at run time
    refit: bool = False  # weights can be replaced later without a rebuild
    workspace_bytes: int | None = None  # TensorRT's WORKSPACE pool limit; None: TensorRT's default (all memory)

    def validate(self) -> PrecisionRule:
        """Every "X requires Y" rule of these options; returns the precision's rule."""
        r = rule(self.precision)
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"optimization level must be 0..5, got {self.optimization_level}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise ConfigError(f"workspace limit must be a positive number of bytes, got {self.workspace_bytes}")
        if self.weight_streaming and not r.strongly_typed:
            raise BuildError(f"weight streaming needs a strongly typed network, which --precision {self.precision} "
                             "is not (it uses builder flags); use fp32, int8 or fp8, or drop weight streaming")
        return r


def timing_cache_path(identity: Mapping, root: Path | None = None) -> Path:
    """Where the timing cache of one GPU model and TensorRT version lives: timings measured on one GPU are
    wrong on another, so the file name carries the device identity."""
    root = Path(root) if root is not None else Path.home() / ".cache" / "metacanvas" / "tensorrt"
    gpu = re.sub(r"[^a-z0-9]+", "-", str(identity["gpu"]).lower()).strip("-")
    return root / f"{gpu}-sm{identity['compute_capability']}-trt{identity['tensorrt']}.cache"


def check_onnx(onnx_path: Path, precision_rule: PrecisionRule) -> None:
    """What TensorRT needs of the file before parsing it: standard ONNX ops only (an ONNX Runtime-optimised
    graph holds com.microsoft fusions TensorRT cannot parse), an opset its parser reads, no DOUBLE tensors or
    scatters (`check_graph`), external data beside the file, Q/DQ nodes for int8/fp8. Raises BuildError (or
    ExportError from `check_graph`) naming the problem."""
    import onnx

    from metacanvas_deploy.mc_export.export.onnx_export import check_graph
    from metacanvas_deploy.runtime.onnx_external_data import external_data_refs

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise BuildError(f"{onnx_path.name} holds non-standard ops {foreign[:6]}: an ONNX Runtime-optimised graph. "
                         "TensorRT builds from the raw export (before `optimize_for_ort`)")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > MAX_OPSET:
        raise BuildError(f"{onnx_path.name} uses ONNX opset {opset}; TensorRT 10's parser reads up to {MAX_OPSET}: "
                         "export with a lower opset")
    check_graph(onnx_path)
    missing = sorted({r.location or "?" for r in external_data_refs(onnx_path) if not _beside(onnx_path, r.location)})
    if missing:
        raise BuildError(f"{onnx_path.name} keeps weights in {missing}, which are not files in its directory; "
                         "TensorRT's parser reads external data relative to the model file")
    if precision_rule.needs_qdq and not any(n.op_type in _QDQ for n in model.graph.node):
        raise BuildError(f"--precision {precision_rule.precision} builds from a quantized ONNX (QuantizeLinear/"
                         f"DequantizeLinear nodes); {onnx_path.name} has none. Quantize it with calib/ first")


def _beside(onnx_path: Path, location: str | None) -> bool:
    """An external-data location names an existing file under the model's directory."""
    if not location or location.startswith("/") or ".." in Path(location).parts:
        return False
    return (onnx_path.parent / location).is_file()


def build_engine(onnx_path: Path, spec: ComponentSpec, options: BuildOptions, out_path: Path, log=print,
                 prepared: bool = False) -> dict:
    """Build ``spec``'s engine from ``onnx_path`` into ``out_path`` (written atomically) on this machine's GPU.
    Returns the device identity to record in the engine's manifest entry. Raises BuildError when the GPU cannot
    take the precision, the parser rejects the graph, or TensorRT cannot build it (with TensorRT's errors).

    ``prepared``: the file was checked (`check_onnx`) and its sequences lowered when a TensorRT export wrote it
    (`tensorrt.export_only`), and is parsed as it is: the build then needs neither onnx nor torch."""
    precision_rule = options.validate()
    identity = device_identity()
    check_precision(options.precision, identity)
    if not prepared:
        check_onnx(onnx_path, precision_rule)
    import tensorrt as trt

    logger = _logger(trt, log)
    builder = trt.Builder(logger)
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision_rule.strongly_typed else 0
    network = builder.create_network(strongly_typed)
    parser = trt.OnnxParser(network, logger)
    parseable = contextlib.nullcontext(Path(onnx_path)) if prepared else _parseable(Path(onnx_path))
    with parseable as path:  # kept until the build ends, as the parser that read it is
        if not parser.parse_from_file(str(path)) or parser.num_errors:
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
            raise BuildError(f"TensorRT's ONNX parser rejected {Path(onnx_path).name}: {'; '.join(errors)}")
        _check_network(network, spec)
        config = _config(builder, trt, options, precision_rule, spec, log)
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build stage {spec.stage!r} ({options.precision}): "
                         f"{'; '.join(logger.errors[-5:]) or 'see its log above'}")
    _atomic_write(Path(out_path), serialized)
    if options.timing_cache is not None:
        _atomic_write(Path(options.timing_cache), config.get_timing_cache().serialize())
    return identity


@contextlib.contextmanager
def _parseable(onnx_path: Path):
    """The file to parse: ``onnx_path`` itself, or a copy beside it (so external data still resolves) with its
    sequences lowered, removed afterwards."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    if not lower_sequences(model):
        yield onnx_path
        return
    lowered = onnx_path.with_name(f".{onnx_path.stem}.tensorrt.onnx")
    onnx.save(model, str(lowered))  # tensors kept outside stay references to the same files
    try:
        yield lowered
    finally:
        lowered.unlink(missing_ok=True)


def lower_sequences(model) -> int:
    """Rewrite each SplitToSequence whose every use is a SequenceAt at a constant position into one Split (its
    sizes constant, or a 1-D tensor of static length), and each SequenceAt into an Identity (or a Squeeze, for
    ``keepdims=0`` without ``split``) of the matching part: the same values, in ops TensorRT parses. torch's
    split/chunk/unbind export as SplitToSequence when onnxscript's optimizer is off (SANA's graphs:
    `ComponentSpec.optimize`; every export with lazy weights, whose values it cannot fold). Edits ``model`` in
    place; returns how many were lowered. BuildError for a sequence op this cannot lower (dynamic split sizes or
    positions)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = _constants(graph)
    shapes = {v.name: v.type.tensor_type.shape for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    shapes.update({v.name: v.type.tensor_type.shape for v in graph.input})
    parts: dict[str, tuple[list[str], int | None]] = {}  # sequence -> (part names, axis to squeeze)
    nodes = []
    for node in graph.node:
        if node.op_type == "SplitToSequence":
            sizes, axis, squeeze = _split_sizes(node, consts, shapes)
            count = len(sizes) if isinstance(sizes, list) else _length(shapes, sizes)
            names = [f"{node.output[0]}_part{i}" for i in range(count)]
            sizes_name = sizes if isinstance(sizes, str) else f"{node.output[0]}_sizes"
            if isinstance(sizes, list):
                graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), sizes_name))
            nodes.append(helper.make_node("Split", [node.input[0], sizes_name], names, name=node.name, axis=axis))
            parts[node.output[0]] = names, squeeze
        elif node.op_type == "SequenceAt" and node.input[0] in parts and node.input[1] in consts:
            names, squeeze = parts[node.input[0]]
            part = names[int(consts[node.input[1]])]  # negative positions count from the end, as in ONNX
            if squeeze is None:
                nodes.append(helper.make_node("Identity", [part], list(node.output), name=node.name))
            else:
                axes = f"{node.output[0]}_axes"
                graph.initializer.append(numpy_helper.from_array(np.array([squeeze], np.int64), axes))
                nodes.append(helper.make_node("Squeeze", [part, axes], list(node.output), name=node.name))
        else:
            nodes.append(node)
    left = sorted({n.op_type for n in nodes if n.op_type in _SEQUENCE_OPS})
    if left:
        raise BuildError(f"the graph holds sequence ops TensorRT cannot parse and this build cannot lower: {left} "
                         "(SplitToSequence with static sizes read by constant SequenceAt positions is lowered)")
    del graph.node[:]
    graph.node.extend(nodes)
    return len(parts)


def _length(shapes, name: str) -> int:
    return shapes[name].dim[0].dim_value


def _constants(graph) -> dict:
    """Tensor name -> numpy value of every initializer and Constant node (``value`` attribute)."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.external_data}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _split_sizes(node, consts, shapes) -> tuple[list[int] | str, int, int | None]:
    """(part sizes, axis, axis to squeeze or None) of a SplitToSequence whose part count is static; the sizes are a
    name instead of a list where they are a tensor computed at run time (1-D, of static length: FLUX's joint
    attention splits text from image tokens by the request's lengths), which `Split` takes as its input as they
    are. BuildError if the number of parts is not static."""
    from onnx import helper

    def static_dims(name):
        return [d.dim_value if d.HasField("dim_value") else None for d in shapes[name].dim] if name in shapes else None

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    dims = static_dims(node.input[0]) or []
    axis = attrs.get("axis", 0)  # Split and Squeeze take a negative axis as SplitToSequence does
    given = node.input[1] if len(node.input) > 1 and node.input[1] else None
    split = consts.get(given) if given else None
    if split is not None and split.ndim == 1:
        return [int(v) for v in split], axis, None
    if given and split is None and [bool(d) for d in static_dims(given) or ()] == [True]:
        return given, axis, None  # the sizes tensor itself, its length the part count
    length = dims[axis] if -len(dims) <= axis < len(dims) else None
    if length is None or (given and split is None):
        raise BuildError(f"SplitToSequence {node.name!r}: its sizes are not static, so it cannot be lowered to a "
                         "Split TensorRT parses")
    if split is None:  # size-1 parts; keepdims=0 (the default is 1) drops the split axis
        return [1] * length, axis, (None if attrs.get("keepdims", 1) else axis)
    step = int(split)
    return [step] * (length // step) + ([length % step] if length % step else []), axis, None


def _logger(trt, log):
    """A TensorRT logger that keeps every error (for BuildError messages) and passes errors and warnings on."""
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR, trt.ILogger.WARNING):
                log(f"  tensorrt: {msg}")

    return Logger()


def _check_network(network, spec: ComponentSpec) -> None:
    """The parsed network's inputs and outputs are the spec's, by name."""
    inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    outputs = sorted(network.get_output(i).name for i in range(network.num_outputs))
    if (inputs, outputs) != (sorted(spec.input_names), sorted(spec.output_names)):
        raise BuildError(f"the ONNX of stage {spec.stage!r} takes {inputs} -> {outputs}, its spec says "
                         f"{sorted(spec.input_names)} -> {sorted(spec.output_names)}; export it again")


def _config(builder, trt, options: BuildOptions, precision_rule: PrecisionRule, spec: ComponentSpec, log):
    """The builder config: precision flags, options, the spec's profile and the timing cache."""
    config = builder.create_builder_config()
    for flag in precision_rule.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if not precision_rule.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    config.builder_optimization_level = options.optimization_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(spec, options.static_shapes).items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"TensorRT refused the optimisation profile of stage {spec.stage!r}")
    _use_timing_cache(config, options.timing_cache, log)
    return config


def _use_timing_cache(config, path: Path | None, log) -> None:
    """Start from the cache at ``path`` when it exists and matches this GPU and TensorRT, else from empty."""
    blob = Path(path).read_bytes() if path is not None and Path(path).is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False):
        return
    log(f"  timing cache {path} was made on another GPU or TensorRT: starting a fresh one")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise BuildError("TensorRT refused an empty timing cache")


def _atomic_write(path: Path, data) -> None:
    """Write ``data`` (bytes or a TensorRT IHostMemory, both buffers) so that ``path`` is never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
