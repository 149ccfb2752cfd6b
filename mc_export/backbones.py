"""One record per backbone: everything the compiler knows about a model family, in one place.

Shared mechanisms look a backbone up here by name and never branch on it: the CLI's choices, the reference
model's adapter and diffusers classes (`models.metacanvas`), the stages a bundle holds (`stages`), the default
quantization recipes (`recipe_for_backbone`). A new backbone is one record here, plus what it points at: its
adapter (`models.backbones.<name>`), its stage components (`components.<name>`), its presets
(`models.presets`) and its runtime host module (`runtime.backbones.<runtime_host>`); tests/test_registry.py
fails when one of them, a default recipe or an end-to-end test is missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from metacanvas_deploy.calib.recipes import WEIGHT_ONLY, Recipe, default_recipe, weight_only_recipe
from metacanvas_deploy.mc_export.components import flux as flux_stages
from metacanvas_deploy.mc_export.components import sana as sana_stages
from metacanvas_deploy.mc_export.components import wan as wan_stages
from metacanvas_deploy.mc_export.components.step_cache import CacheLayout
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.models.backbones.flux import FluxKontextAdapter
from metacanvas_deploy.mc_export.models.backbones.sana import SanaAdapter
from metacanvas_deploy.mc_export.models.backbones.wan import WanAdapter
from metacanvas_deploy.mc_export.models.config import TASKS
from metacanvas_deploy.mc_export.models.presets import Preset, get_preset

# Layers every backbone keeps float (module paths, which are the ONNX weight names): the canvas injector (a
# zero-initialised residual connector: its small output rides on top of the latents), the DiT's output
# projection and its norm (the DiT's own, at its top level: FLUX's single blocks name their MLP-out projection
# `proj_out` too, 1.8B parameters at full size, which are quantized like any block linear). `calib.recipes` says why
# these and the embedders.
COMMON_KEEP_FLOAT = (r"^injector\.", r"^(transformer\.)?proj_out\.", r"^(transformer\.)?norm_out\.")
# Weight-only planner (every backbone's: the planner is MetaCanvas', not the DiT's): the Qwen LM's linears are
# quantized; the connectors (context MLP, canvas prep: small, zero-initialised outputs) and the LoRA adapters
# (rank-r factors whose K is the rank, below any block) stay float. The vision tower is a stage of its own (its
# MLP's K, 3420 at full size, takes no power-of-2 block): the planner's plan leaves it out.
PLANNER_KEEP_FLOAT = (("planner", r"^(?!planner\.qwen\.)"), ("planner", r"\.lora_[AB]\."),
                      ("planner", r"^planner\.qwen\.model\.visual\."))


@dataclass(frozen=True)
class Backbone:
    """What is model-specific about one backbone. ``stage_components(model, ranges, history)`` returns the
    stages after the planner, in run order."""

    name: str
    tasks: tuple[str, ...]  # every task the backbone can serve (a checkpoint may serve fewer: `cfg.tasks`)
    transformer_class: str  # diffusers class names, checked against a checkpoint's configs
    vae_class: str
    scheduler_class: str
    adapter: type  # `models.backbones.*`: the canvas hook and the PyTorch reference sampler
    stage_components: Callable
    runtime_host: str  # the runtime's module for this backbone: `runtime.backbones.<runtime_host>`
    text_dim_field: str  # the diffusers transformer config field that holds the DiT's text width
    keep_float: tuple[str, ...]  # quantization: layers kept float besides COMMON_KEEP_FLOAT (regexes)
    keep_float_edge_blocks: int = 0  # ... and this many first and last DiT blocks
    blocks: str = "transformer_blocks"  # the module path of the DiT's block list (edge blocks' patterns)
    # step caching (`components.step_cache`): the block lists a CACHED step skips, where the target tokens sit
    cache_layout: CacheLayout = CacheLayout(blocks=("transformer_blocks",))

    def preset(self, name: str) -> Preset:
        """The named preset's configs (tiny, small, full: `models.presets`)."""
        return get_preset(self.name, name)

    def diffusers_classes(self) -> tuple[type, type]:
        """The stock diffusers transformer and VAE classes."""
        import diffusers

        return getattr(diffusers, self.transformer_class), getattr(diffusers, self.vae_class)

    def block_pattern(self) -> str:
        """A regex matching one DiT block's module path in full (``transformer.blocks.3``), over every block list
        in ``cache_layout``: INT8/FP8 calibration walks the stage graph block by block at these boundaries
        (`calib.partition`)."""
        return rf"transformer\.({'|'.join(self.cache_layout.blocks)})\.\d+"

    def keep_float_patterns(self, num_layers: int | None = None) -> tuple[str, ...]:
        """The recipe's keep-float regexes: the common layers, this backbone's, and the first and last
        ``keep_float_edge_blocks`` of a DiT ``num_layers`` deep (none when the depth is not given)."""
        edge = self.keep_float_edge_blocks
        blocks: tuple[str, ...] = ()
        if num_layers and edge:
            keep = sorted({*range(min(edge, num_layers)), *range(max(num_layers - edge, 0), num_layers)})
            blocks = tuple(rf"\.{self.blocks}\.{i}\." for i in keep)
        return (*COMMON_KEEP_FLOAT, *self.keep_float, *blocks)


BACKBONES: Mapping[str, Backbone] = MappingProxyType({
    "wan": Backbone(
        name="wan", tasks=TASKS["wan"], transformer_class="WanTransformer3DModel", vae_class="AutoencoderKLWan",
        scheduler_class="UniPCMultistepScheduler", adapter=WanAdapter, stage_components=wan_stages.stage_components,
        runtime_host="wan", text_dim_field="text_dim",
        keep_float=(r"\.patch_embedding\.", r"\.condition_embedder\."), keep_float_edge_blocks=1, blocks="blocks",
        cache_layout=CacheLayout(blocks=("blocks",), target="last")),  # r2v reference frames come first
    "flux": Backbone(
        name="flux", tasks=TASKS["flux"], transformer_class="FluxTransformer2DModel", vae_class="AutoencoderKL",
        scheduler_class="FlowMatchEulerDiscreteScheduler", adapter=FluxKontextAdapter,
        stage_components=flux_stages.stage_components, runtime_host="flux", text_dim_field="joint_attention_dim",
        keep_float=(r"\.x_embedder\.", r"\.context_embedder\.", r"\.time_text_embed\.",
                    r"\.norm1(_context)?\.linear\.", r"\.norm\.linear\."),
        cache_layout=CacheLayout(blocks=("transformer_blocks", "single_transformer_blocks"))),  # context image last
    "sana": Backbone(
        name="sana", tasks=TASKS["sana"], transformer_class="SanaTransformer2DModel", vae_class="AutoencoderDC",
        scheduler_class="FlowMatchEulerDiscreteScheduler", adapter=SanaAdapter,
        stage_components=sana_stages.stage_components, runtime_host="sana", text_dim_field="caption_channels",
        keep_float=(r"\.patch_embed\.", r"\.time_embed\.", r"\.caption_projection\.")),
})

# Every task some backbone serves, in registry order.
ALL_TASKS = tuple(dict.fromkeys(t for b in BACKBONES.values() for t in b.tasks))
# The diffusers schedulers the backbones sample with (a checkpoint may hold any of them).
SCHEDULER_CLASSES = tuple(dict.fromkeys(b.scheduler_class for b in BACKBONES.values()))


def get(name: str) -> Backbone:
    """The record of backbone ``name``; ConfigError naming the known ones otherwise."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}") from None


def recipe_for_backbone(name: str, precision: str, num_layers: int | None = None,
                        target: str = "onnxruntime") -> Recipe:
    """The shipped int8 / fp8 recipe of a backbone. ``num_layers``: the DiT's depth (the edge blocks kept
    float); ``target``: int8 for TensorRT keeps 8-bit weights (`calib.recipes.default_recipe`)."""
    backbone = get(name)
    if precision in WEIGHT_ONLY:  # w8 / w4: the planner's LM and the DiT step, the VAE float
        return weight_only_recipe(backbone.name, precision, backbone.keep_float_patterns(num_layers),
                                  PLANNER_KEEP_FLOAT)
    return default_recipe(backbone.name, precision, backbone.keep_float_patterns(num_layers), target,
                          block_pattern=backbone.block_pattern())


def mixed_recipe_for_backbone(name: str, formats: Mapping[str, str], num_layers: int | None = None,
                              target: str = "onnxruntime") -> Recipe:
    """A per-stage recipe (`build --stage-precision planner=w4,denoise=int8`): each named stage in its format
    (fp32: left float), on the shipped recipe of the first quantized format, with the weight-only planner's
    keep-float patterns whenever a stage is weight-only."""
    quantized = {stage: fmt for stage, fmt in formats.items() if fmt != "fp32"}
    if not quantized:
        raise ConfigError("--stage-precision quantizes no stage (every stage fp32): build --precision fp32")
    base = recipe_for_backbone(name, next(iter(quantized.values())), num_layers, target)
    weight_only = any(fmt in WEIGHT_ONLY for fmt in quantized.values())
    tag = "-".join(f"{stage}.{fmt}" for stage, fmt in quantized.items())
    return dataclasses.replace(base, name=f"{name}-{tag}", stages=tuple(quantized),
                               stage_formats=tuple(quantized.items()),
                               stage_keep_float=PLANNER_KEEP_FLOAT if weight_only else base.stage_keep_float)
