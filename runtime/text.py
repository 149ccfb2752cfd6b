"""Planner prompt text: Qwen2.5-VL's chat template (one user turn) and batched, left-padded tokenization.

numpy + `tokenizers` + stdlib only: the torch-free runtime and the PyTorch reference both use this file.

The planner's prefix is the checkpoint's chat template rendered for one user turn (vision tokens first, then
the prompt) with no generation prompt, and it ends exactly at that turn's ``<|im_end|>``: the template's
trailing newline is dropped, because the canvas tokens follow ``<|im_end|>`` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from metacanvas_deploy.runtime.errors import BundleError, RuntimeInputError

SYSTEM_PROMPT = "You are a helpful assistant."
PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
# Control tokens the prompt structure relies on: a user prompt may not contain them as text, or it could
# close the turn early or claim vision slots that no image fills.
RESERVED_TOKENS = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Qwen2-VL / Qwen2.5-VL-Instruct's chat template, verbatim from the official checkpoints' chat_template.json.
# The tiny tokenizer ships it (mc_export.models.tokenizer); `format_prompt` renders the one case we use.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def _check_counts(n_image_tokens: Sequence[int], n_video_tokens: int | None) -> None:
    for n in n_image_tokens:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise RuntimeInputError(f"tokens per image must be positive integers, got {list(n_image_tokens)}")
    if n_video_tokens is not None and (isinstance(n_video_tokens, bool) or
                                       not isinstance(n_video_tokens, (int, np.integer)) or n_video_tokens <= 0):
        raise RuntimeInputError(f"video tokens must be a positive integer or None, got {n_video_tokens!r}")


def format_prompt(prompt: str, n_image_tokens: Sequence[int] = (), n_video_tokens: int | None = None, *,
                  allow_empty: bool = False) -> str:
    """The planner prefix text for one prompt: Qwen's chat template with one user turn, no generation prompt.

    ``n_image_tokens`` holds the merged vision tokens of each input image (in order), ``n_video_tokens`` those
    of the input video (None = no video). Vision blocks come before the prompt text, images before the video,
    each as ``<|vision_start|>`` + pad * n + ``<|vision_end|>`` (the template's single pad expanded the way
    Qwen's processor does). The text ends at the turn's ``<|im_end|>``.

    An empty (or whitespace-only) prompt is an error unless ``allow_empty`` (the default negative prompt is
    empty); a prompt that contains one of ``RESERVED_TOKENS`` as text is always an error.
    """
    if not isinstance(prompt, str):
        raise RuntimeInputError(f"a prompt must be a str, got {type(prompt).__name__}")
    if not allow_empty and not prompt.strip():
        raise RuntimeInputError("the prompt is empty; give a non-empty prompt (only negative prompts may be empty)")
    found = [tok for tok in RESERVED_TOKENS if tok in prompt]
    if found:
        raise RuntimeInputError(f"the prompt contains the control token(s) {found}; remove them from the text "
                                "(images and videos are passed as inputs, not as tokens)")
    _check_counts(n_image_tokens, n_video_tokens)
    vision = "".join(VISION_START + IMAGE_PAD * int(n) + VISION_END for n in n_image_tokens)
    if n_video_tokens is not None:
        vision += VISION_START + VIDEO_PAD * int(n_video_tokens) + VISION_END
    return (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
            f"{IM_START}user\n{vision}{prompt}{IM_END}")


class PromptTokenizer:
    """Tokenizes planner prompts into left-padded ``input_ids`` / ``attention_mask`` arrays.

    Wraps a ``tokenizers.Tokenizer`` (the checkpoint's ``tokenizer.json``: Qwen's BPE for a real checkpoint,
    the byte-level tiny tokenizer for the tiny preset). Left padding puts every row's last prefix token in the
    last column, so the canvas tokens appended after the prefix sit at the same positions in every row.
    """

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, pad_token: str = PAD_TOKEN):
        if max_tokens <= 0:
            raise RuntimeInputError(f"max_tokens must be positive, got {max_tokens}")
        self._tok = tokenizer
        self.max_tokens = int(max_tokens)
        self.ids = {}
        for token in dict.fromkeys((pad_token, *RESERVED_TOKENS)):
            tid = tokenizer.token_to_id(token)
            if tid is None or tokenizer.encode(token, add_special_tokens=False).ids != [tid]:
                raise BundleError(f"the tokenizer has no single special token {token!r}; a Qwen2.5-VL planner "
                                  "needs Qwen's special tokens. Use the checkpoint's own tokenizer.json")
            self.ids[token] = tid
        self.pad_id = self.ids[pad_token]

    @property
    def tokenizer(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @classmethod
    def from_file(cls, path: str | Path, max_tokens: int, pad_token: str = PAD_TOKEN) -> PromptTokenizer:
        """Load a ``tokenizer.json`` file (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise BundleError(f"no tokenizer file at {path}; a planner folder holds tokenizer.json")
        return cls(Tokenizer.from_file(str(path)), max_tokens, pad_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of an already formatted prefix (no special tokens added around it)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, prompts: Sequence[str], n_image_tokens: Sequence[Sequence[int]] | None = None,
                     n_video_tokens: Sequence[int | None] | None = None, *, allow_empty: bool = False,
                     pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Format (``format_prompt``) and tokenize a batch; left-pad to the longest row (or ``pad_to``).

        ``n_image_tokens[i]`` lists the vision tokens of row i's images (None or empty = none),
        ``n_video_tokens[i]`` those of its video (None = none). Returns ``input_ids`` and ``attention_mask``,
        both int64 (B, L); padding uses the pad token and mask 0. Rows longer than ``max_tokens`` (template and
        vision tokens included) are an error.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise RuntimeInputError("prompts must be a non-empty list of str")
        b = len(prompts)
        images = [()] * b if n_image_tokens is None else list(n_image_tokens)
        videos = [None] * b if n_video_tokens is None else list(n_video_tokens)
        if len(images) != b or len(videos) != b:
            raise RuntimeInputError(f"{b} prompts but {len(images)} image-token lists and {len(videos)} video entries")
        rows = []
        for i, (prompt, imgs, vid) in enumerate(zip(prompts, images, videos)):
            ids = self.encode(format_prompt(prompt, imgs or (), vid, allow_empty=allow_empty))
            if len(ids) > self.max_tokens:
                raise RuntimeInputError(
                    f"prompt {i} is {len(ids)} tokens with the chat template and vision tokens; this build accepts "
                    f"at most {self.max_tokens} (max_prompt_tokens). Shorten the prompt or rebuild with a larger "
                    "max_prompt_tokens")
            rows.append(ids)
        length = max(len(r) for r in rows)
        if pad_to is not None:
            if pad_to < length:
                raise RuntimeInputError(f"pad_to={pad_to} is shorter than the longest prompt ({length} tokens)")
            length = pad_to
        input_ids = np.full((b, length), self.pad_id, dtype=np.int64)  # (B, L)
        attention_mask = np.zeros((b, length), dtype=np.int64)  # (B, L)
        for i, ids in enumerate(rows):
            input_ids[i, length - len(ids):] = ids
            attention_mask[i, length - len(ids):] = 1
        return input_ids, attention_mask


def canvas_position_grid(keyframes: int, height: int, width: int) -> np.ndarray:
    """(3, K*h*w) int64 (t, h, w) of the canvas tokens before the offset, in token order (keyframe, row, col)."""
    t, h, w = np.meshgrid(np.arange(keyframes), np.arange(height), np.arange(width), indexing="ij")
    return np.stack([t, h, w]).reshape(3, -1).astype(np.int64)  # (3, K*h*w)


def planner_position_ids(input_ids: np.ndarray, attention_mask: np.ndarray, *, image_token_id: int,
                         video_token_id: int, canvas: tuple[int, int, int], spatial_merge_size: int,
                         tokens_per_second: float, image_grid_thw: np.ndarray | None = None,
                         video_grid_thw: np.ndarray | None = None) -> np.ndarray:
    """The planner graph's ``position_ids`` (3, B, L + N_canvas) int64, in numpy (the runtime's copy of
    ``mc_export.models.planner.Planner.position_ids``; tests/test_planner.py checks they agree).

    Prefix: Qwen2.5-VL's rope index (``get_rope_index``): text positions count up; a vision group of grid
    (t, h, w) patches gets t = start + floor(i * interval), h/w = start + merged row/column, then the count
    resumes at start + max(h, w) / merge; interval = tokens_per_second * 1 s for videos (Qwen's default
    ``second_per_grid_ts``), 1 for images. Padding positions are 0. Canvas: ``canvas`` = (K, h, w) grid,
    offset by the row's max prefix position + 1. Grids are consumed in order, row by row.
    """
    b, length = input_ids.shape
    grids = {1: iter(np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)),
             2: iter(np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw))}
    kinds = (input_ids == image_token_id).astype(np.int64) + 2 * (input_ids == video_token_id)  # (B, L)
    grid = canvas_position_grid(*canvas)
    out = np.zeros((3, b, length + grid.shape[1]), dtype=np.int64)
    for row in range(b):
        real = attention_mask[row].astype(bool)
        if not real.any():
            raise RuntimeInputError(f"prompt row {row} has no real tokens (attention_mask all 0)")
        row_kinds = kinds[row, real]
        pieces, cur, i = [], 0, 0
        while i < len(row_kinds):
            j = i
            while j < len(row_kinds) and row_kinds[j] == row_kinds[i]:
                j += 1
            if row_kinds[i] == 0:
                pieces.append(np.broadcast_to(np.arange(cur, cur + j - i), (3, j - i)))
                cur += j - i
            else:
                g = next(grids[int(row_kinds[i])], None)
                if g is None:
                    raise RuntimeInputError(f"row {row} has more vision blocks than grids were given")
                gt, gh, gw = int(g[0]), int(g[1]) // spatial_merge_size, int(g[2]) // spatial_merge_size
                if gt * gh * gw != j - i:
                    raise RuntimeInputError(f"row {row}: a vision block of {j - i} tokens but its grid {g.tolist()} "
                                            f"gives {gt * gh * gw}")
                interval = tokens_per_second if row_kinds[i] == 2 else 1
                tt, hh, ww = np.meshgrid((np.arange(gt) * interval).astype(np.int64), np.arange(gh), np.arange(gw),
                                         indexing="ij")
                pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
                cur += max(gh, gw)
            i = j
        prefix = np.concatenate(pieces, axis=1)  # (3, L_real)
        out[:, row, :length][:, real] = prefix
        out[:, row, length:] = grid + prefix.max() + 1
    return out
