"""ONNX external data laid out for memory mapping: every tensor in a `.onnx.data` file starts at a multiple of
`ALIGNMENT` (64 KiB; why in `runtime.onnx_external_data`), so that ONNX Runtime maps the weights from the file
instead of reading them into private memory (`runtime.engine`'s mapped sessions).

Three writers make the compiler's data files, and each is aligned here:
- onnx (`save_aligned`, for `calib.graph.save_model`): writes the tensors itself, each at its aligned offset,
  then lets onnx write the graph. onnx's own `save(save_as_external_data=True)` packs them densely.
- onnx-ir (the exporter, `mc_export.export.onnx_export`): `ir_save(..., **IR_SAVE_ALIGNED)`.
- ONNX Runtime's offline optimiser (`calib.graph.optimize_for_ort`): it aligns only tensors past 1 MiB, and to
  4 KiB; `realign` moves every tensor to its aligned offset in place, streaming (no second copy of the file,
  at most `CHUNK_BYTES` in memory).
Each ends with `check_aligned`, which raises `ExternalDataError` naming any tensor that is not aligned.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx.external_data_helper import ExternalDataInfo, set_external_data

from metacanvas_deploy.calib.errors import ExternalDataError
from metacanvas_deploy.runtime.onnx_external_data import EXTERNAL_DATA_ALIGNMENT, misaligned

ALIGNMENT = EXTERNAL_DATA_ALIGNMENT
# Smaller tensors stay in the graph (ONNX Runtime's optimiser is given the same threshold): padding a 1 KiB bias
# to 64 KiB would cost more than mapping it saves.
MIN_EXTERNAL_BYTES = 1024
CHUNK_BYTES = 64 << 20
# onnx-ir's save options that align every external tensor (`align_threshold` 0: no size is exempt).
IR_SAVE_ALIGNED = {"size_threshold_bytes": MIN_EXTERNAL_BYTES, "alignment": ALIGNMENT, "align_threshold": 0}


def ir_save(model, path: Path, **kwargs) -> None:
    """`onnx_ir.save`, raising what a lazy tensor raised while it was written (a checkpoint read that failed, a
    value refused by name) instead of onnx-ir's wrappers around it, so the user gets that one line."""
    import onnx_ir as ir

    try:
        ir.save(model, str(path), **kwargs)
    except ir.serde.SerdeError as error:
        cause = error
        while isinstance(cause, ir.serde.SerdeError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is error:
            raise
        raise cause from error


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of ``graph`` and of its subgraphs (If/Loop/Scan bodies), as onnx externalises them."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _initializers(g)


def save_aligned(model: onnx.ModelProto, path: Path, base_dir: Path | Mapping[str, Path] | None = None
                 ) -> Path | None:
    """Write ``model`` to ``path`` and every initializer of at least `MIN_EXTERNAL_BYTES` to ``<path>.data``, each
    at an aligned offset. Each tensor's bytes leave ``model`` as they are written. With ``base_dir``, tensors
    that still live in another file's external data (a graph loaded without its weights) are copied over one at a
    time: ``base_dir`` is the folder their locations are relative to, or a mapping from each location to its
    folder (a graph stitched from files in several folders). Returns the data file (None when no tensor is that
    large: then there is none)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        for tensor in _initializers(model.graph):
            if base_dir is not None and tensor.data_location == onnx.TensorProto.EXTERNAL:
                raw = tensor.raw_data = _read_external(tensor, base_dir)  # one tensor in memory
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
            elif not tensor.HasField("raw_data") or len(tensor.raw_data) < MIN_EXTERNAL_BYTES:
                continue
            else:
                raw = tensor.raw_data
            offset = _aligned(f.tell())
            f.write(b"\0" * (offset - f.tell()))
            f.write(raw)
            set_external_data(tensor, data.name, offset, len(raw))
            tensor.ClearField("raw_data")
        written = f.tell()
    if not written:
        data.unlink()
    onnx.save_model(model, str(path))  # the graph only: no tensor holds raw data and an external location now
    check_aligned(path)
    return data if written else None


def _read_external(tensor: onnx.TensorProto, base_dir: Path | Mapping[str, Path]) -> bytes:
    info = ExternalDataInfo(tensor)
    folder = Path(base_dir) if not isinstance(base_dir, Mapping) else base_dir.get(info.location)
    if folder is None:
        raise ExternalDataError(f"tensor {tensor.name!r} lives in {info.location}, a file none of the folders "
                                f"given holds ({', '.join(sorted(base_dir))})")
    with open(folder / info.location, "rb") as f:
        f.seek(info.offset or 0)
        raw = f.read(info.length) if info.length is not None else f.read()
    if info.length is not None and len(raw) != info.length:
        raise ExternalDataError(f"{info.location} ends before tensor {tensor.name!r} does; rebuild the stage")
    return raw


def realign(path: Path) -> None:
    """Move every external tensor of the ONNX file at ``path`` (all in ``<path>.data``, as ONNX Runtime's
    optimiser writes them) to an aligned offset, in place, and rewrite the graph's offsets.

    Tensors move from the last to the first, each to an offset at or past its old one, so no tensor is
    overwritten before it has moved; a tensor's bytes move from its end backwards (memmove), in chunks. The gaps
    are zeroed. Not atomic: call it on a file that is not published yet (a build's scratch or staging folder)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    tensors = [t for t in _initializers(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    infos = [ExternalDataInfo(t) for t in tensors]
    others = sorted({i.location for i in infos} - {data.name})
    if others or any(i.length is None for i in infos):
        raise ExternalDataError(f"{path.name}: expected every external tensor in {data.name} with a length, found "
                                f"locations {others or [data.name]}; rebuild the stage")
    order = sorted(range(len(tensors)), key=lambda k: infos[k].offset or 0)
    plan, old_end, end = [], 0, 0  # plan: (tensor, old offset, new offset, length), ascending
    for k in order:
        old, length = infos[k].offset or 0, infos[k].length
        if old < old_end:
            raise ExternalDataError(f"{path.name}: tensor {tensors[k].name!r} overlaps the one before it in "
                                    f"{data.name} (offset {old} < {old_end}); rebuild the stage")
        new = _aligned(max(end, old))
        plan.append((tensors[k], old, new, length))
        old_end, end = old + length, new + length
    with open(data, "r+b") as f:
        for _, old, new, length in reversed(plan):
            if new != old:
                _move(f, old, new, length)
        start = 0
        for _, _, new, length in plan:
            f.seek(start)
            f.write(b"\0" * (new - start))
            start = new + length
        f.truncate(start)
    for tensor, _, new, _ in plan:
        _set_offset(tensor, new)
    onnx.save_model(model, str(path))
    check_aligned(path)


def _move(f: BinaryIO, src: int, dst: int, length: int) -> None:
    """Copy ``length`` bytes from ``src`` to ``dst`` >= ``src`` in the open file, the last chunk first."""
    done = length
    while done:
        n = min(CHUNK_BYTES, done)
        done -= n
        f.seek(src + done)
        chunk = f.read(n)
        if len(chunk) != n:
            raise ExternalDataError(f"external data ends at byte {src + done + len(chunk)}, before the end of the "
                                    f"tensor at {src} ({length} bytes); rebuild the stage")
        f.seek(dst + done)
        f.write(chunk)


def _set_offset(tensor: onnx.TensorProto, offset: int) -> None:
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(offset)
            return
    tensor.external_data.add(key="offset", value=str(offset))


def check_aligned(path: Path) -> None:
    """Raise ExternalDataError unless every external tensor of the ONNX file at ``path`` starts at a multiple of
    `ALIGNMENT` (then ONNX Runtime can map it on every platform)."""
    bad = misaligned(path, ALIGNMENT)
    if bad:
        names = ", ".join(f"{r.tensor} at {r.offset}" for r in bad[:5])
        raise ExternalDataError(f"{Path(path).name}: {len(bad)} external tensors are not aligned to {ALIGNMENT} "
                                f"bytes ({names}{', ...' if len(bad) > 5 else ''}); ONNX Runtime cannot map them "
                                "on every platform. Write the file with calib.external_data (save_aligned, realign)")
