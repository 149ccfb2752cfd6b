"""The planner stage: token embeddings + vision features -> Qwen2.5-VL LM over [prefix | canvas tokens] ->
context MLP (prompt embeddings), FLUX's pooled projection, and the canvas preparation resized to the DiT token
grid. Everything here is timestep-independent: the runtime calls it once per request.

Host-side recipe (runtime.pipeline):
    input_ids, attention_mask   `runtime.text.PromptTokenizer.encode_batch` (left padded; rows = [neg, pos])
    position_ids                `runtime.text.planner_position_ids(...)[:, :, :prompt_tokens]` (the canvas
                                positions are derived in the graph: grid + each row's max prefix position + 1)
    vision_embeds               the vision encoder's features (V, D_mllm), or one zero row when there are none
    vision_index                (rows, prompt_tokens): for each image/video pad token, its row in vision_embeds
                                (in order, the same for every row: every row sees the same vision inputs), else -1
    token_grid                  zeros (latent_frames, h_tok, w_tok): only its shape is read (the canvas is
                                resized to it once, here, instead of once per step)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.components.spec import Component, ComponentSpec, Tolerance
from metacanvas_deploy.runtime.tensor_spec import DimRange, TensorSpec
from metacanvas_deploy.runtime.text import canvas_position_grid


class PlannerGraph(nn.Module):
    """The exported computation (shares the model's weights)."""

    def __init__(self, model):
        super().__init__()
        cfg = model.cfg
        self.planner, self.context_mlp, self.pooled_proj = model.planner, model.context_mlp, model.pooled_proj
        self.canvas_prep = model.canvas_prep
        grid = canvas_position_grid(cfg.canvas_keyframes, cfg.canvas_height, cfg.canvas_width)
        self.register_buffer("canvas_grid", torch.from_numpy(grid), persistent=False)  # (3, N)

    def forward(self, input_ids, attention_mask, position_ids, vision_embeds, vision_index, token_grid):
        tok = self.planner.qwen.model.get_input_embeddings()(input_ids)  # (rows, L, D)
        vis = vision_embeds[vision_index.clamp(min=0)]  # (rows, L, D)
        embeds = torch.where((vision_index >= 0).unsqueeze(-1), vis.to(tok.dtype), tok)
        start = position_ids.amax(dim=(0, 2)) + 1  # (rows,)
        canvas_pos = self.canvas_grid[:, None, :] + start[None, :, None]  # (3, rows, N)
        pos = torch.cat([position_ids, canvas_pos], dim=2)  # (3, rows, L + N)
        context, canvas_states = self.planner.run_lm(embeds, pos, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(context.dtype)  # (rows, L, 1)
        prompt_embeds = self.context_mlp(context) * mask  # (rows, L, D_txt), padding zeroed
        frames, h_tok, w_tok = token_grid.shape
        canvas = self.canvas_prep(canvas_states, frames, h_tok, w_tok)  # (rows, T, H, W, D_dit)
        if self.pooled_proj is None:
            return prompt_embeds, canvas
        return prompt_embeds, canvas, self.pooled_proj(context, attention_mask)


class PlannerComponent(Component):
    """Stage "planner"."""

    def __init__(self, model, ranges: BuildRanges):
        self.model = model
        cfg = model.cfg
        self.tokens_per_image = cfg.vision_tokens_per_image
        vision_max = max(ranges.max_images * cfg.vision_tokens_per_image,
                         cfg.vision_tokens_per_image * cfg.planner_video_frames // 2, 2)
        dims = {"rows": DimRange(1, 2, 2), "prompt_tokens": DimRange(*ranges.prompt_tokens),
                "vision_tokens": DimRange(1, min(cfg.vision_tokens_per_image, vision_max), vision_max),
                **ranges.token_dims(model.adapter)}
        inputs = (
            TensorSpec("input_ids", "int64", ("rows", "prompt_tokens")),
            TensorSpec("attention_mask", "int64", ("rows", "prompt_tokens")),
            TensorSpec("position_ids", "int64", (3, "rows", "prompt_tokens")),
            TensorSpec("vision_embeds", "float32", ("vision_tokens", cfg.mllm_dim)),
            TensorSpec("vision_index", "int64", ("rows", "prompt_tokens")),
            TensorSpec("token_grid", "float32", ("latent_frames", "h_tok", "w_tok")),
        )
        outputs = [
            TensorSpec("prompt_embeds", "float32", ("rows", "prompt_tokens", cfg.text_dim)),
            TensorSpec("canvas", "float32", ("rows", "latent_frames", "h_tok", "w_tok", cfg.dit_dim)),
        ]
        if cfg.pooled_dim:
            outputs.append(TensorSpec("pooled_prompt_embeds", "float32", ("rows", cfg.pooled_dim)))
        if dims["latent_frames"].max == 1:  # image backbones: a fixed single frame
            dims.pop("latent_frames")
            inputs = inputs[:-1] + (TensorSpec("token_grid", "float32", (1, "h_tok", "w_tok")),)
            outputs[1] = TensorSpec("canvas", "float32", ("rows", 1, "h_tok", "w_tok", cfg.dit_dim))
        # 12 fp32 layers (LM + connectors) sum in another order than eager PyTorch: 1e-4 of the output scale.
        self.spec = ComponentSpec("planner", inputs, tuple(outputs), dims, Tolerance(max_rel=1e-4),
                                  extra={"canvas_tokens": cfg.canvas_tokens,
                                         "vision_tokens_per_image": cfg.vision_tokens_per_image})
        self._module = PlannerGraph(model).eval()

    def module(self) -> nn.Module:
        return self._module

    def sample_inputs(self, which: str = "opt", seed: int = 0, overrides=None) -> dict[str, np.ndarray]:
        """Real token ids (random text, left padding in row 0 when rows = 2), Qwen positions, one image's
        features scattered into its pad tokens (when the prompt is long enough)."""
        rng = np.random.default_rng(seed)
        shapes = self.spec.shapes(which, overrides)
        rows, length = shapes["input_ids"]
        v = shapes["vision_embeds"][0]
        vocab = self.model.planner.qwen.config.text_config.vocab_size
        ids = rng.integers(0, min(vocab, 256), size=(rows, length)).astype(np.int64)
        mask = np.ones((rows, length), np.int64)
        if rows > 1:
            mask[0, : length // 3] = 0  # left padding: the negative prompt is shorter
        pos = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0)[None].repeat(3, 0).astype(np.int64)
        index = np.full((rows, length), -1, np.int64)
        n_vis = min(v, length // 2)
        index[:, length - n_vis:] = np.arange(n_vis)  # vision tokens near the end of every row
        feats = rng.standard_normal((v, self.model.cfg.mllm_dim)).astype(np.float32)
        grid = np.zeros(shapes["token_grid"], np.float32)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "vision_embeds": feats,
                "vision_index": index, "token_grid": grid}
