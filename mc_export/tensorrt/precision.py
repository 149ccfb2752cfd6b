"""Which precisions a GPU can build, and which TensorRT network mode each precision needs: both as data.

Sources: the TensorRT 10 support matrix ("Hardware and Precision": BF16 from SM 8.0, FP8 from SM 8.9), the
DRIVE OS / JetPack TensorRT release notes for Thor (SM 10.1 under CUDA 12, renumbered 11.0 from CUDA 13), and
the TensorRT developer guide on strong typing (a strongly typed network takes every tensor type from the ONNX:
Q/DQ nodes for int8/fp8; the FP16/BF16 builder flags are only allowed on weakly typed networks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from metacanvas_deploy.mc_export.components.spec_data import Tolerance
from metacanvas_deploy.mc_export.errors import BuildError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "w8", "w4")
MIN_SM = (7, 5)  # the oldest GPU this package builds TensorRT engines for (Turing)


@dataclass(frozen=True)
class PrecisionRule:
    """What one ``--precision`` needs from the GPU, and how the TensorRT network is made for it."""

    precision: str
    min_sm: tuple[int, int]  # lowest compute capability with the math this precision runs on
    strongly_typed: bool  # tensor types come from the ONNX (an fp32 graph, or Q/DQ nodes for int8/fp8)
    builder_flags: tuple[str, ...]  # `trt.BuilderFlag` names to set (weakly typed precisions only)
    tf32: bool  # allow TF32 for float32 math; off for fp32, where it costs ~1e-3 relative error
    needs_qdq: bool  # the ONNX must carry QuantizeLinear/DequantizeLinear nodes (written by calib/)


RULES: Mapping[str, PrecisionRule] = {r.precision: r for r in (
    PrecisionRule("fp32", MIN_SM, strongly_typed=True, builder_flags=(), tf32=False, needs_qdq=False),
    PrecisionRule("fp16", MIN_SM, strongly_typed=False, builder_flags=("FP16",), tf32=True, needs_qdq=False),
    PrecisionRule("bf16", (8, 0), strongly_typed=False, builder_flags=("BF16",), tf32=True, needs_qdq=False),
    PrecisionRule("int8", MIN_SM, strongly_typed=True, builder_flags=(), tf32=True, needs_qdq=True),
    PrecisionRule("fp8", (8, 9), strongly_typed=True, builder_flags=(), tf32=True, needs_qdq=True),
    # weight-only (calib.weight_only): blocked DequantizeLinear on the weights only (IDequantizeLayer block
    # quantization of INT8/INT4, zero points 0), float activations; strongly typed from the graph's fp32 scales.
    # Jetson Orin's list below leaves them out: its JetPack TensorRT's block-quantized weights are not confirmed
    PrecisionRule("w8", MIN_SM, strongly_typed=True, builder_flags=(), tf32=True, needs_qdq=True),
    PrecisionRule("w4", MIN_SM, strongly_typed=True, builder_flags=(), tf32=True, needs_qdq=True),
)}


@dataclass(frozen=True)
class DeviceClass:
    """A family of GPUs by compute capability. ``precisions`` overrides the rules' thresholds where a platform's
    TensorRT supports less than its SM suggests (None: every precision whose ``min_sm`` the SM reaches)."""

    name: str
    compute_capabilities: tuple[str, ...]
    examples: str
    jetson: bool = False
    precisions: tuple[str, ...] | None = None


DEVICE_CLASSES: tuple[DeviceClass, ...] = (
    DeviceClass("Turing", ("7.5",), "T4, RTX 20 series"),
    DeviceClass("Ampere", ("8.0", "8.6"), "A100, A10, A40, RTX 30 series"),
    DeviceClass("Jetson Orin", ("8.7",), "Jetson AGX Orin, Orin NX, Orin Nano", jetson=True,
                precisions=("fp32", "fp16", "int8")),
    DeviceClass("Ada", ("8.9",), "L4, L40S, RTX 40 series"),
    DeviceClass("Hopper", ("9.0",), "H100, H200, GH200"),
    DeviceClass("Blackwell", ("10.0", "10.3"), "B200, GB200, B300"),
    DeviceClass("Jetson Thor", ("10.1", "11.0"), "Jetson AGX Thor (SM 10.1 under CUDA 12, 11.0 under CUDA 13)",
                jetson=True),
    DeviceClass("Blackwell RTX", ("12.0", "12.1"), "RTX 50 series, RTX PRO 6000, GB10"),
)


def rule(precision: str) -> PrecisionRule:
    """The rule of a precision; BuildError for an unknown one."""
    if precision not in RULES:
        raise BuildError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return RULES[precision]


def parse_sm(compute_capability: str) -> tuple[int, int]:
    """``"8.9"`` -> ``(8, 9)``; BuildError for anything else."""
    major, _, minor = str(compute_capability).partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise BuildError(f"compute capability must look like '8.9', got {compute_capability!r}")
    return int(major), int(minor)


def device_class(compute_capability: str) -> DeviceClass | None:
    """The table's class for a compute capability, or None for one the table does not list."""
    return next((c for c in DEVICE_CLASSES if compute_capability in c.compute_capabilities), None)


def buildable(compute_capability: str) -> tuple[str, ...]:
    """The precisions TensorRT engines can be built in on a GPU of this compute capability, in PRECISIONS order.
    An SM the table does not list (a newer GPU) follows the rules' thresholds."""
    sm = parse_sm(compute_capability)
    cls = device_class(compute_capability)
    if cls is not None and cls.precisions is not None:
        return cls.precisions
    return tuple(p for p in PRECISIONS if sm >= RULES[p].min_sm)


def check_precision(precision: str, device_identity: Mapping) -> None:
    """Raise BuildError unless ``precision`` can be built on the GPU ``device_identity`` describes (keys ``gpu``
    and ``compute_capability``, as `mc_export.tensorrt.builder.device_identity` returns them). The message says
    what this GPU can build instead."""
    needed = rule(precision)
    cc = str(device_identity["compute_capability"])
    ok = buildable(cc)
    if precision in ok:
        return
    cls = device_class(cc)
    where = f"{device_identity.get('gpu', 'this GPU')} (SM {cc}{f', {cls.name}' if cls else ''})"
    if not ok:
        raise BuildError(f"{where} is older than the SM {MIN_SM[0]}.{MIN_SM[1]} this package builds TensorRT "
                         "engines for; build for its CPU with --target onnxruntime")
    if cls is not None and cls.precisions is not None:
        why = f"TensorRT on {cls.name} runs {', '.join(cls.precisions)} only"
    else:
        why = f"{precision} needs compute capability >= {needed.min_sm[0]}.{needed.min_sm[1]}"
    raise BuildError(f"--precision {precision} cannot be built on {where}: {why}. This GPU can build: "
                     f"{', '.join(ok)}")


# Build-time parity gate of a TensorRT engine against the fp32 PyTorch stage. fp32 (strongly typed, TF32 off)
# keeps the spec's own tolerance; half-precision math is held to its rounding (fp16: 11-bit, bf16: 8-bit
# mantissas, accumulated over a DiT step). Not yet measured on a GPU: a first GPU run should confirm them.
# int8/fp8 stages are gated by calib/ against the float bundle (PSNR and per-stage cosine), not here.
GATE_TOLERANCE: Mapping[str, Tolerance] = {"fp16": Tolerance(max_rel=2e-2, min_cosine=0.9995),
                                           "bf16": Tolerance(max_rel=6e-2, min_cosine=0.998)}
