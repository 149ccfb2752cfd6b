"""ONNX export of the one-chunk Wan VAE modules (`wan_vae_stream`): two graphs per direction, first and rest.

Each graph is dynamic in batch and in the latent grid (`latent_height`, `latent_width`); the video's and every
cache's spatial dims are derived from it (`16 * latent_height`, `factor * latent_height`), so one file serves
any resolution that the VAE accepts (multiples of 16 pixels) and, being one chunk, any frame count. Frame
counts are static per graph (first: 1 latent / 1 pixel frame; rest: 1 latent / 4 pixel frames).
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from metacanvas_deploy.mc_export.errors import MetaCanvasError
from metacanvas_deploy.mc_export.export.wan_vae_stream import (
    CHUNK_FRAMES,
    WanStreamingDecoder,
    WanStreamingEncoder,
    _Streaming,
)

OPSET = 20
TWO_GB = 2**31 - 2**20  # protobuf's limit on one file, less a margin for the graph


class StreamExportError(MetaCanvasError):
    """A streaming VAE graph that failed to export or holds a tensor type a target rejects."""


def example_inputs(module: _Streaming, first: bool, batch: int = 2, latent_height: int = 2,
                   latent_width: int = 3, seed: int = 0) -> tuple:
    """Random inputs for one chunk, in `module.input_names(first)` order (sizes >= 2: export specialises 1)."""
    g = torch.Generator().manual_seed(seed)
    param = next(module.parameters())
    if isinstance(module, WanStreamingDecoder):
        x = torch.randn(batch, module.post_quant_conv.in_channels, 1, latent_height, latent_width, generator=g)
    else:
        frames, s = (1 if first else CHUNK_FRAMES), module.spatial
        x = torch.rand(batch, 3, frames, latent_height * s, latent_width * s, generator=g) * 2 - 1
    caches = () if first else tuple(torch.randn(slot.shape(batch, latent_height, latent_width), generator=g)
                                    for slot in module.slots)
    return tuple(t.to(param) for t in (x, *caches))


def _times(dim: Dim, factor: int):
    return dim if factor == 1 else dim * factor  # torch.export rejects the derived dim `1 * d`


def dynamic_shapes(module: _Streaming, first: bool) -> tuple:
    """torch.export dynamic shapes for `forward(chunk, *caches)`: (chunk, (cache, ...)) in `module.slots` order."""
    batch, lh, lw = Dim("batch"), Dim("latent_height"), Dim("latent_width")
    scale = 1 if isinstance(module, WanStreamingDecoder) else module.spatial  # latents or pixels
    chunk = {0: batch, 3: _times(lh, scale), 4: _times(lw, scale)}
    if first:
        return (chunk,)
    return (chunk, tuple({0: batch, 3: _times(lh, s.factor), 4: _times(lw, s.factor)} for s in module.slots))


def export_chunk_graph(module: _Streaming, path, first: bool, opset: int = OPSET, optimize: bool = True) -> float:
    """Export the chunk-0 (`first=True`) or later-chunk graph of `module` (set to eval mode) to `path`.

    Names: inputs `module.input_names(first)`, outputs `module.output_names()` (`past.<slot>` is fed from the
    previous call's `present.<slot>`). Weights go to `<path>.data` when they pass protobuf's 2 GB. Returns the
    export's wall seconds. Raises StreamExportError if the graph holds DOUBLE tensors (TensorRT rejects them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > TWO_GB
    start = time.perf_counter()
    # FakeTensor's dispatch cache costs more than it saves here: rebuilding cached outputs with symbolic 5-D
    # shapes made the export ~1.5x slower (torch 2.13, tiny decoder: 48 s -> 32 s of CPU without it).
    with torch.no_grad(), torch._dynamo.config.patch(fake_tensor_cache_enabled=False), warnings.catch_warnings():
        # every cache of one resolution level shares a size (`2*latent_height`...); the exporter warns per axis
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        torch.onnx.export(module.eval(), example_inputs(module, first), str(path), dynamo=True, verbose=False,
                          opset_version=opset, external_data=external, input_names=module.input_names(first),
                          output_names=module.output_names(), dynamic_shapes=dynamic_shapes(module, first),
                          optimize=optimize)
    seconds = time.perf_counter() - start
    model = onnx.load(str(path), load_external_data=False)  # external tensors keep their (relative) references
    if _name_latent_grid(model, module):
        onnx.save(model, str(path))
    doubles = double_tensors(model)
    if doubles:
        raise StreamExportError(f"{path}: DOUBLE tensors {doubles[:5]} (TensorRT rejects float64); "
                                f"find the float64 source in the module and compute it in float32")
    return seconds


def _name_latent_grid(model: onnx.ModelProto, module: _Streaming) -> bool:
    """Name the latent grid's symbols `latent_height` / `latent_width` wherever the exporter left bare ones.

    The encoder's chunk-0 graph sees only `16*latent_height` (the video) as an input dim, so the exporter calls
    the root symbol `s38` in its outputs (`latents`, `8*s38`...). Returns whether anything was renamed.
    """
    graph = model.graph
    latent = graph.input[0] if isinstance(module, WanStreamingDecoder) else graph.output[0]  # (B, C, 1, h, w)
    dims = latent.type.tensor_type.shape.dim
    mapping = {d.dim_param: name for d, name in zip(dims[3:], ("latent_height", "latent_width"))
               if d.dim_param and d.dim_param != name}
    if not mapping:
        return False
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda m: mapping[m.group(1)], dim.dim_param)
    return True


def double_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of every float64 tensor in `model`: inputs, outputs, inferred values, initializers, Casts."""
    model = onnx.shape_inference.infer_shapes(model)
    graph, dbl = model.graph, onnx.TensorProto.DOUBLE
    names = [v.name for v in (*graph.input, *graph.output, *graph.value_info) if v.type.tensor_type.elem_type == dbl]
    names += [t.name for t in graph.initializer if t.data_type == dbl]
    for node in graph.node:
        for attr in node.attribute:
            if (attr.name == "to" and attr.i == dbl) or (attr.type == onnx.AttributeProto.TENSOR
                                                          and attr.t.data_type == dbl):
                names.append(node.name)
    return names


def export_streaming_vae(vae: torch.nn.Module, out_dir) -> dict[str, float]:
    """Write `{decoder,encoder}_{first,rest}.onnx` to `out_dir`; returns each file's export time in seconds."""
    out_dir = Path(out_dir)
    times = {}
    for module in (WanStreamingDecoder(vae), WanStreamingEncoder(vae)):
        for first in (True, False):
            name = f"{module.part}_{'first' if first else 'rest'}"
            times[name] = export_chunk_graph(module, out_dir / f"{name}.onnx", first)
    return times
