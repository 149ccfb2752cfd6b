"""The request ranges a build covers, and the symbolic-dim ranges every stage derives from them."""

from __future__ import annotations

from dataclasses import dataclass

from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.runtime.tensor_spec import DimRange

Triple = tuple[int, int, int]


def _check(name: str, t: Triple, multiple: int = 1) -> None:
    lo, opt, hi = t
    if not (0 < lo <= opt <= hi):
        raise ConfigError(f"{name} range must satisfy 0 < min <= opt <= max, got {lo}:{opt}:{hi}")
    bad = [v for v in t if v % multiple]
    if bad:
        raise ConfigError(f"{name} {bad[0]} is not a multiple of {multiple}")


@dataclass(frozen=True)
class BuildRanges:
    """Pixel sizes, frame counts and prompt lengths (min, opt, max) that one bundle serves."""

    height: Triple
    width: Triple
    num_frames: Triple  # (1, 1, 1) for image backbones
    prompt_tokens: Triple  # planner prefix length: chat template + prompt + vision tokens
    max_images: int = 2  # planner image inputs per request (edit/i2v: 1; r2v: references)
    max_reference_frames: int = 2  # Wan r2v: reference latent frames

    def validate(self, adapter, max_prompt_tokens: int) -> None:
        """Every range is ordered and lands on sizes the backbone accepts."""
        for which in ("min", "opt", "max"):
            i = ("min", "opt", "max").index(which)
            adapter.check_shape(self.height[i], self.width[i], self.num_frames[i])
        _check("prompt_tokens", self.prompt_tokens)
        if self.prompt_tokens[2] > max_prompt_tokens:
            raise ConfigError(f"prompt_tokens max {self.prompt_tokens[2]} exceeds the checkpoint's "
                              f"max_prompt_tokens {max_prompt_tokens}")

    def token_dims(self, adapter) -> dict[str, DimRange]:
        """latent_frames, h_tok, w_tok: the DiT token grid at each end of the pixel ranges."""
        grids = [adapter.token_grid(self.height[i], self.width[i], self.num_frames[i]) for i in range(3)]
        return {name: DimRange(*(g[axis] for g in grids)) for axis, name in
                enumerate(("latent_frames", "h_tok", "w_tok"))}

    def to_json(self) -> dict:
        return {"height": list(self.height), "width": list(self.width), "num_frames": list(self.num_frames),
                "prompt_tokens": list(self.prompt_tokens), "max_images": self.max_images,
                "max_reference_frames": self.max_reference_frames}


def default_ranges(adapter, defaults, max_prompt_tokens: int) -> BuildRanges:
    """A preset's default request at opt, half to double its pixel size, up to about twice its frames."""
    step = adapter.size_multiple

    def span(v: int) -> Triple:
        return (max(step, v // 2 // step * step), v, v * 2)

    frames = (1, 1, 1)
    if adapter.frame_multiple:
        frames = (1, defaults.num_frames, 2 * defaults.num_frames - 1)
    return BuildRanges(height=span(defaults.height), width=span(defaults.width), num_frames=frames,
                       prompt_tokens=(1, min(96, max_prompt_tokens), max_prompt_tokens))
