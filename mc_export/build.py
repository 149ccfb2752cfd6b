"""`build`: a checkpoint (or a preset) -> a bundle. Exports every stage from its spec, gates each against the
PyTorch reference, optimises it for its backend and writes the bundle atomically with its manifest.

A build is keyed by content: the hash of the weights, the build config and the tool versions. Rebuilding an
identical key into an existing, verifying bundle returns at once; "the file exists" is never a cache hit.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from metacanvas_deploy.mc_export.components.ranges import BuildRanges, default_ranges
from metacanvas_deploy.mc_export.device import gpu_identity
from metacanvas_deploy.mc_export.errors import BuildError, ConfigError, StageParityError
from metacanvas_deploy.mc_export.quantized import build_quantized, recipe_for
from metacanvas_deploy.mc_export.writer import build_float, cache_key, cached, weights_hash
from metacanvas_deploy.runtime.limits import MAX_FRAMES, MAX_PROMPT_TOKENS, MAX_SEED, MAX_SIDE, MAX_STEPS, check_int

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "w8", "w4")
QUANTIZED = ("int8", "fp8", "w8", "w4")  # precisions built by calib/ against a float bundle (w8/w4: weight-only)
MIXED = "mixed"  # the bundle precision of a --stage-precision build (each engine entry has its own)
STAGE_PRECISIONS = ("fp32", "int8", "fp8", "w8", "w4")  # what --stage-precision takes per stage
TARGETS = ("auto", "onnxruntime", "onnxruntime-gpu", "tensorrt")
# What each target can build today; asking for anything else is a clear error that names what can. fp8 on
# ONNX Runtime runs emulated (slower than fp32): it measures FP8 accuracy on a CPU; TensorRT runs it for real.
# onnxruntime-gpu (ONNX Runtime's CUDA execution provider, runtime.ort_cuda): fp32 and a mixed fp16 graph
# (mc_export.ort_gpu); not bf16 (the CUDA provider lacks bf16 kernels for ops the graphs use; TensorRT builds it).
# w8/w4: ONNX Runtime's MatMulNBits on CPUs; TensorRT's weight-only path (blocked DequantizeLinear, symmetric).
SUPPORTED = {"onnxruntime": ("fp32", "int8", "fp8", "w8", "w4"), "onnxruntime-gpu": ("fp32", "fp16"),
             "tensorrt": ("fp32", "fp16", "bf16", "int8", "fp8", "w8", "w4")}


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on. `validate()` holds every "X requires Y" rule."""

    out: Path
    backbone: str | None = None
    preset: str | None = None
    checkpoint: Path | None = None
    precision: str = "fp32"
    target: str = "auto"
    # (name, (min, opt, max)) for height / width / frames / prompt_tokens; the rest from the preset's defaults
    range_overrides: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    steps: int | None = None  # step count of the precomputed schedule plan; None: the checkpoint's default
    seed: int = 0  # presets only: the random weights' seed
    random_canvas: bool = True  # presets only: exercise the canvas path (random zero-init layers)
    verify: bool = True  # run the parity gates
    # checkpoints only: "on" keeps the weights on disk (structure on `meta`, streamed into the ONNX files),
    # "auto" does so when the checkpoint's fp32 weights exceed the memory budget (mc_export.models.lazy)
    lazy_weights: str = "auto"
    recipe: object = None  # calib.recipes.Recipe for int8/fp8; None: the backbone's default recipe
    float_bundle: Path | None = None  # int8/fp8: where the fp32 reference bundle lives (default <out>-fp32)
    # onnxruntime-gpu: ONNX Runtime's execution provider, "cuda" or "tensorrt" (runtime.ort_cuda)
    ort_provider: str = "cuda"
    # TensorRT without a GPU: write a TensorRT export (graphs, profiles, references) that the GPU machine turns
    # into a bundle with `python -m mc_export engines` (mc_export.tensorrt.export_only / target_build)
    export_only: bool = False
    # per stage: ((stage, precision), ...) from --stage-precision planner=w4,denoise=int8; the bundle's precision
    # is then "mixed" and each engine entry records its own
    stage_precision: tuple[tuple[str, str], ...] = ()
    # step caching (`components.step_cache`, `step_cache_build`): "off", "auto" (the most aggressive schedule within
    # the budget) or a MagCache threshold; the budget is the worst held-out PSNR of decoded frames vs uncached
    cache: str = "off"
    cache_budget_db: float = 30.0
    # a published curve (per step, CFG rows averaged) instead of measuring one, and where it comes from
    cache_curve: tuple[float, ...] | None = None
    cache_curve_source: str = ""

    def validate(self, gpu_available: bool | None = None, cuda_available: bool | None = None) -> BuildConfig:
        """Resolve `auto` and check the combination; returns the resolved config. ``gpu_available`` (TensorRT)
        and ``cuda_available`` (onnxruntime-gpu): what the machine offers, detected when None."""
        if self.precision not in PRECISIONS and not (self.precision == MIXED and self.stage_precision):
            raise ConfigError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.stage_precision and self.precision != MIXED:
            if self.precision != "fp32":
                raise ConfigError(f"--stage-precision sets every stage's precision; drop --precision {self.precision}")
            return dataclasses.replace(self, precision=MIXED).validate(gpu_available, cuda_available)
        if self.precision == MIXED:
            self._check_stage_precision()
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; expected one of {', '.join(TARGETS)}")
        if self.checkpoint is None and self.backbone is None:
            raise ConfigError("give --backbone (with an optional --preset) or --checkpoint DIR")
        self._check_numbers()
        if self.lazy_weights not in ("auto", "on", "off"):
            raise ConfigError(f"lazy_weights must be auto, on or off, got {self.lazy_weights!r}")
        if self.lazy_weights == "on" and self.checkpoint is None:
            raise ConfigError("lazy weights need --checkpoint: preset weights are generated in memory")
        if self.recipe is not None and self.precision != MIXED and getattr(self.recipe, "format", None) != self.precision:
            raise ConfigError(f"a {getattr(self.recipe, 'format', '?')} recipe cannot build --precision "
                              f"{self.precision}")
        out = Path(self.out).resolve()
        if self.checkpoint is not None:
            ckpt = Path(self.checkpoint).resolve()
            if out == ckpt or ckpt in out.parents or out in ckpt.parents:
                raise ConfigError(f"--out {self.out} overlaps the checkpoint {self.checkpoint} the build reads; "
                                  "a bundle goes in a folder of its own, outside the checkpoint")
        if self.float_bundle is not None and Path(self.float_bundle).resolve() == Path(self.out).resolve():
            raise ConfigError(f"--float-bundle and --out are both {self.out}: the quantized bundle would replace the "
                              "float bundle it is calibrated against; give them different folders")
        if self.checkpoint is not None and self.preset is not None:
            raise ConfigError("--preset and --checkpoint are exclusive: a checkpoint brings its own weights")
        if self.export_only:
            self._check_export_only()
        self._check_cache()
        gpu = _tensorrt_usable() if gpu_available is None else gpu_available
        target = self.target
        if target == "auto":
            target = "tensorrt" if gpu else "onnxruntime"
        if target == "tensorrt" and not gpu and not self.export_only:
            raise BuildError("--target tensorrt needs an NVIDIA GPU with TensorRT installed; none is usable here. "
                             "Build for this machine with --target onnxruntime (or auto)")
        self._check_target_precisions(target)
        if self.ort_provider not in ("cuda", "tensorrt"):
            raise ConfigError(f"--ort-provider must be cuda or tensorrt, got {self.ort_provider!r}")
        if self.ort_provider != "cuda" and target != "onnxruntime-gpu":
            raise ConfigError(f"--ort-provider {self.ort_provider} picks ONNX Runtime's execution provider on a GPU: "
                              f"it needs --target onnxruntime-gpu (the target is {target})")
        if target == "onnxruntime-gpu" and not cuda_available:
            _check_cuda_provider(self.ort_provider)
        preset = self.preset if self.preset is not None or self.checkpoint is not None else "tiny"
        return dataclasses.replace(self, target=target, preset=preset)

    def precisions(self) -> tuple[str, ...]:
        """Every precision this build asks a target for: the bundle's, or each stage's (mixed)."""
        if self.precision == MIXED:
            return tuple(dict.fromkeys(p for _, p in self.stage_precision))
        return (self.precision,)

    def _check_stage_precision(self) -> None:
        """--stage-precision: known precisions, each stage once, no --recipe beside it (a recipe file says per
        stage itself: stage_formats). Stage names are checked against the model's stages once it is loaded,
        before any export (`mc_export.quantized.build_quantized`)."""
        seen = set()
        for stage, precision in self.stage_precision:
            if precision not in STAGE_PRECISIONS:
                raise ConfigError(f"--stage-precision {stage}={precision}: expected one of "
                                  f"{', '.join(STAGE_PRECISIONS)} per stage")
            if stage in seen:
                raise ConfigError(f"--stage-precision names {stage} twice")
            seen.add(stage)
        if self.recipe is not None:
            raise ConfigError("--stage-precision and --recipe both say what each stage is; give one (a recipe file "
                              "sets per-stage formats with stage_formats)")
        if all(p == "fp32" for _, p in self.stage_precision):
            raise ConfigError("--stage-precision quantizes no stage (every stage fp32): build --precision fp32")

    def _check_target_precisions(self, target: str) -> None:
        """Every precision asked (each stage's, mixed) is one ``target`` builds; TensorRT's weight-only path takes
        symmetric blocks only (its DequantizeLinear needs zero points of 0)."""
        for precision in self.precisions():
            self._check_supported(precision, target)
        weight_only = self.recipe is not None and any(self.recipe.format_of(s) in ("w8", "w4")
                                                      for s in self.recipe.stages)
        if weight_only and target == "tensorrt" and not self.recipe.symmetric:
            raise BuildError("TensorRT's weight-only path takes symmetric blocks only (its DequantizeLinear needs zero "
                             "points of 0); set \"symmetric\": true in the recipe, or build --target onnxruntime")

    def _check_supported(self, precision: str, target: str) -> None:
        if precision not in SUPPORTED[target]:
            gpu_hint = "; for bf16/int8/fp8 on a GPU use --target tensorrt" if target == "onnxruntime-gpu" else ""
            raise BuildError(f"--precision {precision} cannot be built for {target} yet; this machine can "
                             f"build: {', '.join(SUPPORTED[target])} ({target}){gpu_hint}")

    def _check_export_only(self) -> None:
        """--export-only: a TensorRT export (no GPU needed here) of a precision an export can carry."""
        from metacanvas_deploy.mc_export.tensorrt.export_folder import WEIGHTS_DTYPE

        if self.target != "tensorrt":
            what = "builds for this machine" if self.target == "onnxruntime" else "picks the target by this machine"
            raise ConfigError(f"--export-only writes a TensorRT export for a GPU machine to build; --target "
                              f"{self.target} {what}: give --target tensorrt (or drop --export-only)")
        if self.precision not in WEIGHTS_DTYPE:
            raise BuildError(f"--export-only writes {', '.join(WEIGHTS_DTYPE)} exports; --precision {self.precision} "
                             "needs calibration against a float bundle and a quantized-engine gate on the GPU "
                             "machine, which exports do not carry yet: build it on the GPU machine with `python -m "
                             f"mc_export build --target tensorrt --precision {self.precision}`")

    def _check_cache(self) -> None:
        """--cache: off, auto or a threshold, with the options it cannot combine with refused before any work."""
        from metacanvas_deploy.runtime.limits import check_real
        from metacanvas_deploy.runtime.step_cache import check_threshold, curve_ok

        if self.cache == "off":
            if self.cache_curve is not None:
                raise ConfigError("--cache-curve gives step caching its curve: add --cache auto (or a threshold)")
            return
        if self.cache_curve is not None and not curve_ok(self.cache_curve):
            raise ConfigError("--cache-curve: expected 2..1000 magnitude ratios in [0.001, 1000], one per step")
        if self.cache != "auto":
            check_threshold(self.cache, ConfigError, "--cache")
        check_real("--cache-budget", self.cache_budget_db, 1.0, 100.0, ConfigError)
        refused = [(self.precision != "fp32", f"--precision {self.precision} (only fp32 steps are cached yet)"),
                   (self.export_only, "--export-only (an export carries no step-cache schedule yet)"),
                   (self.target == "tensorrt", "--target tensorrt (its engines drop the inputs a CACHED step does not "
                                               "read: not yet; build for onnxruntime)"),
                   (not self.verify, "--no-verify (the schedule is chosen by measuring accuracy)")]
        for bad, option in refused:
            if bad:
                raise ConfigError(f"--cache {self.cache} cannot be combined with {option}")

    def _check_numbers(self) -> None:
        """Steps, seed and range overrides: integers inside the global bounds (`runtime.limits`); zero is never
        "the default"."""
        if self.steps is not None:
            check_int("--steps", self.steps, 1, MAX_STEPS, ConfigError)
        check_int("--seed", self.seed, 0, MAX_SEED, ConfigError)
        limits = {"height": MAX_SIDE, "width": MAX_SIDE, "frames": MAX_FRAMES, "prompt_tokens": MAX_PROMPT_TOKENS}
        for name, triple in self.range_overrides:
            for value in triple:
                check_int(f"--{name.replace('_', '-')}", value, 1, limits.get(name, MAX_SIDE), ConfigError)


def _check_cuda_provider(ort_provider: str = "cuda") -> None:
    """--target onnxruntime-gpu: BuildError before any work unless onnxruntime-gpu (with ``ort_provider``) sees an
    NVIDIA GPU here."""
    import onnxruntime as ort

    from metacanvas_deploy.runtime.errors import BundleError
    from metacanvas_deploy.runtime.ort_cuda import CUDA_PROVIDER, GPU_PROVIDERS, INSTALL, INSTALL_TRT, cuda_identity

    if CUDA_PROVIDER not in ort.get_available_providers():
        raise BuildError(f"--target onnxruntime-gpu needs onnxruntime-gpu; the installed onnxruntime {ort.__version__} "
                         f"offers {', '.join(ort.get_available_providers())}. On a machine with an NVIDIA GPU: "
                         f"{INSTALL}. Build for this machine with --target onnxruntime (or auto)")
    if GPU_PROVIDERS[ort_provider] not in ort.get_available_providers():
        raise BuildError(f"--ort-provider {ort_provider} needs ONNX Runtime's {GPU_PROVIDERS[ort_provider]}, which the "
                         f"installed onnxruntime-gpu {ort.__version__} does not offer: {INSTALL_TRT}")
    try:
        cuda_identity()
    except BundleError as e:
        raise BuildError(f"--target onnxruntime-gpu needs a visible NVIDIA GPU: {e}") from None


def _tensorrt_usable() -> bool:
    """True when TensorRT imports and a CUDA device is visible. Imports lazily: CPU users never need it."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    try:
        from cuda.bindings import runtime as cudart  # noqa: F401
    except ImportError:
        return False
    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


def load_model(cfg: BuildConfig):
    """The PyTorch reference the bundle is compiled from."""
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas

    if cfg.checkpoint is not None:
        model = MetaCanvas.from_pretrained(cfg.checkpoint, lazy=use_lazy_weights(cfg))
        if cfg.backbone is not None and cfg.backbone != model.cfg.backbone:
            raise ConfigError(f"--backbone {cfg.backbone} but the checkpoint holds a {model.cfg.backbone} model")
        return model
    if cfg.preset == "full":
        raise ConfigError("the full preset has no weights: build from a local checkpoint with --checkpoint DIR")
    return MetaCanvas.from_preset(cfg.backbone, cfg.preset, seed=cfg.seed, random_canvas=cfg.random_canvas)


def use_lazy_weights(cfg: BuildConfig) -> bool:
    """Whether a checkpoint build keeps its weights on disk (see `BuildConfig.lazy_weights`)."""
    from metacanvas_deploy.mc_export.models import checkpoint as ckpt
    from metacanvas_deploy.mc_export.models.lazy import checkpoint_fp32_bytes, memory_budget

    if cfg.checkpoint is None or cfg.lazy_weights == "off":
        return False
    if cfg.lazy_weights == "on":
        return True
    ckpt.check_layout(Path(cfg.checkpoint))
    return checkpoint_fp32_bytes(cfg.checkpoint) > memory_budget()


def resolve_ranges(model, overrides) -> BuildRanges:
    """The preset's default ranges with the user's overrides, validated against the backbone."""
    ranges = default_ranges(model.adapter, model.defaults, model.cfg.max_prompt_tokens)
    names = {"height": "height", "width": "width", "frames": "num_frames", "prompt_tokens": "prompt_tokens"}
    for name, triple in overrides:
        if name not in names:
            raise ConfigError(f"unknown range {name!r}; expected one of {', '.join(names)}")
        ranges = dataclasses.replace(ranges, **{names[name]: tuple(triple)})
    ranges.validate(model.adapter, model.cfg.max_prompt_tokens)
    return ranges


def build(cfg: BuildConfig, log=print) -> Path:
    """Build the bundle ``cfg.out`` and return its path. Raises MetaCanvasError subclasses on bad input and
    StageParityError when a stage misses its tolerance (nothing is written then). The model is loaded and its
    weights hashed once, also for a quantized build (which builds its float bundle in the same pass)."""
    cfg = cfg.validate()
    if not cfg.export_only:
        gpu_identity(cfg)  # a precision this GPU cannot take fails here, before any export
    started = time.perf_counter()
    model = load_model(cfg)
    ranges = resolve_ranges(model, cfg.range_overrides)
    steps = cfg.steps or model.defaults.num_inference_steps
    digest = weights_hash(model)
    if cfg.export_only:
        from metacanvas_deploy.mc_export.tensorrt.export_only import export_for_tensorrt

        out = export_for_tensorrt(cfg, model, ranges, steps, digest, log)
        log(f"wrote {out} in {time.perf_counter() - started:.0f} s; on the GPU machine: python -m mc_export "
            f"engines --export {out} --out BUNDLE")
        return out
    quantized = cfg.precision in QUANTIZED or cfg.precision == MIXED
    recipe = recipe_for(cfg, model) if quantized else None
    key = cache_key(cfg, model, ranges, steps, digest, recipe)
    out = Path(cfg.out)
    if cached(out, key):
        log(f"{out}: up to date (cache key {key[:12]}), nothing to build")
        return out
    if quantized:
        build_quantized(cfg, model, recipe, ranges, steps, digest, key, log)
    else:
        build_float(cfg, model, ranges, steps, key, log)
    log(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return out


def _streamed_tolerance(manifest, stage: str):
    """The weight-only gate of a stage built straight from the checkpoint (`mc_export.weight_only_build`), or
    None for every other stage."""
    from metacanvas_deploy.calib.recipes import Recipe
    from metacanvas_deploy.mc_export.weight_only_build import MODE, tolerance
    from metacanvas_deploy.runtime.manifest_fields import thaw

    quant = thaw(manifest.build.get("quantization") or {})
    if quant.get("mode") != MODE or stage not in quant.get("stages", {}):
        return None
    return tolerance(Recipe.from_json(quant["stages"][stage]["recipe"]))


def verify(bundle_dir: str | Path) -> list[str]:
    """Re-run every stage's parity gate: the bundle's float engines against the PyTorch reference rebuilt from the
    manifest's recorded source, its quantized stages against their float bundle on held-out requests
    (`calib.report`, the recipe's budget). Returns the lines; raises StageParityError on a miss."""
    from metacanvas_deploy.mc_export.export.onnx_export import TABLE_HEADER
    from metacanvas_deploy.mc_export.stages import gate_stage, plan_stages
    from metacanvas_deploy.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    src = dict(m.build.get("source", {}))
    if "checkpoint" in src:
        cfg = BuildConfig(out=bundle.path, checkpoint=Path(src["checkpoint"]))
    elif "preset" in src:
        cfg = BuildConfig(out=bundle.path, backbone=m.backbone, preset=src["preset"], seed=int(src["seed"]),
                          random_canvas=bool(src["random_canvas"]))
    else:
        raise ConfigError(f"{bundle.path}: the manifest does not say which weights it was built from")
    model = load_model(cfg)
    r = m.build["ranges"]
    ranges = BuildRanges(height=tuple(r["height"]), width=tuple(r["width"]), num_frames=tuple(r["num_frames"]),
                         prompt_tokens=tuple(r["prompt_tokens"]), max_images=r["max_images"],
                         max_reference_frames=r["max_reference_frames"])
    lines, quantized = [TABLE_HEADER], []
    weights = getattr(model, "lazy_weights", None)
    for stage, comp in plan_stages(model, ranges, cache="denoise_cached" in m.engines).items():
        if stage not in m.engines:
            raise ConfigError(f"{bundle.path} has no {stage!r} engine; rebuild it")
        entry = m.engines[stage]
        tolerance = _streamed_tolerance(m, stage)  # weight-only, built without a float bundle: against PyTorch
        if entry.precision in QUANTIZED and tolerance is None:  # held to the float bundle: below
            quantized.append(stage)
            continue
        engine = bundle.engine_path(stage)
        if entry.backend == "tensorrt":
            from metacanvas_deploy.mc_export.tensorrt.precision import GATE_TOLERANCE
            from metacanvas_deploy.runtime.trt_engine import TrtEngine

            engine, tolerance = TrtEngine(engine, entry), tolerance or GATE_TOLERANCE.get(entry.precision)
        rows, skipped = gate_stage(comp, engine, weights, tolerance)
        lines += [row.fmt() for row in rows] if rows else [f"{stage:<14} not gated: {skipped}"]
    if quantized:  # the quantized stages, measured again against the float bundle on held-out requests
        from metacanvas_deploy.calib.report import report

        result = report(bundle.path)
        lines += ["", *result.lines]
        if not result.passed:
            raise StageParityError(quantized[0], f"misses its accuracy budget against the float bundle: "
                                                 f"{'; '.join(result.misses)}")
    return lines
