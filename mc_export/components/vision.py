"""The vision-encoder stage: Qwen2.5-VL's vision tower for the planner's image/video inputs (editing,
image-to-video, references, video editing). One graph for any number of images, or a video, at the planner's
fixed square (`vision_tokens_per_image`), whose windows and frames are the graph's static segment lengths.

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
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.export.qwen_vision import VISION_RTOL, ExportableQwenVision
from metacanvas_deploy.runtime.errors import ShapeError
from metacanvas_deploy.runtime.tensor_spec import DimRange, TensorSpec
from metacanvas_deploy.runtime.vision_index import VisionGeometry, segment_layout, vision_inputs


class VisionComponent(Component):
    """Stage "vision_encoder"."""

    def __init__(self, model, ranges: BuildRanges):
        visual = model.planner.qwen.model.visual
        self.geo = VisionGeometry.from_config(visual.config)
        self.grid = model.cfg.vision_grid * self.geo.spatial_merge_size  # patches per side of one image
        per_image = model.cfg.vision_tokens_per_image
        videos = model.cfg.planner_video_frames // self.geo.temporal_patch_size  # frames of a video's grid
        _, windows, per_window = self._segments(per_image)
        unit = self.geo.merge_unit
        d = self.geo.head_dim
        # a request brings images or a video, never both (runtime.backbones.*.planner_vision)
        frames = max(ranges.max_images, videos)
        dims = {"merged_tokens": DimRange(per_image, per_image, frames * per_image),
                "vision_frames": DimRange(1, 1, frames),
                "windows_per_frame": DimRange(windows, windows, windows),  # static: the square is fixed
                "tokens_per_window": DimRange(per_window, per_window, per_window)}
        rotary = ("vision_frames", "windows_per_frame", f"{unit}*tokens_per_window", d)
        inputs = (
            TensorSpec("pixel_values", "float32", (f"{unit}*merged_tokens", self.geo.patch_dim)),
            TensorSpec("rotary_cos", "float32", rotary),
            TensorSpec("rotary_sin", "float32", rotary),
            TensorSpec("window_index", "int64", ("vision_frames", "windows_per_frame", "tokens_per_window")),
            TensorSpec("reverse_index", "int64", ("merged_tokens",)),
        )
        outputs = (TensorSpec("image_features", "float32", ("merged_tokens", model.cfg.mllm_dim)),)
        self.spec = ComponentSpec("vision_encoder", inputs, outputs, dims, Tolerance(max_rel=VISION_RTOL),
                                  extra={"geometry": dataclasses.asdict(self.geo)})
        self._module = ExportableQwenVision(visual).eval()

    def module(self) -> nn.Module:
        return self._module

    def _segments(self, per_image: int) -> tuple[int, int, int]:
        """(1, windows, merged tokens per window) of one image; ConfigError if the windows do not tile it."""
        try:
            return segment_layout(np.array([[1, self.grid, self.grid]]), self.geo)
        except ShapeError as e:
            ws = self.geo.window_tokens
            raise ConfigError(f"vision_tokens_per_image={per_image} cannot be built: {e}. Pick a square whose "
                              f"side is at most {ws} or a multiple of {ws} (e.g. 16, 64, 144)") from e

    def sample_inputs(self, which: str = "opt", seed: int = 0, overrides=None) -> dict[str, np.ndarray]:
        """Whole images of the planner's fixed size: one per frame of the profile point."""
        n = self.spec.shapes(which, overrides)["window_index"][0]
        grid = np.array([[1, self.grid, self.grid]] * n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        pixels = rng.standard_normal((n * self.grid * self.grid, self.geo.patch_dim)).astype(np.float32)
        return {"pixel_values": pixels, **vision_inputs(grid, self.geo)}
