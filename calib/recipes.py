"""Quantization recipes as values: frozen, serialisable, hashed into the bundle's manifest.

What is quantized, by default, and why:
- **denoise** (the DiT step): yes. It runs `steps` times per request on two CFG rows and holds nearly all the
  compute; it is where 8-bit pays.
- **planner** (Qwen2.5-VL): no. It runs once per request, so 8-bit saves little end to end, and an LLM's
  outlier channels make W8A8 activations lossy; its outputs condition every step (prompt embeddings, canvas).
- **VAE**: no. Runs once per request; decoders are convolutional with wide dynamic range, the last thing
  before pixels: its error lands on the frames undamped.

Layers kept in high precision inside the DiT, as the established recipes do: the patch and condition
embedders (patch / time / text projections: tiny compute, large effect), the output projection, AdaLN
modulation and the canvas injector (a zero-initialised residual connector: its small output rides on top of
the latents); Wan also keeps its first and last blocks. Which module paths those are is model knowledge: the
compiler's backbone records hold the patterns (`mc_export.backbones.recipe_for_backbone`) and pass them to
`default_recipe`; calibration knows no backbone. Attention's activation x activation products (QK^T, AV) are
not quantized: only weight MatMul / Conv layers are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

from metacanvas_deploy.calib.errors import RecipeError

FORMATS = ("int8", "fp8", "w8", "w4")
# Weight-only: block-wise 8/4-bit weights, float activations (`calib.weight_only`); no calibration data needed.
WEIGHT_ONLY = ("w8", "w4")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
CALIBRATION_PASSES = ("block", "whole")
WEIGHT_METHODS = ("rtn", "awq")  # weight-only: round to nearest, or AWQ-scaled (`calib.weight_only`)


@dataclass(frozen=True)
class Budget:
    """End-to-end accuracy a quantized bundle must reach against the float bundle on held-out prompts and
    seeds: mean PSNR of the decoded frames, and the cosine of every quantized stage's update."""

    min_psnr_db: float = 30.0
    min_stage_cosine: float = 0.99


# Recipe fields only the end-to-end gate and its fallback read (the name is a label)
GATE_FIELDS = frozenset({"name", "budget", "held_out_prompts", "held_out_seeds", "evaluation_steps",
                         "fallback_fraction", "max_fallback_rounds", "streamed_min_cosine", "streamed_max_rel"})


@dataclass(frozen=True)
class Recipe:
    """How a backbone's stages are quantized. Every field changes the bundle, so every field is hashed."""

    name: str
    format: str  # "int8" (W8A8) or "fp8" (E4M3, per-tensor amax)
    stages: tuple[str, ...] = ("denoise",)
    per_channel_weights: bool = True  # int8: per output channel; fp8: per tensor (TensorRT's FP8 recipe)
    calibration: str = "percentile"  # activation ranges: minmax (= amax), percentile, entropy
    percentile: float = 99.999
    # int8 on CPUs without VNNI: u8 x s8 products are summed in pairs into saturating int16 (AVX2
    # vpmaddubsw); 7-bit weights keep those sums exact. Off for TensorRT (int8 tensor cores do not saturate).
    reduce_range: bool = True
    # SmoothQuant: migrate activation outliers into the weights, s_j = max|X_j|^a / max|W_j|^(1-a); None = off
    smoothquant_alpha: float | None = None
    keep_float: tuple[str, ...] = ()  # regexes over weight names (module paths): layers never quantized
    # "block": calibrate the stage graph block by block (`calib.blockwise`: one block's weights and activations in
    # memory, resumable, the same ranges as "whole"); "whole": the whole graph at once. block_pattern: a regex
    # matching one block's module path in full (the backbone's, from the compiler's registry)
    calibration_pass: str = "whole"
    block_pattern: str | None = None
    # block pass: each block calibrated on the outputs of the float blocks before it ("float"), or of those blocks
    # quantized ("quantized", GPTQ-style: the ranges the quantized model will meet; not equal to the whole pass's)
    block_inputs: str = "float"
    budget: Budget = Budget()
    # calibration data: prompts from calib/data/prompts.json (first N of the calibration split) x steps; the
    # end-to-end gate: held-out prompts x seeds, sampled with evaluation_steps
    calibration_prompts: int = 8
    calibration_steps: int = 8
    held_out_prompts: int = 2
    held_out_seeds: tuple[int, ...] = (1000, 1001)
    evaluation_steps: int = 8
    # fallback: each round moves this fraction (at least one) of the still-quantized layers back to float,
    # most sensitive first, until the budget holds
    fallback_fraction: float = 0.1
    max_fallback_rounds: int = 8
    # per stage: (stage, format) overriding ``format`` for that stage (one bundle, mixed precisions), and
    # (stage, regex) keep-float patterns that apply to that stage only
    stage_formats: tuple[tuple[str, str], ...] = ()
    stage_keep_float: tuple[tuple[str, str], ...] = ()
    # weight-only (w8/w4, `calib.weight_only`): block length along K (a power of 2 >= 16 dividing every
    # quantized layer's K), symmetric or affine blocks, embedding tables in embedding_bits (ONNX Runtime's
    # GatherBlockQuantized; 8 by default even for w4: every token's embedding carries its error into the whole
    # LM, and the small SANA planner's w4 gate missed by 0.02 in cosine with a 4-bit table; None: float), and the
    # gate of a stage built straight from a checkpoint without a float bundle:
    # min cosine / max-rel of its outputs against the PyTorch fp32 stage (`mc_export.weight_only_build`)
    block_size: int = 32
    symmetric: bool = True
    embedding_bits: int | None = 8
    # rtn: round to nearest, no data; awq: AWQ's activation-aware input-channel scales, searched on two
    # calibration requests through the float bundle (`calib.weight_only.awq_scale`); per stage:
    # (stage, method) pairs overriding it (on the small SANA, AWQ helps the DiT step and not the planner)
    weight_method: str = "rtn"
    stage_weight_methods: tuple[tuple[str, str], ...] = ()
    streamed_min_cosine: float = 0.99
    streamed_max_rel: float = 1.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise RecipeError(f"recipe {self.name}: format must be one of {FORMATS}, got {self.format!r}")
        if self.calibration not in CALIBRATION_METHODS:
            raise RecipeError(f"recipe {self.name}: calibration must be one of {CALIBRATION_METHODS}")
        if not 50.0 < self.percentile <= 100.0:
            raise RecipeError(f"recipe {self.name}: percentile must be in (50, 100], got {self.percentile}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise RecipeError(f"recipe {self.name}: smoothquant_alpha must be in [0, 1]")
        if not 0.0 < self.fallback_fraction <= 1.0 or self.max_fallback_rounds < 0:
            raise RecipeError(f"recipe {self.name}: fallback_fraction in (0, 1], max_fallback_rounds >= 0")
        if min(self.calibration_prompts, self.calibration_steps, self.held_out_prompts, self.evaluation_steps) < 1:
            raise RecipeError(f"recipe {self.name}: needs at least one calibration prompt and step, held-out prompt "
                              "and evaluation step")
        if self.calibration_pass not in CALIBRATION_PASSES:
            raise RecipeError(f"recipe {self.name}: calibration_pass must be one of {CALIBRATION_PASSES}, got "
                              f"{self.calibration_pass!r}")
        if self.block_inputs not in ("float", "quantized"):
            raise RecipeError(f"recipe {self.name}: block_inputs must be 'float' or 'quantized', got "
                              f"{self.block_inputs!r}")
        if self.calibration_pass == "block" and not self.block_pattern:
            raise RecipeError(f"recipe {self.name}: calibration_pass 'block' needs a block_pattern (a regex over the "
                              "blocks' module paths, e.g. 'transformer\\.blocks\\.\\d+')")
        self._check_stages()
        for pattern in (*self.keep_float, *([self.block_pattern] if self.block_pattern else []),
                        *(p for _, p in self.stage_keep_float)):
            try:
                re.compile(pattern)
            except re.error as e:
                raise RecipeError(f"recipe {self.name}: pattern {pattern!r} (keep_float / block_pattern): {e}") from e

    def _check_stages(self) -> None:
        """Per-stage formats name quantized stages and known formats; weight-only blocks are MatMulNBits'."""
        for stage, fmt in self.stage_formats:
            if stage not in self.stages:
                raise RecipeError(f"recipe {self.name}: stage_formats names {stage!r}, which is not in stages "
                                  f"{self.stages}")
            if fmt not in FORMATS:
                raise RecipeError(f"recipe {self.name}: stage {stage} format must be one of {FORMATS}, got {fmt!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise RecipeError(f"recipe {self.name}: block_size must be a power of 2 >= 16, got {self.block_size}")
        for stage, method in (("", self.weight_method), *self.stage_weight_methods):
            if stage and stage not in self.stages:
                raise RecipeError(f"recipe {self.name}: stage_weight_methods names {stage!r}, which is not in "
                                  f"stages {self.stages}")
            if method not in WEIGHT_METHODS:
                raise RecipeError(f"recipe {self.name}: weight_method{f' of {stage}' if stage else ''} must be one "
                                  f"of {WEIGHT_METHODS}, got {method!r}")
        if self.embedding_bits not in (None, 4, 8):
            raise RecipeError(f"recipe {self.name}: embedding_bits must be 4, 8 or null, got {self.embedding_bits!r}")
        if not 0.0 < self.streamed_min_cosine <= 1.0 or self.streamed_max_rel <= 0:
            raise RecipeError(f"recipe {self.name}: streamed_min_cosine in (0, 1], streamed_max_rel > 0")

    def format_of(self, stage: str) -> str:
        """The format ``stage`` is quantized to (its ``stage_formats`` entry, else ``format``)."""
        return dict(self.stage_formats).get(stage, self.format)

    def method_of(self, stage: str) -> str:
        """How ``stage``'s weight-only layers are rounded (its ``stage_weight_methods`` entry, else
        ``weight_method``)."""
        return dict(self.stage_weight_methods).get(stage, self.weight_method)

    def keeps_float(self, weight_name: str, stage: str | None = None) -> bool:
        patterns = (*self.keep_float, *(p for s, p in self.stage_keep_float if s == stage))
        return any(re.search(p, weight_name) for p in patterns)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Recipe:
        data = dict(data)
        try:
            data["budget"] = Budget(**data.get("budget", {}))
            for key in ("stages", "keep_float", "held_out_seeds"):
                if key in data:
                    data[key] = tuple(data[key])
            for key in ("stage_formats", "stage_keep_float", "stage_weight_methods"):
                if key in data:
                    data[key] = tuple(tuple(pair) for pair in data[key])
            return cls(**data)
        except TypeError as e:
            raise RecipeError(f"not a recipe: {e}") from e

    def digest(self) -> str:
        """sha256 of the canonical JSON: the manifest's record of exactly which recipe built a bundle."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def calibration_digest(self) -> str:
        """sha256 of what a block pass's state (captured calls, ranges, noise figures) depends on: every field but
        those only the gate reads (`GATE_FIELDS`), and whether noise figures are measured at all. A build that
        missed its budget is rerun with another budget without calibrating again (~50 min for Wan2.2-5B)."""
        data = {k: v for k, v in self.to_json().items() if k not in GATE_FIELDS}
        data["sensitivity"] = self.max_fallback_rounds > 0
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def default_recipe(backbone: str, precision: str, keep_float: tuple[str, ...], target: str = "onnxruntime",
                   block_pattern: str | None = None) -> Recipe:
    """The shipped recipe for a precision. ``backbone`` names the recipe; ``keep_float``: regexes over weight
    names (module paths) of the layers never quantized, the backbone's own (`mc_export.backbones`); ``target``:
    int8 for TensorRT keeps 8-bit weights (no saturation to dodge); ``block_pattern``: the backbone's block
    module paths, where it has one: then calibration walks the blocks (the same ranges, bounded memory)."""
    blocks = {"calibration_pass": "block" if block_pattern else "whole", "block_pattern": block_pattern}
    if precision not in FORMATS:
        raise RecipeError(f"no quantization recipe for precision {precision!r}; expected one of {FORMATS}")
    keep = tuple(keep_float)
    if precision in WEIGHT_ONLY:
        return weight_only_recipe(backbone, precision, keep, ())
    if precision == "int8":
        return Recipe(name=f"{backbone}-int8-w8a8", format="int8", keep_float=keep,
                      reduce_range=target != "tensorrt", **blocks)
    return Recipe(name=f"{backbone}-fp8-e4m3", format="fp8", per_channel_weights=False, calibration="minmax",
                  reduce_range=False, keep_float=keep, **blocks)


def weight_only_recipe(backbone: str, precision: str, keep_float: tuple[str, ...],
                       stage_keep_float: tuple[tuple[str, str], ...], stages: tuple[str, ...] = ("planner", "denoise")
                       ) -> Recipe:
    """The shipped weight-only recipe: ``precision`` (w8 / w4) round-to-nearest, symmetric blocks of 32 along K,
    on the planner (the LLM: its weights are most of a bundle's bytes) and the DiT step; the VAE stays float (a
    convolutional decoder, the last thing before pixels). Budget: 30 dB end to end as int8's; the stage cosine
    0.99 for w8, 0.98 for w4 (4-bit weights cost the small SANA planner 0.95 with every layer in 4 bits, 0.983
    with the most sensitive 20 of 28 moved to 8 bits, at 33 dB end to end). The gate without a float bundle (lazy
    weights, against PyTorch fp32 at the gate shapes): cosine 0.99 for w8, 0.95 for w4. Fallback: the most
    sensitive quarter of the 4-bit layers to 8 bits (8-bit ones to float) per round, up to 8 rounds."""
    four = precision == "w4"
    return Recipe(name=f"{backbone}-{precision}-rtn-b32", format=precision, stages=stages, per_channel_weights=False,
                  calibration="minmax", reduce_range=False, keep_float=tuple(keep_float),
                  stage_keep_float=tuple(stage_keep_float), max_fallback_rounds=8, fallback_fraction=0.25,
                  budget=Budget(min_psnr_db=30.0, min_stage_cosine=0.98 if four else 0.99),
                  streamed_min_cosine=0.95 if four else 0.99)
