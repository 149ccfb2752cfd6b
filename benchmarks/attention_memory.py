"""Peak memory of one DiT denoise step against its token count, with attention fused (`MultiHeadAttention`, what an
onnxruntime bundle ships) and decomposed (MatMul -> Softmax -> MatMul, what the exporter writes by default).

    python -m benchmarks.attention_memory [--backbone wan] [--tokens 1024,2048,4096,8192,16384] [--out JSON]

The step is the backbone's real denoise stage (tiny preset: its attention is a large share of the memory at these
lengths, as it is at full size), exported both ways with ranges wide enough for the largest point, and run once
per point in a fresh process after a warm-up call at the smallest point; the figure is the run's peak resident
memory over what the process held before it. The fit reports the exponent of memory in tokens (1: linear, 2:
quadratic) over the upper half of the points.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.env import fingerprint
from benchmarks.timing import in_fresh_process


def _grid(tokens: int) -> tuple[int, int]:
    """(h_tok, w_tok) with h_tok * w_tok == tokens, as square as possible."""
    h = int(math.isqrt(tokens))
    while tokens % h:
        h -= 1
    return h, tokens // h


def export_steps(backbone: str, max_tokens: int, out: Path, variants=("fused", "decomposed")) -> dict[str, Path]:
    """The denoise stage exported fused and decomposed, its ranges covering ``max_tokens`` on one frame."""
    from metacanvas_deploy.mc_export.build import resolve_ranges
    from metacanvas_deploy.mc_export.export.onnx_export import export_component
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
    from metacanvas_deploy.mc_export.stages import plan_stages

    model = MetaCanvas.from_preset(backbone, "tiny", seed=0, random_canvas=True)
    side = model.adapter.size_multiple * max(_grid(max_tokens))
    ranges = resolve_ranges(model, (("height", (model.adapter.size_multiple, side // 2, side)),
                                    ("width", (model.adapter.size_multiple, side // 2, side))))
    comp = plan_stages(model, ranges)["denoise"]
    paths = {}
    for name in variants:
        paths[name] = out / f"denoise-{name}.onnx"
        export_component(comp, paths[name], fused_attention=name == "fused")
    # what a point needs to make its inputs: the specs, and every symbol's opt value (the grid is bound per point)
    (out / "inputs.json").write_text(json.dumps({"inputs": [t.to_dict() for t in comp.spec.inputs],
                                                 "opt": {n: r.opt for n, r in comp.spec.dims.items()}}))
    return paths


def _case(path: Path, tokens: int, warmup_tokens: int) -> dict:
    """One point, in this process: a warm-up run at ``warmup_tokens``, then the measured run."""
    import onnxruntime as ort

    from metacanvas_deploy.mc_export.components.spec import random_tensor
    from metacanvas_deploy.runtime.backbones.common import shape_of
    from metacanvas_deploy.runtime.memory import rss_phase, status_kb
    from metacanvas_deploy.runtime.tensor_spec import TensorSpec

    meta = json.loads((path.parent / "inputs.json").read_text())
    specs = [TensorSpec.from_dict(t) for t in meta["inputs"]]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def feeds(n: int) -> dict:
        h, w = _grid(n)
        bind = {**meta["opt"], "latent_frames": 1, "h_tok": h, "w_tok": w}
        rng = np.random.default_rng(0)
        return {s.name: random_tensor(s, shape_of(s, bind), rng) for s in specs}

    session.run(None, feeds(warmup_tokens))
    f = feeds(tokens)
    with rss_phase() as mem:
        start = (status_kb("VmRSS") or 0) / 1024.0
        session.run(None, f)
    return {"tokens": tokens, "peak_over_start_mib": round(mem["peak_mb"] - start, 1), "scope": mem["scope"]}


def exponent(points: list[dict]) -> float:
    """Least-squares slope of log(memory) over log(tokens), upper half of the points."""
    upper = points[len(points) // 2:]
    x = np.log([p["tokens"] for p in upper])
    y = np.log([max(p["peak_over_start_mib"], 1e-3) for p in upper])
    return float(np.polyfit(x, y, 1)[0])


def run(backbone: str, tokens: list[int], variants=("fused", "decomposed")) -> dict:
    result = {"backbone": backbone, "environment": fingerprint(threads=0)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_steps(backbone, max(tokens), Path(tmp), variants)
        for name, path in paths.items():
            points = []
            for n in tokens:
                points.append(in_fresh_process("benchmarks.attention_memory", "_case", path, n, min(tokens)))
            result[name] = {"points": points, "exponent": round(exponent(points), 2)}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.attention_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="wan", choices=["wan", "flux"])
    ap.add_argument("--tokens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--variants", default="fused,decomposed",
                    help="which graphs to measure; the decomposed one needs ~19 GB at 8192 tokens on the tiny Wan")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = run(args.backbone, [int(t) for t in args.tokens.split(",")], tuple(args.variants.split(",")))
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    for name in result.keys() - {"backbone", "environment"}:
        row = ", ".join(f"{p['tokens']}: {p['peak_over_start_mib']:.0f} MiB" for p in result[name]["points"])
        print(f"{name:<10} exponent {result[name]['exponent']:.2f}  ({row})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
