"""Markdown from benchmark JSON: one run, or two runs side by side (ratios B/A per row), with the targets.

Targets are values (`TARGETS`): a metric's path in a result, a direction and a limit. A result is judged on the
targets whose metric it holds; each verdict says pass or miss and by how much relative to the limit. The
targets are stated for the `small` preset at 2 threads: a result measured otherwise is judged all the same and
marked indicative. A compare result that misses a target shows its engines' per-operator profiles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from benchmarks.errors import BenchmarkError

TARGET_PRESET, TARGET_THREADS = "small", 2


@dataclass(frozen=True)
class Target:
    """``metric`` (a key path in a result) must be <= or >= ``limit`` (``op``); ``unit``: "x" or "%"."""

    name: str
    metric: tuple[str, ...]
    op: str
    limit: float
    unit: str


TARGETS = (
    Target("ORT fp32 denoise step / PyTorch eager", ("ratios", "ort_fp32/torch_eager"), "<=", 0.8, "x"),
    Target("ORT fp32 denoise step / torch.compile", ("ratios", "ort_fp32/torch_compile"), "<=", 1.0, "x"),
    Target("INT8 denoise step / PyTorch eager fp32", ("ratios", "ort_int8/torch_eager"), "<=", 0.55, "x"),
    Target("runtime overhead, % of engine time", ("overhead", "pct_of_engine"), "<=", 2.0, "%"),
    Target("fp32 denoise step FLOP/s, % of fp32 GEMM peak", ("efficiency", "ort_fp32", "pct_of_peak"), ">=", 60.0,
           "%"),
)


@dataclass(frozen=True)
class Verdict:
    """A target judged on one value. ``margin_pct``: the headroom relative to the limit, positive when it
    passes (how far below a <= limit / above a >= limit), negative when it misses."""

    target: Target
    value: float

    @property
    def passed(self) -> bool:
        return self.value <= self.target.limit if self.target.op == "<=" else self.value >= self.target.limit

    @property
    def margin_pct(self) -> float:
        sign = 1.0 if self.target.op == "<=" else -1.0
        return sign * 100.0 * (self.target.limit - self.value) / self.target.limit

    def text(self) -> str:
        """How it went and by how much, absolute in the target's unit and relative to the limit:
        "miss: 0.05x over the limit (6.2% relative)", "pass: 12.0 pp above the floor (20.0% relative)"."""
        t = self.target
        if t.op == "<=":
            side, bound = ("under" if self.passed else "over"), "limit"
        else:
            side, bound = ("above" if self.passed else "below"), "floor"
        diff = abs(self.value - t.limit)
        amount = f"{diff:.2f}x" if t.unit == "x" else f"{diff:.1f} pp"
        verdict = "pass" if self.passed else "miss"
        return f"{verdict}: {amount} {side} the {bound} ({abs(self.margin_pct):.1f}% relative)"


def _lookup(result: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def verdicts(result: dict) -> list[Verdict]:
    """The verdict of every target whose metric the result holds, in `TARGETS` order."""
    return [Verdict(t, float(v)) for t in TARGETS if (v := _lookup(result, t.metric)) is not None]


def _fmt(value: float, unit: str) -> str:
    return f"{value:.2f}x" if unit == "x" else f"{value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _env_line(result: dict) -> str:
    """One line: machine, threads, load, versions, commit, date, model."""
    e, c = result["env"], result.get("config", {})
    git = (e.get("git") or {}).get("commit", "?")[:10]
    load = f"load {e['load_average'][0]:.1f}" if e.get("load_average") else "load ?"
    return (f"{e['cpu']['model']} ({e['cpu']['logical_cpus']} logical CPUs, {load}), {e['threads']} threads, GPU "
            f"{e['gpu']}, onnxruntime {e['versions'].get('onnxruntime')}, torch {e['versions'].get('torch', '-')}, "
            f"git {git}, {e['date']}; {c.get('backbone', '?')} ({c.get('preset', '?')})")


def _indicative(result: dict) -> str | None:
    c = result.get("config", {})
    if c.get("preset") == TARGET_PRESET and c.get("threads") == TARGET_THREADS:
        return None
    return (f"Targets are set for the {TARGET_PRESET} preset at {TARGET_THREADS} threads; this run is "
            f"{c.get('preset')} at {c.get('threads')} threads: verdicts are indicative only.")


def target_lines(result: dict) -> list[str]:
    """The targets table of one result ([] when it holds no target metric)."""
    judged = verdicts(result)
    if not judged:
        return []
    rows = [[v.target.name, f"{v.target.op} {_fmt(v.target.limit, v.target.unit)}", _fmt(v.value, v.target.unit),
             v.text()] for v in judged]
    note = _indicative(result)
    return ["## Targets", *([note, ""] if note else []), *_table(["target", "limit", "measured", "verdict"], rows)]


def _row_cells(row: dict) -> list[str]:
    return [row["name"], f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}", str(row["runs"])]


def _compare_details(result: dict) -> list[str]:
    """FLOPs, peaks, efficiency, accuracy and compile times of a compare result."""
    fp32, int8 = result["peaks"]["fp32"], result["peaks"]["int8"]
    peaks = (f"FLOPs per step: {result['flops']['total'] / 1e9:.2f} GFLOP; measured peaks: fp32 "
             f"{fp32['ops_per_s'] / 1e9:.1f} GFLOP/s ({fp32['source']}), int8 {int8['ops_per_s'] / 1e9:.1f} GOP/s "
             f"({int8['source']}), n = {fp32['n']}.")
    rows = [[name, f"{eff['gflops']:.1f}", f"{eff['pct_of_peak']:.1f}%", f"{result['accuracy'][name]['cosine']:.6f}",
             f"{result['accuracy'][name]['max_rel']:.1e}", f"{result['first_call_s'][name]:.2f}"]
            for name, eff in result["efficiency"].items()]
    header = ["candidate", "GFLOP/s", "of peak", "cosine vs eager", "max_rel vs eager", "first call s"]
    return ["## Denoise step", peaks, "", *_table(header, rows)]


def _latency_details(result: dict) -> list[str]:
    """Overhead, the planner-once check and peak memory of a latency result."""
    o, mem, checks = result["overhead"], result["memory"], result["checks"]
    once = "once each: ok" if checks["planner_once"] else "NOT once per request"
    overhead = (f"Overhead (wall time - engine time): {o['per_request_ms']:.2f} ms per request, "
                f"{o['per_step_ms']:.3f} ms per step, {o['pct_of_engine']:.2f}% of engine time "
                f"(p90 {o['pct_of_engine_p90']:.2f}%); in the step loop {o['step_loop_per_step_ms']:.3f} ms per step, "
                f"outside it {o['outside_step_loop_ms']:.2f} ms per request.")
    memory = (f"Peak resident memory: load {mem['load']['peak_mb']:.0f} MiB, requests "
              f"{mem['requests']['peak_mb']:.0f} MiB (scope: {mem['requests']['scope']}); process lifetime "
              f"{mem['lifetime_peak_mb']:.0f} MiB.")
    lines = ["## Runtime", overhead, f"Planner calls per request: {checks['planner_calls_per_request']} ({once}).",
             memory]
    if result.get("not_exercised"):
        lines.append(f"Stages not exercised by task {result['config']['task']}: "
                     f"{', '.join(result['not_exercised'])} (choose another with --task).")
    return lines


def profile_lines(result: dict) -> list[str]:
    """The per-operator profiles of a compare result's engines (top op types by time per run)."""
    lines = []
    for name, prof in result.get("profiles", {}).items():
        rows = [[op["op_type"], f"{op['ms_per_run']:.2f}", f"{op['pct_of_run']:.1f}%", f"{op['calls_per_run']:g}"]
                for op in prof["top_ops"]]
        title = (f"### Where the time goes: {name} ({prof['run_ms']:.1f} ms per run, ONNX Runtime profile over "
                 f"{prof['runs']} runs)")
        lines += ["", title, *_table(["op type", "ms per run", "of run", "calls per run"], rows)]
    return lines


def render(result: dict) -> str:
    """Markdown for one result: environment, the rows, the kind's details, targets, and on a miss the profiles."""
    lines = [f"# {result['kind']}", _env_line(result), "",
             *_table(["row", "p50 ms", "p90 ms", "runs"], [_row_cells(r) for r in result["rows"]]), ""]
    if result["kind"] == "compare":
        lines += _compare_details(result) + [""]
    if result["kind"] == "latency":
        lines += _latency_details(result) + [""]
    lines += target_lines(result)
    if any(not v.passed for v in verdicts(result)):
        lines += profile_lines(result)
    return "\n".join(lines).rstrip() + "\n"


def _env_differences(a: dict, b: dict) -> list[str]:
    ea, eb = a["env"], b["env"]
    keys = {"cpu model": lambda e: e["cpu"]["model"], "threads": lambda e: e["threads"],
            "gpu": lambda e: e["gpu"], "versions": lambda e: e["versions"],
            "git": lambda e: (e.get("git") or {}).get("commit")}
    return [f"{k}: {get(ea)} -> {get(eb)}" for k, get in keys.items() if get(ea) != get(eb)]


def render_comparison(a: dict, b: dict) -> str:
    """Markdown comparing run B with run A: rows matched by name with B/A ratios of p50 and p90, the target
    verdicts of both, and what differs in their environments."""
    by_name = {r["name"]: r for r in a["rows"]}
    rows = [[r["name"], f"{by_name[r['name']]['p50_ms']:.2f}", f"{r['p50_ms']:.2f}",
             f"{r['p50_ms'] / by_name[r['name']]['p50_ms']:.3f}",
             f"{r['p90_ms'] / by_name[r['name']]['p90_ms']:.3f}"] for r in b["rows"] if r["name"] in by_name]
    lines = [f"# {b['kind']}: B vs A", f"A: {_env_line(a)}", f"B: {_env_line(b)}", ""]
    diff = _env_differences(a, b)
    if diff:
        lines += ["Environments differ: " + "; ".join(diff), ""]
    lines += _table(["row", "A p50 ms", "B p50 ms", "B/A p50", "B/A p90"], rows)
    only = sorted({r["name"] for r in a["rows"]} ^ {r["name"] for r in b["rows"]})
    if only:
        lines += ["", "In one run only: " + ", ".join(only)]
    va, vb = {v.target.name: v for v in verdicts(a)}, {v.target.name: v for v in verdicts(b)}
    judged = [t for t in TARGETS if t.name in va or t.name in vb]
    if judged:
        def cell(v) -> str:
            return f"{_fmt(v.value, v.target.unit)}, {v.text()}" if v else "-"

        lines += ["", "## Targets", *_table(["target", "limit", "A", "B"], [
            [t.name, f"{t.op} {_fmt(t.limit, t.unit)}", cell(va.get(t.name)), cell(vb.get(t.name))] for t in judged])]
    return "\n".join(lines).rstrip() + "\n"


def load_result(path: str | Path) -> dict:
    """A benchmark JSON; BenchmarkError if it is unreadable or not one of ours."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"cannot read benchmark result {path}: {e}") from e
    if not isinstance(result, dict) or not {"kind", "env", "rows"} <= set(result):
        raise BenchmarkError(f"{path} is not a benchmark result (needs kind, env and rows)")
    return result
