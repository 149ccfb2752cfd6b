"""Peak memory of the Qwen2.5-VL vision encoder against the images of one request, attention fused
(`MultiHeadAttention` over a batch of windows/frames, what an onnxruntime bundle ships) and decomposed (the same
batch as MatMul -> Softmax -> MatMul, what a TensorRT build parses).

    python -m benchmarks.vision_memory [--images 1,2,4,8,16] [--variants fused,decomposed] [--out JSON]

The tower is the full-size vision config (Qwen2.5-VL-7B's: hidden 1280, 16 heads, 112 px windows) cut to two
blocks, one windowed and one full attention, with random weights: per block its memory is the full tower's.
Every image is the runtime's full-size grid (`vision_tokens_per_image` 144: 12x12 merged tokens, 336 px, 576
patches, 9 windows). The graph is exported once and each point runs in a fresh process after a warm-up call
with one image; the figure is the run's peak resident memory over what the process held before it (weights
and the warm-up's arena included in the start). The fit reports the exponent of memory in patches (1: linear,
2: quadratic) over the upper half of the points.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.attention_memory import exponent
from benchmarks.env import fingerprint
from benchmarks.timing import in_fresh_process

FRAME = (24, 24)  # patches per side of one image: the runtime's full-size 12x12 merged-token square
DEPTH = 2  # block 0 windowed, block 1 full attention


def tower_config() -> dict:
    """The full-size vision config, cut to ``DEPTH`` blocks (the last one full attention)."""
    from metacanvas_deploy.mc_export.models.presets import get_preset

    vision = dict(get_preset("wan", "full").planner["vision_config"])
    return dict(vision, depth=DEPTH, fullatt_block_indexes=[DEPTH - 1])


def images_grid(images: int) -> list[list[int]]:
    return [[1, *FRAME]] * images


def export_graphs(out: Path, variants=("fused", "decomposed")) -> dict[str, Path]:
    """The tower exported once per variant into ``out``; the vision config next to it for the points."""
    import torch
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from metacanvas_deploy.mc_export.export.qwen_vision import export_vision_encoder

    config = tower_config()
    (out / "vision_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLVisionConfig(**config)).eval()
    paths = {}
    for name in variants:
        paths[name] = out / f"vision-{name}.onnx"
        export_vision_encoder(visual, paths[name], images_grid(2), fused_attention=name == "fused")
    return paths


def _case(path: Path, images: int) -> dict:
    """One point, in this process: a warm-up run with one image, then the measured run with ``images``."""
    import onnxruntime as ort

    from metacanvas_deploy.mc_export.export.qwen_vision import example_inputs
    from metacanvas_deploy.runtime.memory import rss_phase, status_kb

    config = json.loads((path.parent / "vision_config.json").read_text())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, example_inputs(images_grid(1), config))
    feeds = example_inputs(images_grid(images), config)
    with rss_phase() as mem:
        start = (status_kb("VmRSS") or 0) / 1024.0
        session.run(None, feeds)
    patches = images * FRAME[0] * FRAME[1]
    return {"images": images, "tokens": patches, "peak_over_start_mib": round(mem["peak_mb"] - start, 1),
            "scope": mem["scope"]}


def measure(path: Path, images: list[int]) -> dict:
    """Every point of one graph, each in a fresh process."""
    points = []
    for n in images:
        points.append(in_fresh_process("benchmarks.vision_memory", "_case", path, n))
    return {"points": points, "exponent": round(exponent(points), 2)}


def run(images: list[int], variants=("fused", "decomposed")) -> dict:
    result = {"tower": tower_config(), "frame_patches": list(FRAME), "environment": fingerprint(threads=0)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in export_graphs(Path(tmp), variants).items():
            result[name] = measure(path, images)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vision_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="1,2,4,8,16")
    ap.add_argument("--variants", default="fused,decomposed")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = run([int(n) for n in args.images.split(",")], tuple(args.variants.split(",")))
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    for name in ("fused", "decomposed"):
        if name in result:
            row = ", ".join(f"{p['images']} ({p['tokens']} patches): {p['peak_over_start_mib']:.0f} MiB"
                            for p in result[name]["points"])
            print(f"{name:<10} exponent {result[name]['exponent']:.2f}  ({row})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
