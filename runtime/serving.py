"""A generation request as tensors on the wire (Triton's KServe v2 protocol): the one declaration of a served
model's inputs and outputs, and the conversions between those tensors and `Pipeline.__call__`'s arguments.

The compiler writes `config.pbtxt` from `INPUTS` and `OUTPUTS` (`mc_export.triton_repo`); the served model
(`mc_export/triton_model.py`, copied as `model.py`) decodes each request with `request_kwargs` and encodes the
result with `response_arrays`. numpy and the runtime only: it runs inside Triton's Python stub, with numpy 1.26
(nvidia-pytriton's pin) as well as 2.x.

Wire names are `Pipeline.__call__`'s keyword names. Every input carries a leading batch dimension of 1 (one request
is one generation; Triton's dynamic batcher gathers concurrent requests, each its own generation). Media travel
as encoded files (PNG/JPEG/WebP/BMP images, MP4/GIF videos) and are decoded here with the runtime's own readers,
so a file that does not decode is the same `RuntimeInputError` as on the command line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metacanvas_deploy.runtime.errors import (
    BundleError,
    CudaError,
    MetaCanvasRuntimeError,
    RuntimeInputError,
)
from metacanvas_deploy.runtime.media import read_image, read_video
from metacanvas_deploy.runtime.request import GenerationOutput


@dataclass(frozen=True)
class WireTensor:
    """One input or output of the served model. ``dims`` exclude the batch dimension (-1: any length);
    ``kind`` says how the value becomes a `Pipeline` argument (text, int, real, image, images, video) or what
    an output holds (frames, json)."""

    name: str
    data_type: str  # Triton's config type name (TYPE_STRING is the protocol's BYTES)
    dims: tuple[int, ...]
    kind: str
    optional: bool
    doc: str


INPUTS: tuple[WireTensor, ...] = (
    WireTensor("prompt", "TYPE_STRING", (1,), "text", False, "UTF-8 text"),
    WireTensor("negative_prompt", "TYPE_STRING", (1,), "text", True, "UTF-8 text (default: the bundle's)"),
    WireTensor("task", "TYPE_STRING", (1,), "text", True, "t2i, edit, t2v, i2v, v2v or r2v (default: from the "
                                                          "inputs given)"),
    WireTensor("image", "TYPE_STRING", (1,), "image", True, "an encoded image file: edit, i2v"),
    WireTensor("video", "TYPE_STRING", (1,), "video", True, "an encoded MP4 or GIF file: v2v"),
    WireTensor("reference_images", "TYPE_STRING", (-1,), "images", True, "encoded image files: r2v"),
    WireTensor("height", "TYPE_INT32", (1,), "int", True, "pixels (default: the bundle's)"),
    WireTensor("width", "TYPE_INT32", (1,), "int", True, "pixels (default: the bundle's)"),
    WireTensor("num_frames", "TYPE_INT32", (1,), "int", True, "video frames (default: the bundle's)"),
    WireTensor("num_inference_steps", "TYPE_INT32", (1,), "int", True, "denoising steps (default: the bundle's)"),
    WireTensor("guidance_scale", "TYPE_FP32", (1,), "real", True, "CFG scale (default: the bundle's)"),
    WireTensor("true_cfg_scale", "TYPE_FP32", (1,), "real", True, "FLUX-Kontext true CFG (> 1 enables it)"),
    WireTensor("seed", "TYPE_INT64", (1,), "int", True, "0..2^63-1 (default 0)"),
)
OUTPUTS: tuple[WireTensor, ...] = (
    WireTensor("frames", "TYPE_UINT8", (-1, -1, -1, 3), "frames", False, "(F, H, W, 3) RGB; F = 1 for images"),
    WireTensor("timings", "TYPE_STRING", (1,), "json", False, "JSON object: seconds inside each stage's engine, "
                                                              "and total"),
)

# The numpy dtype a client sends for each Triton type (tritonclient's `np_to_triton_dtype` maps them back).
NUMPY_TYPES = {"TYPE_STRING": np.object_, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_FP32": np.float32,
               "TYPE_UINT8": np.uint8}

# Which Triton error code each of our errors becomes: the caller's input is INVALID_ARG (HTTP 400); a bundle or
# device fault on the server, and anything unexpected, is INTERNAL (HTTP 500).
ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (BundleError, "INTERNAL"),
    (CudaError, "INTERNAL"),
    (MetaCanvasRuntimeError, "INVALID_ARG"),
)


def error_code(error: BaseException) -> str:
    """The Triton error code (a `TritonError` attribute name) that ``error`` is reported with."""
    return next((code for cls, code in ERROR_CODES if isinstance(error, cls)), "INTERNAL")


def request_kwargs(get: Callable[[str], np.ndarray | None], scratch: Path, max_video_frames: int) -> dict:
    """`Pipeline.__call__` keyword arguments from one request's tensors (``get(name)``: the array, None when the
    request omits it). Media are written under ``scratch`` (a folder of this request) and decoded there. Raises
    `RuntimeInputError` naming the input; numbers are range-checked by the Pipeline itself."""
    kwargs = {}
    for wire in INPUTS:
        array = get(wire.name)
        if array is None:
            if not wire.optional:
                raise RuntimeInputError(f"input `{wire.name}` is required ({wire.doc})")
            continue
        kwargs[wire.name] = _decode(wire, _one_row(wire, np.asarray(array)), scratch, max_video_frames)
    return kwargs


def _one_row(wire: WireTensor, array: np.ndarray) -> np.ndarray:
    """The request's single row: (1, *dims) -> (*dims)."""
    if array.ndim != len(wire.dims) + 1 or array.shape[0] != 1:
        raise RuntimeInputError(f"input `{wire.name}` has shape {list(array.shape)}; expected "
                                f"{[1, *wire.dims]} (batch size 1: one request is one generation, and the server "
                                "batches concurrent requests itself)")
    return array[0]


def _decode(wire: WireTensor, row: np.ndarray, scratch: Path, max_video_frames: int):
    if wire.kind == "images":
        if row.size == 0:
            raise RuntimeInputError(f"input `{wire.name}` holds no images; omit it or send at least one")
        return [_media(f"{wire.name}[{i}]", _bytes(wire.name, v), scratch, read_image) for i, v in enumerate(row)]
    value = row.reshape(-1)[0]
    if wire.kind == "text":
        return _text(wire.name, value)
    if wire.kind == "int":
        return int(value)  # Triton has checked the type; the Pipeline checks the range
    if wire.kind == "real":
        return float(value)
    if wire.kind == "image":
        return _media(wire.name, _bytes(wire.name, value), scratch, read_image)
    if wire.kind == "video":
        data = _bytes(wire.name, value)
        suffix = ".gif" if data.startswith((b"GIF87a", b"GIF89a")) else ".mp4"  # imageio picks its plugin by name
        return _media(wire.name, data, scratch, lambda path: read_video(path, max_frames=max_video_frames), suffix)
    raise AssertionError(f"unknown wire kind {wire.kind!r}")  # a bug in INPUTS, not an input


def _bytes(name: str, value) -> bytes:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    raise RuntimeInputError(f"input `{name}` must be bytes (Triton BYTES), got {type(value).__name__}")


def _text(name: str, value) -> str:
    if isinstance(value, str):
        return value
    try:
        return _bytes(name, value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RuntimeInputError(f"input `{name}` is not UTF-8 text: byte {e.start} cannot be decoded") from None


def _media(name: str, data: bytes, scratch: Path, read: Callable[[Path], np.ndarray], suffix: str = "") -> np.ndarray:
    """Decode an encoded image or video with the runtime's reader; errors name the input, not the temp file."""
    if not data:
        raise RuntimeInputError(f"input `{name}` is empty; send the bytes of an encoded file")
    path = scratch / f"{name.replace('[', '_').replace(']', '')}{suffix}"
    path.write_bytes(data)
    try:
        return read(path)
    except RuntimeInputError as e:  # "cannot read image /tmp/x/image: cannot identify image file '/tmp/x/image'"
        message = str(e).replace(f" '{path}'", "").replace(str(path), f"input `{name}`")
        raise RuntimeInputError(message) from None
    finally:
        path.unlink(missing_ok=True)


def response_arrays(out: GenerationOutput) -> dict[str, np.ndarray]:
    """The response tensors of one generation, each with its batch dimension of 1."""
    timings = json.dumps({k: round(float(v), 6) for k, v in out.timings.items()}).encode()
    return {"frames": np.ascontiguousarray(out.frames, dtype=np.uint8)[None],  # (1, F, H, W, 3)
            "timings": np.array([[timings]], dtype=np.object_)}  # (1, 1)
