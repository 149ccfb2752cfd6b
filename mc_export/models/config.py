"""The MetaCanvas-specific configuration: everything the paper adds on top of a stock MLLM and DiT.

Stock components keep their own configs (transformers' Qwen2_5_VLConfig, diffusers' model configs); this
dataclass holds the canvas geometry, connector sizes, LoRA and the choices this package makes where the paper
is silent (each a field, so a checkpoint that differs can say so). It is saved as ``metacanvas/config.json``
in a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from metacanvas_deploy.mc_export.errors import ConfigError

BACKBONES = ("wan", "flux", "sana")

# Which tasks each backbone serves, and which of them need the condition/mask channels (Wan).
TASKS = {
    "wan": ("t2v", "i2v", "v2v", "r2v"),
    "flux": ("edit",),
    "sana": ("t2i",),
}
WAN_CONDITIONED_TASKS = ("v2v", "r2v")

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MetaCanvasConfig:
    """MetaCanvas additions for one backbone. Dims are D_mllm (planner), D_txt (DiT text), D_dit."""

    backbone: str
    mllm_dim: int  # D_mllm: the planner LM's hidden size
    text_dim: int  # D_txt: the width of the DiT's text conditioning (umT5/T5/Gemma width)
    dit_dim: int  # D_dit: the DiT's patch-embedding width
    # Canvas geometry: keyframes x rows x columns of learnable tokens. keyframes == 1 is a 2D canvas.
    canvas_keyframes: int
    canvas_height: int
    canvas_width: int
    # LoRA on the planner LM, applied to canvas positions only. rank 0 = no LoRA.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # Canvas preparation: one pre-LN transformer block at D_mllm.
    prep_heads: int = 8
    prep_mlp_ratio: float = 4.0
    # Per-step canvas injector: SANA-style linear-attention block at D_dit.
    injector_heads: int = 8
    injector_mlp_ratio: float = 2.5
    # Wan input layout: [noisy 48 | condition 48 | mask 1]; 0 for a stock T2V/I2V checkpoint.
    condition_channels: int = 0
    # FLUX pooled projection width (Linear(D_mllm, pooled_dim) over the mean context state); 0 elsewhere.
    pooled_dim: int = 0
    # Planner vision inputs: merged tokens per image (144 = 12 x 12 at patch 14, merge 2: 336 px).
    vision_tokens_per_image: int = 144
    # Frames of an input video the planner sees (a Qwen video grid; temporal patch 2).
    planner_video_frames: int = 4
    # Longest planner prefix a build accepts, in tokens: chat template and vision tokens included (a Wan v2v
    # prompt carries 2 x 144 video tokens at full size).
    max_prompt_tokens: int = 512
    norm_eps: float = 1e-6
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def canvas_tokens(self) -> int:
        return self.canvas_keyframes * self.canvas_height * self.canvas_width

    @property
    def is_video(self) -> bool:
        return self.canvas_keyframes > 1

    @property
    def tasks(self) -> tuple[str, ...]:
        tasks = TASKS[self.backbone]
        if self.backbone == "wan" and self.condition_channels == 0:
            tasks = tuple(t for t in tasks if t not in WAN_CONDITIONED_TASKS)
        return tasks

    @property
    def vision_grid(self) -> int:
        """Merged tokens per side of an input image (12 for 144 tokens)."""
        return int(round(self.vision_tokens_per_image**0.5))

    def validate(self) -> None:
        """All "X requires Y" rules of the MetaCanvas config, in one place."""
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        for name in ("mllm_dim", "text_dim", "dit_dim", "canvas_keyframes", "canvas_height", "canvas_width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.backbone != "wan" and self.canvas_keyframes != 1:
            raise ConfigError(f"{self.backbone} is an image backbone: canvas_keyframes must be 1, got {self.canvas_keyframes}")
        if self.backbone == "wan" and self.canvas_keyframes < 2:
            raise ConfigError("wan needs at least 2 canvas keyframes (first and last latent frame)")
        if self.mllm_dim % self.prep_heads or self.dit_dim % self.injector_heads:
            raise ConfigError("prep_heads must divide mllm_dim and injector_heads must divide dit_dim")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.condition_channels not in (0, 49) and self.backbone == "wan":
            # 48 condition latents + 1 mask for Wan2.2's 48-channel VAE; tiny VAEs have fewer channels.
            if self.condition_channels < 2:
                raise ConfigError(f"condition_channels must be 0 or latent channels + 1, got {self.condition_channels}")
        if self.backbone != "wan" and self.condition_channels:
            raise ConfigError("condition_channels is a Wan input-layout field; it must be 0 for flux and sana")
        if self.backbone == "flux" and self.pooled_dim <= 0:
            raise ConfigError("flux needs pooled_dim > 0 (the width of FLUX's pooled text projection, 768)")
        if self.vision_grid**2 != self.vision_tokens_per_image:
            raise ConfigError(f"vision_tokens_per_image must be a square, got {self.vision_tokens_per_image}")
        if self.planner_video_frames < 2 or self.planner_video_frames % 2:
            raise ConfigError("planner_video_frames must be a positive even number (Qwen's temporal patch is 2)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MetaCanvasConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"metacanvas config has unknown fields {sorted(unknown)}")
        d = dict(d)
        if "lora_targets" in d:
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> MetaCanvasConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def check_task(self, task: str) -> None:
        from metacanvas_deploy.mc_export.errors import TaskError

        all_tasks = sorted({t for ts in TASKS.values() for t in ts})
        if task not in all_tasks:
            raise TaskError(f"unknown task {task!r}; expected one of {', '.join(all_tasks)}")
        if task not in self.tasks:
            hint = ""
            if self.backbone == "wan" and task in WAN_CONDITIONED_TASKS:
                hint = " (this checkpoint has condition_channels=0: a stock T2V/I2V layout)"
            raise TaskError(
                f"task {task!r} is not served by backbone {self.backbone!r}{hint}; it serves {', '.join(self.tasks)}"
            )
