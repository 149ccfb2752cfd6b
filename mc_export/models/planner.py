"""The MetaCanvas planner: Qwen2.5-VL reading [chat prefix (+ vision tokens)] [canvas tokens].

Everything runs through transformers' own Qwen2.5-VL modules (embeddings, vision tower, rope index, decoder
layers, final norm); this file adds only the canvas tokens, their M-RoPE positions, the LoRA (canvas positions
only, ``lora.py``) and an explicit attention mask. The computation is split where the ONNX export cuts it:
``embed_prefix`` (token embeddings + vision features) and ``position_ids`` are host/vision-side,
``run_lm`` is the planner graph.

Choices (where the paper is silent):
- Canvas positions: a Qwen2.5-VL video grid after the prompt: t = keyframe index, h = row, w = column, each
  offset by (max prefix position + 1) of its row. Canvas token order is (keyframe, row, column), row-major.
- Attention: the LM's causal mask over prefix + canvas with left-padding keys masked, built here as an
  additive float mask (B, 1, S, S) that transformers passes through untouched, so the exported graph needs no
  mask machinery. Every query may see itself, so a padding query row is never fully masked (no NaN).
- The LM runs with ``attn_implementation="eager"``: plain MatMul/Add/Softmax in the exported graph and an
  additive mask with one meaning on every backend (the vision tower keeps whatever it was built with).
- Prompt states at padding positions are zeroed in ``context_states``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from metacanvas_deploy.mc_export.errors import CheckpointError, ConfigError, InputError
from metacanvas_deploy.mc_export.models.config import MetaCanvasConfig
from metacanvas_deploy.mc_export.models.lora import apply_lora, lora_modules
from metacanvas_deploy.runtime.text import canvas_position_grid
from metacanvas_deploy.runtime.vision import VisionGeometry


@dataclass
class PlannerOutput:
    """What one planner call returns (B prompts)."""

    context_states: torch.Tensor  # (B, L, D_mllm) last-layer (post final norm) states at prefix positions
    canvas_states: torch.Tensor  # (B, N_canvas, D_mllm) last-layer states at the canvas positions
    attention_mask: torch.Tensor  # (B, L) 1 = real prefix token (left padding = 0)


def planner_attention_mask(attention_mask: torch.Tensor, n_canvas: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) prefix mask -> additive (B, 1, L+N, L+N) mask: causal, padding keys masked, diagonal always open."""
    b, length = attention_mask.shape
    s = length + n_canvas
    keys = torch.cat([attention_mask.bool(), attention_mask.new_ones(b, n_canvas, dtype=torch.bool)], dim=1)  # (B, S)
    idx = torch.arange(s, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # (S, S): key j <= query i
    allowed = (causal[None] & keys[:, None, :]) | (idx[None, :] == idx[:, None])[None]  # (B, S, S)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg)[:, None]  # (B, 1, S, S)


class Planner(nn.Module):
    """Qwen2.5-VL + learnable canvas tokens (+ canvas-only LoRA). Takes ownership of ``qwen``: its LM's target
    linears are wrapped in place with LoRA and its LM attention is set to eager."""

    def __init__(self, qwen: transformers.Qwen2_5_VLForConditionalGeneration, cfg: MetaCanvasConfig):
        super().__init__()
        text = qwen.config.text_config
        if text.hidden_size != cfg.mllm_dim:
            raise ConfigError(f"the Qwen LM is {text.hidden_size} wide but metacanvas mllm_dim is {cfg.mllm_dim}")
        qwen.set_attn_implementation({"text_config": "eager"})
        self.qwen = qwen
        self.cfg = cfg
        self.n_canvas = cfg.canvas_tokens
        self.canvas_tokens = nn.Parameter(torch.randn(self.n_canvas, cfg.mllm_dim) * text.initializer_range)
        apply_lora(self.language_model.layers, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, self.n_canvas)

    @property
    def language_model(self) -> nn.Module:
        return self.qwen.model.language_model

    def _scatter_vision(self, embeds, input_ids, token_id, pixels, grid_thw, kind):
        """Put the vision tower's merged features into the rows of ``token_id`` (Qwen's own placement)."""
        n_slots = int((input_ids == token_id).sum())
        if pixels is None:
            if n_slots:
                raise InputError(f"the prompts hold {n_slots} {kind} tokens but no {kind} pixels were given")
            return embeds
        if grid_thw is None or grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise InputError(f"{kind} pixels need a {kind}_grid_thw of shape (n, 3)")
        merge = self.qwen.config.vision_config.spatial_merge_size
        n_feats = int((grid_thw.prod(-1) // merge**2).sum())
        if n_feats != n_slots:
            raise InputError(f"the {kind} inputs give {n_feats} vision tokens but the prompts hold {n_slots} {kind} "
                             "tokens; format the prompts with the same tokens per image/video")
        get = self.qwen.model.get_image_features if kind == "image" else self.qwen.model.get_video_features
        feats = torch.cat(get(pixels, grid_thw).pooler_output).to(embeds.dtype)  # (n_feats, D)
        slots = (input_ids == token_id)[..., None].expand_as(embeds)  # (B, L, D)
        return embeds.masked_scatter(slots, feats)

    def embed_prefix(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                     video_grid_thw=None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) token embeddings, vision features scattered into the image/video pad slots.

        Images (videos) are consumed in order: row 0's first, then row 1's, ...
        """
        cfg = self.qwen.config
        embeds = self.qwen.model.get_input_embeddings()(input_ids)  # (B, L, D)
        embeds = self._scatter_vision(embeds, input_ids, cfg.image_token_id, pixel_values, image_grid_thw, "image")
        return self._scatter_vision(embeds, input_ids, cfg.video_token_id, pixel_values_videos, video_grid_thw,
                                    "video")

    def position_ids(self, input_ids, attention_mask, image_grid_thw=None, video_grid_thw=None) -> torch.Tensor:
        """(3, B, L + N_canvas) M-RoPE positions: Qwen's rope index over the prefix (padding ignored), then the
        canvas grid offset by each row's max prefix position + 1. Videos use Qwen's default time spacing
        (``second_per_grid_ts`` = 1 s, i.e. ``tokens_per_second`` positions per temporal patch)."""
        cfg = self.qwen.config
        mm_types = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()  # (B, L)
        prefix, _ = self.qwen.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_types, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            attention_mask=attention_mask)  # (3, B, L); padding positions are 0
        start = prefix.amax(dim=(0, 2)) + 1  # (B,)
        # Built here rather than kept as a buffer: a model built on `meta` and given real weights later would
        # keep a meta buffer. One definition of the grid, shared with the runtime.
        grid = canvas_position_grid(self.cfg.canvas_keyframes, self.cfg.canvas_height, self.cfg.canvas_width)
        canvas = torch.from_numpy(grid).to(prefix.device)[:, None, :] + start[None, :, None]  # (3, B, N)
        return torch.cat([prefix, canvas.to(prefix.dtype)], dim=2)

    def run_lm(self, prefix_embeds, position_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The planner graph: LM over [prefix embeds | canvas tokens] -> (context_states, canvas_states).

        prefix_embeds (B, L, D), position_ids (3, B, L + N), attention_mask (B, L) with 1 = real token.
        """
        b, length, d = prefix_embeds.shape
        canvas = self.canvas_tokens.to(prefix_embeds.dtype)[None].expand(b, self.n_canvas, d)  # (B, N, D)
        hidden = torch.cat([prefix_embeds, canvas], dim=1)  # (B, L+N, D)
        mask = planner_attention_mask(attention_mask, self.n_canvas, hidden.dtype)  # (B, 1, L+N, L+N)
        out = self.language_model(inputs_embeds=hidden, position_ids=position_ids, attention_mask=mask,
                                  use_cache=False).last_hidden_state  # (B, L+N, D), after the final norm
        context = out[:, :length] * attention_mask[..., None].to(out.dtype)  # (B, L, D), padding zeroed
        return context, out[:, length:]

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                video_grid_thw=None) -> PlannerOutput:
        """Run the planner on left-padded prompts (``runtime.text.PromptTokenizer``) and their vision inputs."""
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise InputError(f"input_ids and attention_mask must both be (B, L); got {tuple(input_ids.shape)} and "
                             f"{tuple(attention_mask.shape)}")
        if bool((attention_mask.sum(-1) == 0).any()):
            raise InputError("a prompt row has no real tokens (attention_mask all 0)")
        embeds = self.embed_prefix(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        pos = self.position_ids(input_ids, attention_mask, image_grid_thw, video_grid_thw)
        context, canvas = self.run_lm(embeds, pos, attention_mask)
        return PlannerOutput(context_states=context, canvas_states=canvas, attention_mask=attention_mask)

    def vision_geometry(self) -> VisionGeometry:
        """The preprocessing geometry (runtime.vision) this planner's vision tower and config expect."""
        vc = self.qwen.config.vision_config
        return VisionGeometry(grid=self.cfg.vision_grid, patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                              temporal_patch_size=vc.temporal_patch_size)

    def metacanvas_state_dict(self) -> dict[str, torch.Tensor]:
        """What MetaCanvas adds to the stock Qwen: ``canvas_tokens`` and the LoRA A/B weights (PEFT-style names
        under ``qwen.model.language_model.layers.*``)."""
        return {k: v for k, v in self.state_dict().items()
                if k == "canvas_tokens" or ".lora_A." in k or ".lora_B." in k}

    def load_metacanvas_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load ``metacanvas_state_dict`` tensors; names and shapes must match this config exactly."""
        expected = self.metacanvas_state_dict()
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        bad = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or bad:
            raise CheckpointError(f"planner weights do not fit this config (canvas {self.cfg.canvas_keyframes}x"
                                  f"{self.cfg.canvas_height}x{self.cfg.canvas_width}, lora_rank {self.cfg.lora_rank}): "
                                  f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad[:3]}")
        self.load_state_dict(sd, strict=False)

    def save_stock(self, directory: str | Path) -> None:
        """Save the Qwen2.5-VL as a stock transformers checkpoint (base weights, LoRA left out) in ``directory``."""
        sd = {k.replace(".base_layer.", "."): v for k, v in self.qwen.state_dict().items()
              if ".lora_A." not in k and ".lora_B." not in k}
        self.qwen.save_pretrained(directory, state_dict=sd, safe_serialization=True)

    @torch.no_grad()
    def randomize_lora(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Random LoRA A and non-zero B, so that tests exercise the LoRA path (a fresh B is zero)."""
        for m in lora_modules(self):
            a, b = m.lora_A.weight, m.lora_B.weight
            a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=generator) * std)


def random_planner(planner_kwargs: dict, cfg: MetaCanvasConfig, seed: int = 0) -> Planner:
    """A Planner with seeded random weights from a preset's ``planner`` (Qwen2_5_VLConfig kwargs), in eval mode."""
    torch.manual_seed(seed)
    qwen = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**planner_kwargs))
    return Planner(qwen, cfg).eval()
