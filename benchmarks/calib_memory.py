"""Peak resident memory of calibration.

Fetching a graph's activations (`calib.activations.Exposer`), with and without a budget, on a chain of MatMuls
whose every output is exposed:

    python -m benchmarks.calib_memory [--rows 8192 --width 1024 --layers 24 --budget-mib 100 --out JSON]

ONNX Runtime keeps every graph output of a run alive until the run ends, so one session exposing all the
tensors holds them all; the budgeted run gives each chunk its own session.

The whole-graph pass against the block pass (`calib.blockwise`) on a preset's denoise stage (INT8 and FP8
recipes, calls drawn from the component spec):

    python -m benchmarks.calib_memory --passes sana [--preset small --calls 4 --out JSON]

The INT8 quantizer (ONNX Runtime's) on the same stage in the full-size layout (weights in external data), whole
and block by block (`calib.qdq`, ``by_block``), on the ranges of the INT8 pass, is measured there too.

Each case runs in a fresh process (the kernel's high-water mark is per process).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.timing import in_fresh_process


def chain(path: Path, width: int, layers: int) -> list[str]:
    """``layers`` chained identity MatMuls on (rows, width); returns the exposed tensor names."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = [f"t{i}" for i in range(layers)]
    nodes = [helper.make_node("MatMul", [x, "w"], [y]) for x, y in zip(["x", *names[:-1]], names)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
                              [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [None, width])],
                              [numpy_helper.from_array(np.eye(width, dtype=np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return names


def _case(path: Path, layers: int, rows: int, width: int, budget: int) -> dict:
    """One case, in this process: the peak over the resident memory at its start."""
    from metacanvas_deploy.calib.activations import Exposer
    from metacanvas_deploy.runtime.memory import rss_phase, status_kb

    feeds = [{"x": np.ones((rows, width), np.float32)}]
    with rss_phase() as mem:
        start = (status_kb("VmRSS") or 0) / 1024.0
        exposer = Exposer(path, [f"t{i}" for i in range(layers)], budget=budget, threads=1)
        values = sum(1 for _ in exposer(feeds))
    return {"budget_bytes": budget, "chunk_sessions": len(exposer.sessions) - 1, "values": values,
            "peak_over_start_mib": round(mem["peak_mb"] - start, 1), "scope": mem["scope"]}


def run(rows: int, width: int, layers: int, budget_mib: float) -> dict:
    exposed = rows * width * 4 * layers
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chain.onnx"
        chain(path, width, layers)
        cases = []
        for budget in (exposed * 2, int(budget_mib * 2**20)):
            cases.append(in_fresh_process("benchmarks.calib_memory", "_case", path, layers, rows, width, budget))
    return {"rows": rows, "width": width, "layers": layers, "exposed_bytes": exposed,
            "unbounded": cases[0], "budgeted": cases[1]}


def _pass_case(raw: Path, backbone: str, fmt: str, mode: str, calls: int, preset: str) -> dict:
    """One calibration pass over the stage at ``raw``, in this process: peak resident memory over the start (the
    prepared graph written, the calls in memory), and the time it took."""
    import dataclasses
    import time

    from metacanvas_deploy.calib import blockwise
    from metacanvas_deploy.calib.quantize import calibrate, prepare
    from metacanvas_deploy.mc_export.backbones import recipe_for_backbone
    from metacanvas_deploy.runtime.memory import rss_phase, status_kb

    recipe = dataclasses.replace(recipe_for_backbone(backbone, fmt), calibration_pass=mode)
    feeds = [np.load(f) for f in sorted(raw.parent.glob("call*.npz"))][:calls]
    feeds = [dict(f) for f in feeds]
    prepared, _, nodes = prepare(raw, raw.with_name(f"{mode}.{fmt}.prepared.onnx"), recipe, feeds)
    start = (status_kb("VmRSS") or 0) / 1024.0
    t0 = time.perf_counter()
    with rss_phase() as mem:
        if mode == "whole":
            calibrate(prepared, nodes, feeds, recipe, raw.with_name(f"{mode}.{fmt}.json"))
        else:
            state = blockwise.open_state(raw.with_name(f"state.{fmt}"), blockwise.identity(recipe, raw, preset))
            blockwise.block_calibrate(prepared, nodes, feeds, recipe, raw.with_name(f"{mode}.{fmt}.json"), state,
                                      measure_sensitivity=False)
    return {"format": fmt, "pass": mode, "calibration": recipe.calibration, "layers": len(nodes),
            "seconds": round(time.perf_counter() - t0, 1), "start_mib": round(start, 1),
            "peak_over_start_mib": round(mem["peak_mb"] - start, 1), "scope": mem["scope"]}


def _quantize_case(raw: Path, backbone: str, by_block: bool) -> dict:
    """ONNX Runtime's INT8 quantizer over the stage in the full-size file layout (weights in external data, as a
    lazy export writes them) with the INT8 pass's ranges, in this process."""
    import time

    from metacanvas_deploy.calib.qdq import quantize_model
    from metacanvas_deploy.calib.quantize import prepare
    from metacanvas_deploy.calib.quiet import quiet_quantizer
    from metacanvas_deploy.mc_export.backbones import recipe_for_backbone
    from metacanvas_deploy.runtime.memory import rss_phase, status_kb

    recipe = recipe_for_backbone(backbone, "int8")
    # the lazy copy itself: its weights are external with nothing to fold, so there is nothing to prepare
    prepared, _, nodes = prepare(raw.with_name("lazy.onnx"), raw.with_name(f"lazy.{by_block}.prepared.onnx"), recipe,
                                 [])
    start = (status_kb("VmRSS") or 0) / 1024.0
    t0 = time.perf_counter()
    with rss_phase() as mem, quiet_quantizer():
        quantize_model(prepared, raw.with_name(f"q.{by_block}.onnx"), recipe, nodes,
                       raw.with_name("whole.int8.json"), by_block=by_block)
    return {"quantize": "block" if by_block else "whole", "layers": len(nodes),
            "seconds": round(time.perf_counter() - t0, 1), "start_mib": round(start, 1),
            "peak_over_start_mib": round(mem["peak_mb"] - start, 1), "scope": mem["scope"]}


def run_passes(backbone: str, preset: str, calls: int) -> dict:
    """The whole-graph and the block pass, INT8 and FP8, on ``backbone``'s ``preset`` denoise stage; the ranges of
    the two passes compared too (equal, as tests/test_calib_blockwise.py asserts at tiny size)."""
    import onnx

    from metacanvas_deploy.calib.external_data import save_aligned
    from metacanvas_deploy.calib.graph import fold_weight_transposes
    from metacanvas_deploy.calib.ranges import load_ranges
    from metacanvas_deploy.mc_export.build import resolve_ranges
    from metacanvas_deploy.mc_export.export.onnx_export import export_component
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
    from metacanvas_deploy.mc_export.stages import plan_stages

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "denoise.raw.onnx"
        model = MetaCanvas.from_preset(backbone, preset, seed=0, random_canvas=True)
        comp = plan_stages(model, resolve_ranges(model, ()))["denoise"]
        export_component(comp, raw)
        weights = sum(p.numel() * 4 for p in comp.module().parameters())
        del model, comp
        comp_calls = MetaCanvas.from_preset(backbone, preset, seed=0, random_canvas=True)
        comp = plan_stages(comp_calls, resolve_ranges(comp_calls, ()))["denoise"]
        for i in range(calls):
            np.savez(Path(tmp) / f"call{i:03d}.npz", **comp.sample_inputs("opt", seed=i))
        del comp_calls, comp
        cases, equal = [], {}
        for fmt in ("fp8", "int8"):
            for mode in ("whole", "block"):
                cases.append(in_fresh_process("benchmarks.calib_memory", "_pass_case", raw, backbone, fmt, mode,
                                              calls, preset))
            whole, block = (load_ranges(Path(tmp) / f"{m}.{fmt}.json") for m in ("whole", "block"))
            equal[fmt] = whole.keys() == block.keys() and all(
                np.array_equal(whole[t].range_value, block[t].range_value) for t in whole)
        save_aligned(fold_weight_transposes(onnx.load(str(raw))), Path(tmp) / "lazy.onnx")  # the full-size layout
        quantize = [in_fresh_process("benchmarks.calib_memory", "_quantize_case", raw, backbone, by_block)
                    for by_block in (False, True)]
        equal["int8_quantized_graphs"] = same_graph(raw.with_name("q.False.onnx"), raw.with_name("q.True.onnx"))
    return {"backbone": backbone, "preset": preset, "calls": calls, "stage_weights_mib": round(weights / 2**20, 1),
            "cases": cases, "quantize": quantize, "equal": equal}


def same_graph(a: Path, b: Path) -> bool:
    """The same nodes (op, inputs, outputs; the order may differ where the graph allows) and the same
    initializers, bit for bit: the same computation."""
    import onnx
    from onnx import numpy_helper

    ga, gb = (onnx.load(str(p)).graph for p in (a, b))
    nodes = [sorted((n.op_type, n.domain, tuple(n.input), tuple(n.output)) for n in g.node) for g in (ga, gb)]
    wa, wb = ({t.name: numpy_helper.to_array(t) for t in g.initializer} for g in (ga, gb))
    return nodes[0] == nodes[1] and wa.keys() == wb.keys() and all(
        wa[k].dtype == wb[k].dtype and np.array_equal(wa[k], wb[k]) for k in wa)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.calib_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--budget-mib", type=float, default=100.0)
    ap.add_argument("--passes", metavar="BACKBONE", help="whole-graph vs block calibration on BACKBONE's denoise stage")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.passes:
        result = run_passes(args.passes, args.preset, args.calls)
    else:
        result = run(args.rows, args.width, args.layers, args.budget_mib)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
