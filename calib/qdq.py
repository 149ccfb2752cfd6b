"""Q/DQ quantization of a prepared float graph on calibrated ranges: INT8 with ONNX Runtime's quantizer, FP8 with
`calib.graph.qdq_fp8`. Used on the whole stage (`calib.quantize`) and, for a block pass whose next blocks
calibrate on the quantized outputs, on one block (`calib.blockwise`)."""

from __future__ import annotations

from pathlib import Path

import onnx

from metacanvas_deploy.calib.graph import external_data, qdq_fp8, save_model
from metacanvas_deploy.calib.ranges import method
from metacanvas_deploy.calib.recipes import Recipe


def quantize_model(prepared: Path, out: Path, recipe: Recipe, nodes: list[str], ranges_cache: Path) -> None:
    """QDQ-quantize ``nodes`` of ``prepared`` into ``out`` with the calibrated ranges of ``ranges_cache``: INT8
    with ONNX Runtime's quantizer, FP8 with `calib.graph.qdq_fp8` (per-tensor amax, as TensorRT calibrates)."""
    from onnxruntime.quantization import QuantFormat, QuantType, load_tensors_data, quantize_static

    if recipe.format == "fp8":  # the weights read one layer at a time: only the FP8 copies are held
        ranges = load_tensors_data(str(ranges_cache)).data
        model = onnx.load(str(prepared), load_external_data=False)
        by_name = {n.name: n for n in model.graph.node}
        amax = {by_name[n].input[0]: max(abs(float(v)) for v in ranges[by_name[n].input[0]].range_value)
                for n in nodes}
        base = Path(prepared).parent
        save_model(qdq_fp8(model, nodes, amax, base_dir=base), out, base_dir=base)
        return

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
