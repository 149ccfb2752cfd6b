"""Find every external-data reference in an ONNX file without the `onnx` package and without running anything.

`onnx` is not a runtime dependency (a product embeds the runtime with numpy + onnxruntime), so this reads the
protobuf wire format directly with the stdlib: about 100 lines that only walk the messages that can hold a
TensorProto (graph initializers, sparse initializers, node attributes, subgraphs of If/Loop/Scan, model-local
functions, training-info graphs) and collect each tensor's `external_data` entries. Everything else, raw tensor
bytes included, is skipped by length, so a model costs one mmap and a walk over its messages (measured: 1.1 s
for a 400 MB file with 50k nodes and 5k initializers; an external-data model's .onnx is only its graph).
The field numbers are those of onnx/onnx.proto (stable since ONNX 1.0; protobuf never renumbers fields).

It does not validate the model (ONNX Runtime does that when it loads the file); it only answers "which files
would this model read, and where in them?", which is what the bundle verifier and `misaligned` need. A walk is
iterative, so a hostile file with deeply nested subgraphs cannot exhaust Python's recursion limit.

Alignment: ONNX Runtime on CPU memory-maps external data instead of reading it into private memory (the
pages are then shared with the page cache: file-backed, not private, and dropped under memory pressure rather
than swapped). The operating system maps at multiples of its allocation granularity: 4 KiB pages on most Linux
machines, 64 KiB on Windows and on ARM64 kernels built with 64 KiB pages. ONNX Runtime 1.32 on Linux rounds an
unaligned offset down to a page itself (measured: an unaligned file mapped as well), but its own writer aligns
and other platforms need it, so every writer of the compiler starts each external tensor at a multiple of
`EXTERNAL_DATA_ALIGNMENT` (64 KiB: a multiple of all of the above); `misaligned` names the tensors that do not.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

# message kind -> {field number: kind of the embedded message}; see onnx.proto.
_CHILDREN = {
    "model": {7: "graph", 20: "training_info", 25: "function"},        # ModelProto
    "training_info": {1: "graph", 2: "graph"},                        # TrainingInfoProto
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},           # GraphProto
    "function": {7: "node", 11: "attribute"},                         # FunctionProto
    "node": {5: "attribute"},                                         # NodeProto
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph",  # AttributeProto: t, g, tensors, graphs,
                  22: "sparse_tensor", 23: "sparse_tensor"},          # sparse_tensor, sparse_tensors
    "sparse_tensor": {1: "tensor", 2: "tensor"},                      # SparseTensorProto: values, indices
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14  # TensorProto fields
_DATA_LOCATION_EXTERNAL = 1
# The offset every external tensor of a bundle starts at a multiple of (see the module docstring).
EXTERNAL_DATA_ALIGNMENT = 1 << 16


class MalformedOnnxError(ValueError):
    """The file is not a well-formed protobuf message (truncated, wrong file, or corrupt)."""


@dataclass(frozen=True)
class ExternalRef:
    """One tensor stored outside the .onnx file. `location` is as written in the file (relative to the .onnx
    file's directory per the ONNX spec), or None when the tensor says EXTERNAL but names no location. `offset`
    and `length` in bytes as written (None where the file gives none: offset 0, length to the end)."""

    tensor: str
    location: str | None
    offset: int | None = None
    length: int | None = None


def external_data_refs(path: str | Path) -> list[ExternalRef]:
    """Every tensor in the ONNX file at `path` that keeps its data in an external file.

    Raises `MalformedOnnxError` when the file cannot be walked as a protobuf message."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise MalformedOnnxError(f"{path} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(buf)


def misaligned(path: str | Path, alignment: int = EXTERNAL_DATA_ALIGNMENT) -> list[ExternalRef]:
    """The external tensors of the ONNX file at ``path`` whose data does not start at a multiple of
    ``alignment`` bytes (empty: every tensor can be memory-mapped; a file without external data has none)."""
    return [r for r in external_data_refs(path) if (r.offset or 0) % alignment]


def _walk(buf: mmap.mmap) -> list[ExternalRef]:
    refs: list[ExternalRef] = []
    stack = [("model", 0, len(buf))]
    while stack:
        kind, start, end = stack.pop()
        if kind == "tensor":
            refs += _tensor(buf, start, end)
            continue
        children = _CHILDREN[kind]
        for number, wire_type, a, b in _fields(buf, start, end):
            if wire_type == 2 and number in children:
                stack.append((children[number], a, b))
    return refs


def _tensor(buf: mmap.mmap, start: int, end: int) -> list[ExternalRef]:
    """The external references of one TensorProto: every `location` entry (a hostile file may repeat the key,
    so all are returned, not the one a particular reader would pick), or one None if it is EXTERNAL without.
    A repeated `offset` or `length` counts by its last value, as protobuf readers of maps do."""
    name, locations, numbers, external = "", [], {}, False
    for number, wire_type, a, b in _fields(buf, start, end):
        if number == _TENSOR_NAME and wire_type == 2:
            name = _text(buf, a, b)
        elif number == _TENSOR_EXTERNAL_DATA and wire_type == 2:
            external = True
            entry = {n: _text(buf, x, y) for n, w, x, y in _fields(buf, a, b) if w == 2}  # key = 1, value = 2
            if entry.get(1) == "location":
                locations.append(entry.get(2, ""))
            elif entry.get(1) in ("offset", "length"):
                numbers[entry[1]] = _number(entry.get(2, ""), name)
        elif number == _TENSOR_DATA_LOCATION and wire_type == 0 and a == _DATA_LOCATION_EXTERNAL:
            external = True
    if not external:
        return []
    offset, length = numbers.get("offset"), numbers.get("length")
    return [ExternalRef(name, loc, offset, length) for loc in locations] or [ExternalRef(name, None, offset, length)]


def _number(text: str, tensor: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 20):  # int() would take signs, spaces, "_"
        raise MalformedOnnxError(f"tensor {tensor!r}: external-data offset/length {text[:40]!r} is not a number")
    return int(text)


def _text(buf: mmap.mmap, start: int, end: int) -> str:
    try:
        return buf[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedOnnxError(f"a string at byte {start} is not UTF-8") from None


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedOnnxError(f"bad varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: mmap.mmap, pos: int, end: int):
    """Yield (field number, wire type, a, b): a = the value for varints, (a, b) = the byte span for
    length-delimited fields; fixed-width fields are skipped."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos, end)
            yield number, 0, value, None
            continue
        if wire_type == 2:
            length, pos = _varint(buf, pos, end)
            start, pos = pos, pos + length
            if pos > end:
                raise MalformedOnnxError(f"field {number} at byte {start} runs past its message")
            yield number, 2, start, pos
            continue
        if wire_type not in (1, 5):  # 3/4 are protobuf groups, which ONNX never uses
            raise MalformedOnnxError(f"wire type {wire_type} at byte {pos} is not used by ONNX")
        pos += 8 if wire_type == 1 else 4
        if pos > end:
            raise MalformedOnnxError(f"fixed-width field {number} runs past its message")
