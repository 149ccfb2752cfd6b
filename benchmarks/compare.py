"""`compare`: the denoise step in our ONNX Runtime engines against the PyTorch reference, in one process.

Candidates: the fp32 bundle's denoise engine as the runtime runs it (`runtime.engine`), optionally a second
bundle's (an INT8 build; labelled by its manifest precision), and the stage's own PyTorch module
(`plan_stages(model, ranges)["denoise"].module()`) eager and under `torch.compile`, all on the same numpy
inputs (`sample_inputs("opt", seed=0)`) and the same thread count. Runs alternate candidate by candidate
(`timing.run_alternating`). Besides the times: the module's FLOPs and the machine's GEMM peaks (efficiency),
each candidate's accuracy against the eager reference, and each engine's per-operator profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.bundles import DEFAULT_CACHE, build_config, cached_bundle
from benchmarks.env import fingerprint
from benchmarks.errors import BenchmarkError
from benchmarks.peak import DEFAULT_SIZE, measure_peaks
from benchmarks.profile import profile_engine, top_ops
from benchmarks.timing import run_alternating, summarize

TORCH_MODES = ("eager", "compile")


@dataclass(frozen=True)
class CompareConfig:
    """One `compare` run. ``bundle``: the fp32 bundle (None: build it from the model into ``cache``);
    ``int8_bundle``: a second bundle to time beside it (any precision)."""

    backbone: str | None
    preset: str | None = None
    checkpoint: Path | None = None
    bundle: Path | None = None
    int8_bundle: Path | None = None
    runs: int = 10
    warmup: int = 2
    threads: int = 2
    torch_modes: tuple[str, ...] = TORCH_MODES
    peak_size: int = DEFAULT_SIZE
    profile_runs: int = 3
    cache: Path = DEFAULT_CACHE

    def validate(self) -> CompareConfig:
        if self.runs < 1 or self.warmup < 1 or self.threads < 1 or self.profile_runs < 1 or self.peak_size < 16:
            raise BenchmarkError(f"need runs >= 1, warmup >= 1 (torch.compile compiles on its first call), "
                                 f"threads >= 1, profile runs >= 1, peak size >= 16; got runs={self.runs} "
                                 f"warmup={self.warmup} threads={self.threads} profile_runs={self.profile_runs} "
                                 f"peak_size={self.peak_size}")
        bad = [m for m in self.torch_modes if m not in TORCH_MODES]
        if bad:
            raise BenchmarkError(f"unknown torch mode {bad[0]!r}; expected some of {', '.join(TORCH_MODES)}")
        for path in (self.bundle, self.int8_bundle):
            if path is not None and not (Path(path) / "manifest.json").is_file():
                raise BenchmarkError(f"{path} is not a bundle (no manifest.json)")
        return self


def _denoise_engine(bundle_dir: Path, threads: int):
    """(the runtime's denoise engine of a bundle, its manifest precision, its engine file)."""
    from metacanvas_deploy.runtime.bundle import load_bundle
    from metacanvas_deploy.runtime.engine import load_engine

    bundle = load_bundle(bundle_dir)
    entry = bundle.manifest.engines.get("denoise")
    if entry is None:
        raise BenchmarkError(f"{bundle_dir} has no denoise engine")
    path = bundle.engine_path("denoise")
    return load_engine(path, entry, threads), entry.precision, path


def _torch_candidate(module, inputs, output_names):
    """A call of ``module(*inputs)`` under inference mode returning {output name: numpy array}."""
    import torch

    def call() -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = module(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.numpy() for n, o in zip(output_names, out)}

    return call


def _accuracy(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """The worst output against the reference: {"output", "max_rel", "cosine"} (mc_export's parity metrics)."""
    from metacanvas_deploy.mc_export.export.onnx_export import compare

    rows = [compare("denoise", "compare", name, outputs[name], ref) for name, ref in reference.items()]
    worst = max(rows, key=lambda r: r.max_rel)
    return {"output": worst.output, "max_rel": worst.max_rel, "cosine": min(r.cosine for r in rows)}


def _check_fp32(accuracy: dict, tolerance, bundle: Path) -> None:
    """The fp32 engine must compute the PyTorch module's function: otherwise the bundle holds other weights."""
    if accuracy["max_rel"] > tolerance.max_rel or accuracy["cosine"] < tolerance.min_cosine:
        raise BenchmarkError(f"{bundle}: its denoise engine does not match the PyTorch module (max_rel "
                             f"{accuracy['max_rel']:.2e}, cosine {accuracy['cosine']:.7f}; the stage allows "
                             f"{tolerance.max_rel:.0e}, {tolerance.min_cosine}): it was built from other weights or "
                             "settings. Pass the bundle built from this --backbone/--preset/--checkpoint, or none")


def _efficiency(flops: int, p50_ms: float, peak: dict) -> dict:
    achieved = flops / (p50_ms / 1000.0)
    return {"gflops": achieved / 1e9, "peak_gops": peak["ops_per_s"] / 1e9,
            "pct_of_peak": 100.0 * achieved / peak["ops_per_s"]}


def _ratios(p50: dict[str, float]) -> dict[str, float]:
    """Every ONNX Runtime candidate over each PyTorch one ("ort_fp32/torch_eager": 0.93, ...)."""
    return {f"{ours}/{ref}": p50[ours] / p50[ref] for ours in p50 if ours.startswith("ort_")
            for ref in p50 if ref.startswith("torch_")}


def _candidates(cfg: CompareConfig, comp, arrays: dict, fp32_bundle: Path) -> tuple[dict, dict]:
    """(name -> callable, ORT name -> (bundle dir, engine file)) in alternation order: ORT engines first
    ("ort_<manifest precision>"), then the torch modes."""
    import torch

    calls, engines = {}, {}
    for path in (fp32_bundle, cfg.int8_bundle):
        if path is None:
            continue
        engine, precision, engine_file = _denoise_engine(Path(path), cfg.threads)
        if path == fp32_bundle and precision != "fp32":
            raise BenchmarkError(f"{path} is a {precision} bundle; --bundle takes the fp32 one (give the other "
                                 "with --int8-bundle)")
        name = f"ort_{precision}" if f"ort_{precision}" not in calls else f"ort_{precision}_2"
        calls[name], engines[name] = (lambda e=engine: e(arrays)), (Path(path), engine_file)
    inputs, names = comp.torch_inputs(arrays), comp.spec.output_names
    module = comp.module().eval()
    if "eager" in cfg.torch_modes:
        calls["torch_eager"] = _torch_candidate(module, inputs, names)
    if "compile" in cfg.torch_modes:
        calls["torch_compile"] = _torch_candidate(torch.compile(module), inputs, names)
    return calls, engines


def run_compare(cfg: CompareConfig, log=print) -> dict:
    """Time every candidate, count FLOPs, measure the peaks, profile the engines. Returns the result JSON (kind
    "compare")."""
    import torch

    from benchmarks.flops import count_flops
    from metacanvas_deploy.mc_export.build import load_model, resolve_ranges
    from metacanvas_deploy.mc_export.stages import plan_stages

    cfg = cfg.validate()
    bcfg = build_config(cfg.backbone, cfg.preset, cfg.checkpoint, cfg.cache)
    fp32_bundle = Path(cfg.bundle) if cfg.bundle else cached_bundle(bcfg, log)
    torch.set_num_threads(cfg.threads)
    model = load_model(bcfg)
    comp = plan_stages(model, resolve_ranges(model, bcfg.range_overrides))["denoise"]
    arrays = comp.sample_inputs("opt", seed=0)
    reference = comp.reference(arrays)
    calls, engines = _candidates(cfg, comp, arrays, fp32_bundle)
    _check_fp32(_accuracy(calls["ort_fp32"](), reference), comp.spec.tolerance, fp32_bundle)
    log(f"compare: {', '.join(calls)}: {cfg.warmup} warm-up + {cfg.runs} alternating runs, {cfg.threads} threads")
    timed = run_alternating(calls, cfg.runs, cfg.warmup)
    flops = count_flops(comp.module().eval(), comp.torch_inputs(arrays))
    log(f"compare: GEMM peaks at n={cfg.peak_size}; ONNX Runtime op profiles ({cfg.profile_runs} runs)")
    peaks = measure_peaks(cfg.peak_size, cfg.threads)
    rows = [{"name": f"denoise step: {name}", "candidate": name, **summarize(t.seconds)} for name, t in timed.items()]
    p50 = {r["candidate"]: r["p50_ms"] for r in rows}
    return {
        "kind": "compare", "env": fingerprint(cfg.threads, {name: bundle for name, (bundle, _) in engines.items()}),
        "config": {"backbone": model.cfg.backbone, "preset": bcfg.preset, "checkpoint": str(cfg.checkpoint or ""),
                   "runs": cfg.runs, "warmup": cfg.warmup, "threads": cfg.threads,
                   "inputs": {k: list(v.shape) for k, v in arrays.items()}},
        "rows": rows,
        "first_call_s": {name: t.first_call_s for name, t in timed.items()},
        "ratios": _ratios(p50),
        "flops": flops,
        "peaks": peaks,
        "efficiency": {name: _efficiency(flops["total"], ms, peaks["int8" if "int8" in name else "fp32"])
                       for name, ms in p50.items()},
        "accuracy": {name: _accuracy(t.last, reference) for name, t in timed.items()},
        "profiles": {name: _profile(path, arrays, cfg) for name, (_, path) in engines.items()},
    }


def _profile(engine_file: Path, arrays: dict, cfg: CompareConfig) -> dict:
    """The top op types of a denoise engine (`benchmarks.profile`)."""
    prof = profile_engine(engine_file, arrays, cfg.threads, cfg.profile_runs)
    return {"runs": prof["runs"], "run_ms": prof["run_ms"], "top_ops": top_ops(prof)}
