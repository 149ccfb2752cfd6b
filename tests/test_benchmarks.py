"""`python -m benchmarks`: behaviour against exact values. No test asserts anything about how fast something is."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.compare import CompareConfig
from benchmarks.errors import BenchmarkError
from benchmarks.flops import count_flops
from benchmarks.peak import gemm_model
from benchmarks.profile import aggregate_profile, profile_engine, top_ops
from benchmarks.report import TARGETS, Verdict, render, verdicts
from benchmarks.sweep import sweep_points
from benchmarks.timing import alternating_order, percentile, run_alternating, summarize
from metacanvas_deploy.runtime.memory import rss_phase

REPO = Path(__file__).resolve().parent.parent


# timing ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, q, expected", [
    ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([1.0, 2.0, 3.0, 4.0], 90, 3.7),
    ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
    ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
    ([7.0], 90, 7.0),
    ([10.0, 20.0, 30.0], 50, 20.0),
])
def test_percentile_known_lists(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected, abs=1e-12)
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)


def test_percentile_rejects_empty_and_bad_q():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_summarize_reports_milliseconds():
    s = summarize([0.001, 0.002, 0.003, 0.004])
    assert s == pytest.approx({"runs": 4, "p50_ms": 2.5, "p90_ms": 3.7, "mean_ms": 2.5, "min_ms": 1.0, "max_ms": 4.0})


def test_alternating_order_and_scheduler():
    assert alternating_order(["A", "B", "C"], 2) == ["A", "B", "C", "A", "B", "C"]
    calls = []
    candidates = {name: (lambda n=name: calls.append(n) or n) for name in ("A", "B", "C")}
    timed = run_alternating(candidates, runs=3, warmup=2, settle_s=0.0)
    assert calls == ["A", "A", "B", "B", "C", "C"] + ["A", "B", "C"] * 3  # warm-up per candidate, then rounds
    assert {n: (len(t.seconds), t.last, t.first_call_s is not None) for n, t in timed.items()} == {
        "A": (3, "A", True), "B": (3, "B", True), "C": (3, "C", True)}
    with pytest.raises(ValueError, match="runs must be"):
        run_alternating(candidates, runs=0, warmup=0)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="phase-scoped peaks need Linux /proc")
def test_rss_phase_sees_an_allocation_inside_the_phase():
    with rss_phase() as before:
        pass
    with rss_phase() as during:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert during["scope"] == "phase"
    assert during["peak_mb"] >= before["peak_mb"] + 60


# FLOPs and peaks ---------------------------------------------------------------------------------------------
def test_flops_of_linear_and_matmul_are_exact():
    m, k, n = 4, 8, 16
    linear = count_flops(torch.nn.Linear(k, n), [torch.randn(m, k)])
    assert linear == {"total": 2 * m * n * k, "by_op": {"aten.addmm": 2 * m * n * k}}

    class MatMul(torch.nn.Module):
        def forward(self, a, b):
            return a @ b

    assert count_flops(MatMul(), [torch.randn(m, k), torch.randn(k, n)])["total"] == 2 * m * n * k


def test_int8_gemm_model_computes_uint8_times_int8():
    import onnxruntime as ort
    from onnx import load_from_string, numpy_helper

    raw = gemm_model("int8", 8)
    b = numpy_helper.to_array(load_from_string(raw).graph.initializer[0]).astype(np.int32)
    a = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    y = ort.InferenceSession(raw, providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    np.testing.assert_array_equal(y, a.astype(np.int32) @ b)
    with pytest.raises(ValueError, match="fp32 or int8"):
        gemm_model("fp16", 8)


# op profile --------------------------------------------------------------------------------------------------
def _node(op: str, ts: int, dur: int) -> dict:
    return {"cat": "Node", "name": f"n_{op}_{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_profile_aggregation_drops_the_warm_up_run():
    events = [
        _node("MatMul", 0, 900),  # warm-up run: ignored
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 1000},
        _node("MatMul", 1000, 300), _node("Add", 1400, 100), _node("MatMul", 1600, 200),
        {"cat": "Session", "name": "model_run", "ts": 1000, "dur": 1000},
        _node("MatMul", 2000, 500), _node("Add", 2600, 100),
        {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 1000},
        {"cat": "Node", "name": "n_fence_before", "ts": 2100, "dur": 50, "args": {"op_name": "MatMul"}},
    ]
    prof = aggregate_profile(events)
    assert prof["runs"] == 2 and prof["run_ms"] == 1.0
    assert prof["ops"] == [
        {"op_type": "MatMul", "ms_per_run": 0.5, "calls_per_run": 1.5, "pct_of_run": 50.0},
        {"op_type": "Add", "ms_per_run": 0.1, "calls_per_run": 1.0, "pct_of_run": 10.0},
    ]
    assert top_ops(prof, 1) == prof["ops"][:1]
    with pytest.raises(ValueError, match="warm-up"):
        aggregate_profile(events[:2])


def test_profile_of_a_real_onnx_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        initializer=[onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), "w")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    prof = profile_engine(path, {"x": np.ones((4, 8), np.float32)}, threads=1, runs=3)
    assert prof["runs"] == 3
    assert {op["op_type"]: op["calls_per_run"] for op in prof["ops"]} == {"MatMul": 1.0, "Relu": 1.0}
    assert list(tmp_path.iterdir()) == [path]  # the trace file went to a temporary folder


# targets and reports -----------------------------------------------------------------------------------------
def _compare_result(eager_ratio: float, compile_ratio: float, pct_of_peak: float, preset: str = "small") -> dict:
    rows = [{"name": f"denoise step: {c}", "candidate": c, "runs": 3, "p50_ms": p, "p90_ms": p * 1.1}
            for c, p in (("ort_fp32", 80.0 * eager_ratio / 0.8), ("torch_eager", 100.0))]
    return {
        "kind": "compare", "rows": rows, "config": {"backbone": "sana", "preset": preset, "threads": 2},
        "env": {"cpu": {"model": "Test CPU", "logical_cpus": 2}, "threads": 2, "gpu": "none",
                "versions": {"onnxruntime": "1.32.0", "torch": "2.13.0"}, "git": None, "date": "2026-01-01"},
        "ratios": {"ort_fp32/torch_eager": eager_ratio, "ort_fp32/torch_compile": compile_ratio},
        "efficiency": {"ort_fp32": {"gflops": 30.0, "pct_of_peak": pct_of_peak},
                       "torch_eager": {"gflops": 24.0, "pct_of_peak": 40.0}},
        "flops": {"total": 3 * 10**9}, "first_call_s": {"ort_fp32": 0.2, "torch_eager": 0.1},
        "peaks": {"fp32": {"ops_per_s": 5e10, "source": "torch.mm", "n": 2048},
                  "int8": {"ops_per_s": 8e10, "source": "onnxruntime MatMulInteger u8s8", "n": 2048}},
        "accuracy": {"ort_fp32": {"cosine": 1.0, "max_rel": 1e-7}, "torch_eager": {"cosine": 1.0, "max_rel": 0.0}},
        "profiles": {"ort_fp32": {"runs": 3, "run_ms": 80.0, "top_ops": [
            {"op_type": "MatMul", "ms_per_run": 60.0, "calls_per_run": 40, "pct_of_run": 75.0}]}},
    }


def test_verdicts_pass_and_miss_by_how_much():
    passing = {v.target.name: v for v in verdicts(_compare_result(0.7, 0.95, 66.0))}
    assert set(passing) == {TARGETS[0].name, TARGETS[1].name, TARGETS[4].name}  # no int8, no overhead metric
    assert passing[TARGETS[0].name].text() == "pass: 0.10x under the limit (12.5% relative)"
    assert passing[TARGETS[4].name].text() == "pass: 6.0 pp above the floor (10.0% relative)"
    missing = {v.target.name: v for v in verdicts(_compare_result(0.9, 1.25, 48.0))}
    assert missing[TARGETS[0].name].text() == "miss: 0.10x over the limit (12.5% relative)"
    assert missing[TARGETS[1].name].margin_pct == pytest.approx(-25.0)
    assert missing[TARGETS[4].name].text() == "miss: 12.0 pp below the floor (20.0% relative)"
    overhead = Verdict(TARGETS[3], 1.5)
    assert overhead.passed and overhead.text() == "pass: 0.5 pp under the limit (25.0% relative)"
    assert Verdict(TARGETS[2], 0.55).passed  # the limit itself passes


def test_report_shows_the_profile_only_on_a_miss():
    passed = render(_compare_result(0.7, 0.95, 66.0))
    assert "| ORT fp32 denoise step / PyTorch eager | <= 0.80x | 0.70x | pass: 0.10x under the limit" in passed
    assert "Where the time goes" not in passed and "indicative" not in passed
    missed = render(_compare_result(0.9, 0.95, 66.0, preset="tiny"))
    assert "Where the time goes: ort_fp32 (80.0 ms per run" in missed
    assert "| MatMul | 60.00 | 75.0% | 40 |" in missed
    assert "this run is tiny at 2 threads: verdicts are indicative only" in missed


# the CLI end to end ------------------------------------------------------------------------------------------
_LATENCY_KEYS = {"kind", "env", "config", "rows", "not_exercised", "overhead", "checks", "memory"}
_ENV_KEYS = {"date", "cpu", "threads", "gpu", "versions", "git", "bundles", "load_average"}


@pytest.fixture(scope="module")
def latency_json(bundles, tmp_path_factory) -> Path:
    """`latency --runs 1 --warmup 0` on the tiny SANA bundle, in a fresh interpreter that must not import torch."""
    out = tmp_path_factory.mktemp("bench") / "latency.json"
    code = ("import sys; from benchmarks.__main__ import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'latency imported torch'; sys.exit(rc)")
    args = ["latency", "--bundle", str(bundles["sana"]), "--runs", "1", "--warmup", "0", "--threads", "1",
            "--steps", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "| planner+canvas |" in done.stdout
    return out


def test_latency_json_has_every_required_key(latency_json, bundles):
    r = json.loads(latency_json.read_text())
    assert _LATENCY_KEYS <= set(r) and _ENV_KEYS <= set(r["env"])
    assert r["kind"] == "latency" and r["config"]["steps"] == 2 and r["config"]["threads"] == 1
    assert [(row["name"], row["calls_per_request"]) for row in r["rows"]] == [
        ("planner+canvas", 1), ("denoise step", 2), ("vae_decoder", 1), ("end to end", None),
        ("runtime overhead", None)]
    assert all({"p50_ms", "p90_ms", "runs"} <= set(row) and row["runs"] == 1 for row in r["rows"])
    assert r["checks"] == {"planner_calls_per_request": [1], "planner_once": True}
    assert {"per_request_ms", "per_step_ms", "engine_ms", "pct_of_engine", "step_loop_per_step_ms",
            "outside_step_loop_ms"} <= set(r["overhead"])
    assert r["overhead"]["per_step_ms"] == pytest.approx(r["overhead"]["per_request_ms"] / 2)
    assert {"load", "requests", "lifetime_peak_mb"} <= set(r["memory"]) and r["memory"]["requests"]["peak_mb"] > 0
    manifest = (Path(bundles["sana"]) / "manifest.json").read_bytes()
    assert r["env"]["bundles"]["bundle"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert r["env"]["bundles"]["bundle"]["cache_key"] == json.loads(manifest)["build"]["cache_key"]
    assert "torch" not in r["env"]["versions"] and r["env"]["cpu"]["model"]


def test_report_compares_two_runs(latency_json, tmp_path, capsys):
    b = json.loads(latency_json.read_text())
    slower = copy.deepcopy(b)
    for row in slower["rows"]:
        row["p50_ms"], row["p90_ms"] = 2 * row["p50_ms"], 4 * row["p90_ms"]
    slower["env"]["threads"] = 2
    path_b = tmp_path / "b.json"
    path_b.write_text(json.dumps(slower))
    assert main(["report", str(latency_json), str(path_b)]) == 0
    text = capsys.readouterr().out
    assert "| denoise step |" in text and "| 2.000 | 4.000 |" in text
    assert "Environments differ: threads: 1 -> 2" in text
    assert "| runtime overhead, % of engine time | <= 2.0% |" in text


def test_sweep_points_land_on_the_bundle_multiples():
    ranges = {"height": (32, 128), "width": (32, 128), "num_frames": (1, 9)}
    multiples = {"height": 16, "width": 16, "num_frames_minus_1": 4}
    points = sweep_points(ranges, multiples, {"height": 64, "width": 64, "num_frames": 5}, 3)
    assert points == [(64, 64, 1), (32, 32, 5), (64, 64, 5), (80, 80, 5), (128, 128, 5), (64, 64, 9)]
    image = sweep_points({**ranges, "num_frames": (1, 1)}, multiples, {"height": 64, "width": 64, "num_frames": 1}, 2)
    assert image == [(32, 32, 1), (128, 128, 1)]


def test_sweep_times_the_steps_the_runtime_feeds(bundles, tmp_path):
    out = tmp_path / "sweep.json"
    args = ["sweep", "--bundle", str(bundles["sana"]), "--points", "2", "--runs", "1", "--warmup", "0",
            "--threads", "1", "--out", str(out)]
    has_plot = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the plot comes with the bench extra; the JSON is written before it
        has_plot = False
    assert main(args) == (0 if has_plot else 2)
    r = json.loads(out.read_text())
    lo, hi = r["rows"][0], r["rows"][-1]
    assert (lo["height"], lo["latent_tokens"]) == (32, 64) and (hi["height"], hi["latent_tokens"]) == (128, 1024)
    assert out.with_suffix(".png").is_file() == has_plot


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["report", str(bad)]) == 2
    assert main(["latency", "--bundle", str(tmp_path)]) == 2
    assert main(["sweep"]) == 2
    err = capsys.readouterr().err
    assert "not a benchmark result" in err and "is not a bundle" in err and "sweep needs --bundle" in err
    with pytest.raises(BenchmarkError, match="warmup >= 1"):
        CompareConfig(backbone="sana", warmup=0).validate()
    with pytest.raises(BenchmarkError, match="unknown torch mode"):
        CompareConfig(backbone="sana", torch_modes=("jit",)).validate()


def test_calib_memory_benchmark_runs_each_case_and_counts_exactly():
    """The budgeted case gives every 64 KiB tensor its own session (two do not fit 0.1 MiB); the unbounded case
    one session for all six. The memory figures are the benchmark's to report, not this test's."""
    from benchmarks.calib_memory import run

    result = run(rows=256, width=64, layers=6, budget_mib=0.1)
    assert result["exposed_bytes"] == 256 * 64 * 4 * 6
    assert (result["unbounded"]["chunk_sessions"], result["budgeted"]["chunk_sessions"]) == (1, 6)
    assert result["unbounded"]["values"] == result["budgeted"]["values"] == 6


def test_fullsize_benchmark_records_build_and_request_costs(tmp_path):
    """The full-size benchmark's machinery on a tiny checkpoint: each stage's build record and gate verdict from
    the manifest, the build's and the request's wall time and peak memory from fresh processes, the disk."""
    from benchmarks.fullsize import markdown, run
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas

    MetaCanvas.from_preset("sana", "tiny", seed=0).save_pretrained(tmp_path / "ckpt")
    result = run(tmp_path / "ckpt", tmp_path / "bundle", 64, 64, 1, 2, "a fox", frames_out=tmp_path / "ref.npy")
    assert result["build"]["exit_status"] == 0 and result["generate"]["exit_status"] == 0
    assert set(result["stages"]) == {"planner", "denoise", "vae_decoder"}
    assert {r["gate"] for r in result["stages"].values()} == {"passed"}
    assert result["generate"]["calls"]["denoise"] == 2 and result["generate"]["frames"] == [1, 64, 64, 3]
    assert result["build"]["peak_rss_mb"] > 0 and result["disk"]["bundle_gb"] >= 0
    assert "| denoise |" in markdown(result)
    # the same bundle, prompt and seed again, against the first run's frames: a deterministic runtime gives the
    # same frames bit for bit, so the PSNR is infinite
    again = run(tmp_path / "ckpt", tmp_path / "bundle", 64, 64, 1, 2, "a fox", build=False,
                reference=tmp_path / "ref.npy")
    assert np.load(tmp_path / "ref.npy").shape == (1, 64, 64, 3)
    assert again["generate"]["psnr_db_vs_reference"] == float("inf") and "dB PSNR" in markdown(again)
    # a build the compiler refuses (main returns 2, the child process itself ends normally) is a failed build:
    # reported with its status, nothing generated
    failed = run(tmp_path / "ckpt", tmp_path / "refused", 64, 64, 1, 2, "a fox", build_args=("--steps", "0"))
    assert failed["build"]["exit_status"] == 2 and "generate" not in failed and not (tmp_path / "refused").exists()
    # a TensorRT export (engines built on the GPU machine): the same per-stage records, from its index; no request
    export = run(tmp_path / "ckpt", tmp_path / "export", 64, 64, 1, 2, "a fox",
                 build_args=("--target", "tensorrt", "--export-only", "--precision", "bf16"))
    assert export["build"]["exit_status"] == 0 and "generate" not in export
    assert set(export["stages"]) == {"planner", "denoise", "vae_decoder"}
    assert all(r["gate"] == "passed" and r["peak_rss_mb"] > 0 and r["bytes"] > 0 for r in export["stages"].values())
