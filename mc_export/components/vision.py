"""The vision-encoder stage: Qwen2.5-VL's vision tower for the planner's image/video inputs (editing,
image-to-video, references, video editing). One graph for any number of images and any grid.

Host-side recipe (runtime.pipeline): `runtime.vision.preprocess_images` / `preprocess_video` give
`pixel_values` and `grid_thw`; `runtime.vision_index.vision_inputs(grid_thw, geometry)` gives every other input.
The output rows are the planner's `vision_embeds`, in processor order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import nn

from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.components.spec import Component, ComponentSpec, Tolerance
from metacanvas_deploy.mc_export.export.qwen_vision import VISION_RTOL, ExportableQwenVision
from metacanvas_deploy.runtime.tensor_spec import DimRange, TensorSpec
from metacanvas_deploy.runtime.vision_index import VisionGeometry, vision_inputs


class VisionComponent(Component):
    """Stage "vision_encoder"."""

    def __init__(self, model, ranges: BuildRanges):
        visual = model.planner.qwen.model.visual
        self.geo = VisionGeometry.from_config(visual.config)
        self.grid = model.cfg.vision_grid * self.geo.spatial_merge_size  # patches per side of one image
        per_image = model.cfg.vision_tokens_per_image
        video = per_image * model.cfg.planner_video_frames // self.geo.temporal_patch_size
        most = max(ranges.max_images * per_image, video)
        unit = self.geo.merge_unit
        d = self.geo.head_dim
        dims = {"merged_tokens": DimRange(per_image, per_image, most)}
        patches = f"{unit}*merged_tokens"
        inputs = (
            TensorSpec("pixel_values", "float32", (patches, self.geo.patch_dim)),
            TensorSpec("rotary_cos", "float32", (patches, d)),
            TensorSpec("rotary_sin", "float32", (patches, d)),
            TensorSpec("window_index", "int64", ("merged_tokens",)),
            TensorSpec("reverse_index", "int64", ("merged_tokens",)),
            TensorSpec("full_segment_ids", "int64", (patches,)),
            TensorSpec("window_segment_ids", "int64", (patches,)),
        )
        outputs = (TensorSpec("image_features", "float32", ("merged_tokens", model.cfg.mllm_dim)),)
        self.spec = ComponentSpec("vision_encoder", inputs, outputs, dims, Tolerance(max_rel=VISION_RTOL),
                                  extra={"geometry": dataclasses.asdict(self.geo)})
        self._module = ExportableQwenVision(visual).eval()

    def module(self) -> nn.Module:
        return self._module

    def sample_inputs(self, which: str = "opt", seed: int = 0, overrides=None) -> dict[str, np.ndarray]:
        """Whole images of the planner's fixed size: as many as the merged-token count allows."""
        tokens = self.spec.shapes(which, overrides)["window_index"][0]
        per_image = (self.grid // self.geo.spatial_merge_size) ** 2
        n = max(1, tokens // per_image)
        grid = np.array([[1, self.grid, self.grid]] * n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        pixels = rng.standard_normal((n * self.grid * self.grid, self.geo.patch_dim)).astype(np.float32)
        return {"pixel_values": pixels, **vision_inputs(grid, self.geo)}
