"""Peak resident memory of fetching a graph's activations for calibration (`calib.activations.Exposer`), with and
without a budget, on a chain of MatMuls whose every output is exposed.

    python -m benchmarks.calib_memory [--rows 8192 --width 1024 --layers 24 --budget-mib 100 --out JSON]

ONNX Runtime keeps every graph output of a run alive until the run ends, so one session exposing all the
tensors holds them all; the budgeted run gives each chunk its own session. Each case runs in a fresh process
(the kernel's high-water mark is per process).
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.calib_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--budget-mib", type=float, default=100.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = run(args.rows, args.width, args.layers, args.budget_mib)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
