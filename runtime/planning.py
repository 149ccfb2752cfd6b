"""The planner stage's host side: the vision encoder's inputs, the prompt tokens with their vision placeholders,
the position ids, and the one planner call per request. Read-only after construction, so one `Planner` serves
every request of a `runtime.pipeline.Pipeline`, from any thread; the engines come with each call."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from metacanvas_deploy.runtime.backbones.common import shape_of, token_grid
from metacanvas_deploy.runtime.bundle import Bundle
from metacanvas_deploy.runtime.request import PlannerResult, Request
from metacanvas_deploy.runtime.text import PromptTokenizer, planner_position_ids
from metacanvas_deploy.runtime.vision import VisionGeometry, preprocess_images, preprocess_video, video_tokens
from metacanvas_deploy.runtime.vision_index import VisionGeometry as IndexGeometry
from metacanvas_deploy.runtime.vision_index import vision_inputs


class Planner:
    """The bundle's planner facts (`build.planner`, `build.metacanvas`, the vision encoder's geometry) and its
    tokenizer."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        m = self.manifest = bundle.manifest
        self.facts = m.build["planner"]
        self.tokenizer = PromptTokenizer.from_file(bundle.file_path("tokenizer.json"),
                                                   self.facts["max_prompt_tokens"])
        mc = m.build["metacanvas"]
        self.vision_tokens_per_image = mc["vision_tokens_per_image"]
        self.video_frames = mc["planner_video_frames"]
        if "vision_encoder" in m.engines:
            geo = m.engines["vision_encoder"].extra["geometry"]
            self.index_geometry = IndexGeometry.from_config(geo)
            self.geometry = VisionGeometry(grid=round(self.vision_tokens_per_image ** 0.5),
                                           patch_size=geo["patch_size"], merge_size=geo["spatial_merge_size"],
                                           temporal_patch_size=geo["temporal_patch_size"])

    def vision_features(self, engines: Mapping, images=None, video=None):
        """Planner vision inputs -> (features (V, D) or None, tokens per image, video tokens or None)."""
        pixels, grids, n_image, n_video = [], [], [], None
        if images:
            pv, grid = preprocess_images(images, self.geometry)
            pixels.append(pv), grids.append(grid)
            n_image = [self.geometry.tokens_per_image] * len(images)
        if video is not None:
            pv, grid = preprocess_video(video, self.geometry, self.video_frames)
            pixels.append(pv), grids.append(grid)
            n_video = video_tokens(self.geometry, self.video_frames)
        if not pixels:
            return None, [], None
        grid = np.concatenate(grids)
        feeds = {"pixel_values": np.concatenate(pixels), **vision_inputs(grid, self.index_geometry)}
        return engines["vision_encoder"](feeds)["image_features"], n_image, n_video

    def tokens(self, req: Request, prompts: list[str], n_image, n_video):
        """(input_ids, attention_mask), (rows, L) int64, left-padded to the build's minimum length if shorter;
        a prompt longer than the build's range is a clear error."""
        rows = len(prompts)
        ids, mask = self.tokenizer.encode_batch(prompts, [n_image] * rows, [n_video] * rows, allow_empty=True)
        lo, hi = self.manifest.ranges["prompt_tokens"]
        if ids.shape[1] < lo:  # pad on the left to the build's minimum: the DiT then sees zero rows there,
            # as with diffusers' fixed-length text padding (the default builds take length 1 and never pad)
            ids, mask = self.tokenizer.encode_batch(prompts, [n_image] * rows, [n_video] * rows,
                                                    allow_empty=True, pad_to=lo)
        elif ids.shape[1] > hi:
            self.bundle.check_request(req.height, req.width, req.num_frames, ids.shape[1])
        return ids, mask

    def plan(self, engines: Mapping, req: Request, rows: int, images, video) -> PlannerResult:
        """Vision encoder + planner, once per request: prompt embeddings and the canvas on the token grid.
        ``rows``: 2 with the negative prompt (CFG), else 1; ``images``/``video``: what the planner sees."""
        feats, n_image, n_video = self.vision_features(engines, images, video)
        if hasattr(engines, "release"):
            engines.release("vision_encoder")
        prompts = [req.negative_prompt, req.prompt][-rows:]
        ids, mask = self.tokens(req, prompts, n_image, n_video)
        f = self.facts
        # grids are consumed in order, row after row: every row sees the same vision inputs
        grids = {k: np.tile(v, (rows, 1)) for k, v in self._grids(images, video).items()}
        # the prefix positions only: the planner graph derives the canvas positions itself
        pos = planner_position_ids(ids, mask, image_token_id=f["image_token_id"], video_token_id=f["video_token_id"],
                                   canvas=(1, 1, 1), spatial_merge_size=f["spatial_merge_size"],
                                   tokens_per_second=f["tokens_per_second"], **grids)[:, :, : ids.shape[1]]
        index = np.full(ids.shape, -1, np.int64)
        is_vis = (ids == f["image_token_id"]) | (ids == f["video_token_id"])
        for r in range(rows):
            index[r, is_vis[r]] = np.arange(int(is_vis[r].sum()))
        d_mllm = self.manifest.engines["planner"].spec("vision_embeds").dims[1]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                 "vision_embeds": feats if feats is not None else np.zeros((1, d_mllm), np.float32),
                 "vision_index": index, "token_grid": np.zeros(self._grid_shape(req), np.float32)}
        out = engines["planner"](feeds)
        return PlannerResult(out["prompt_embeds"], out["canvas"], out.get("pooled_prompt_embeds"), mask, rows)

    def _grid_shape(self, req: Request) -> tuple[int, ...]:
        t, h, w = token_grid(self.manifest, req)
        return shape_of(self.manifest.engines["planner"].spec("token_grid"),
                        {"latent_frames": t, "h_tok": h, "w_tok": w})

    def _grids(self, images, video) -> dict:
        g = {}
        if images:
            side = self.geometry.grid * self.geometry.merge_size
            g["image_grid_thw"] = np.array([[1, side, side]] * len(images), np.int64)
        if video is not None:
            side = self.geometry.grid * self.geometry.merge_size
            g["video_grid_thw"] = np.array([[self.video_frames // self.geometry.temporal_patch_size,
                                             side, side]], np.int64)
        return g
