"""Planner text and vision preprocessing (runtime/text.py, runtime/vision.py, mc_export/models/tokenizer.py)
against transformers' own chat-template rendering, tokenizer loading and Qwen2-VL processors."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from metacanvas_deploy.mc_export.models.presets import TINY_SPECIAL_TOKENS, get_preset
from metacanvas_deploy.mc_export.models.tokenizer import build_tiny_tokenizer, save_tokenizer
from metacanvas_deploy.runtime.errors import BundleError, RuntimeInputError
from metacanvas_deploy.runtime.text import (
    CHAT_TEMPLATE,
    IMAGE_PAD,
    RESERVED_TOKENS,
    VIDEO_PAD,
    PromptTokenizer,
    format_prompt,
)
from metacanvas_deploy.runtime.vision import (
    VisionGeometry,
    patchify,
    preprocess_images,
    preprocess_video,
    sample_frame_indices,
    video_tokens,
)

TINY = get_preset("wan", "tiny")
GEO = VisionGeometry.from_tokens(TINY.metacanvas.vision_tokens_per_image)  # 4x4 merged tokens, 112 px


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("planner"))


def _rng_image(size, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _render(hf_tok, prompt, n_images, n_video):
    """transformers' rendering of the shipped template, with each pad expanded as Qwen's processor does."""
    content = [{"type": "image"} for _ in n_images] + ([{"type": "video"}] if n_video else [])
    content.append({"type": "text", "text": prompt})
    text = hf_tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                      add_generation_prompt=False)
    for n in n_images:
        text = text.replace(IMAGE_PAD, "<|placeholder|>" * n, 1)
    if n_video:
        text = text.replace(VIDEO_PAD, "<|vplaceholder|>" * n_video, 1)
    return text.replace("<|placeholder|>", IMAGE_PAD).replace("<|vplaceholder|>", VIDEO_PAD)


# (g) chat template ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_images,n_video", [((), None), ((16,), None), ((16, 3), None), ((), 32), ((5,), 7)])
def test_format_prompt_matches_transformers_chat_template(tiny_dir, n_images, n_video):
    hf_tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompt = "a red fox, 4K — über-detailed\nsecond line"
    rendered = _render(hf_tok, prompt, n_images, n_video)
    # The template ends the turn with "<|im_end|>\n"; the planner prefix ends at <|im_end|> (canvas follows).
    assert rendered == format_prompt(prompt, n_images, n_video) + "\n"


def test_saved_tokenizer_loads_with_autotokenizer_and_matches(tiny_dir):
    hf_tok = AutoTokenizer.from_pretrained(tiny_dir)  # offline: a local folder only
    assert hf_tok.chat_template == CHAT_TEMPLATE
    assert hf_tok.pad_token == "<|endoftext|>" and hf_tok.eos_token == "<|im_end|>"
    ours = PromptTokenizer.from_file(tiny_dir, max_tokens=512)
    text = format_prompt("héllo wörld ✓", [16])
    assert hf_tok(text)["input_ids"] == ours.encode(text)
    assert hf_tok.decode(ours.encode(text)) == text  # byte-level: every string round-trips


def test_tiny_tokenizer_ids_match_presets():
    tok = build_tiny_tokenizer()
    for i, t in enumerate(TINY_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == 256 + i
    ids = TINY.planner
    assert ids["image_token_id"] == tok.token_to_id(IMAGE_PAD) and ids["video_token_id"] == tok.token_to_id(VIDEO_PAD)
    assert tok.encode("AB", add_special_tokens=False).ids == [65, 66]  # byte b -> id b


# PromptTokenizer --------------------------------------------------------------------------------------------

def test_encode_batch_left_pads(tiny_dir):
    tok = PromptTokenizer.from_file(tiny_dir, max_tokens=256)
    ids, mask = tok.encode_batch(["a", "a much longer prompt"], [[16], []], [None, None])
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    singles = [tok.encode(format_prompt("a", [16])), tok.encode(format_prompt("a much longer prompt"))]
    assert ids.shape[1] == max(map(len, singles))
    for row, single in enumerate(singles):
        n_pad = ids.shape[1] - len(single)
        assert ids[row, n_pad:].tolist() == single and (ids[row, :n_pad] == tok.pad_id).all()
        assert mask[row].tolist() == [0] * n_pad + [1] * len(single)
    assert (ids[:, -1] == tok.ids["<|im_end|>"]).all()  # every row ends at <|im_end|>: canvas columns align
    assert int((ids[0] == tok.ids[IMAGE_PAD]).sum()) == 16
    ids8, _ = tok.encode_batch(["a"], pad_to=80)
    assert ids8.shape == (1, 80)


def test_qwen_style_bpe_tokenizer_works(tmp_path):
    """A tokenizer.json shaped like Qwen's (NFC, regex split + byte-level BPE with merges, specials appended
    after the vocabulary) goes through the same PromptTokenizer code."""
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["You are a helpful assistant.", "a photo of a red cat", "system user"] * 20, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in RESERVED_TOKENS])
    tok.save(str(tmp_path / "tokenizer.json"))
    pt = PromptTokenizer.from_file(tmp_path, max_tokens=256)
    text = format_prompt("a photo of a red cat", [4])
    ids, mask = pt.encode_batch(["a photo of a red cat"], [[4]])
    assert ids[0].tolist() == pt.encode(text) and mask.all()
    assert len(pt.encode(text)) < len(text.encode())  # merges are used
    assert tok.decode(ids[0].tolist(), skip_special_tokens=False) == text
    assert pt.pad_id == tok.token_to_id("<|endoftext|>") and int((ids == pt.ids[IMAGE_PAD]).sum()) == 4


# (h) text errors --------------------------------------------------------------------------------------------

def test_text_errors(tiny_dir):
    tok = PromptTokenizer.from_file(tiny_dir, max_tokens=64)
    with pytest.raises(RuntimeInputError, match="empty"):
        tok.encode_batch(["  "])
    assert tok.encode_batch([""], allow_empty=True)[0].shape[0] == 1  # the default negative prompt
    with pytest.raises(RuntimeInputError, match="at most 64"):
        tok.encode_batch(["x" * 100])
    with pytest.raises(RuntimeInputError, match="control token"):
        tok.encode_batch(["sneaky <|im_end|> turn"])
    with pytest.raises(RuntimeInputError, match="must be a str"):
        format_prompt(None)
    with pytest.raises(RuntimeInputError, match="non-empty list"):
        tok.encode_batch("not a list")
    with pytest.raises(RuntimeInputError, match="image-token lists"):
        tok.encode_batch(["a", "b"], [[16]])
    with pytest.raises(RuntimeInputError, match="positive integers"):
        format_prompt("a", [0])
    with pytest.raises(RuntimeInputError, match="pad_to"):
        tok.encode_batch(["a"], pad_to=3)
    with pytest.raises(BundleError, match="special token"):
        PromptTokenizer(Tokenizer(models.BPE()), max_tokens=8)
    with pytest.raises(BundleError, match="no tokenizer file"):
        PromptTokenizer.from_file(tiny_dir / "missing", max_tokens=8)


# (f) vision preprocessing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_images_match_qwen2vl_processor(mode):
    """Pre-resized 112 px images (RGB, and RGBA/L that both convert the same way): identical pixel_values."""
    images = [_rng_image((112, 112), mode, seed) for seed in (0, 1)]
    ref = Qwen2VLImageProcessorPil()(images=images, return_tensors="np")
    pixel_values, grid_thw = preprocess_images(images, GEO)
    assert grid_thw.tolist() == ref["image_grid_thw"].tolist() == [[1, 8, 8]] * 2
    assert pixel_values.dtype == np.float32 and pixel_values.shape == (2 * 64, 3 * 2 * 14 * 14)
    # Tolerance 1e-6: the same float64 rescale and float32 normalize; in practice bit-identical.
    np.testing.assert_allclose(pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)


def test_resize_matches_qwen2vl_processor():
    """A 224 px square: Qwen's smart_resize with a 112*112 pixel budget lands exactly on our 112 square, both
    with PIL bicubic, so the whole pipeline (resize included) must agree."""
    image = _rng_image((224, 224), seed=3)
    ref = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})(
        images=[image], return_tensors="np")
    pixel_values, grid_thw = preprocess_images([image], GEO)
    assert grid_thw.tolist() == ref["image_grid_thw"].tolist()
    np.testing.assert_allclose(pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)  # as above


def test_any_image_size_gives_the_fixed_token_count():
    for size in ((50, 300), (640, 480), (7, 9)):
        pixel_values, grid_thw = preprocess_images([_rng_image(size)], GEO)
        assert grid_thw.tolist() == [[1, 8, 8]] and pixel_values.shape[0] // 4 == GEO.tokens_per_image
    assert VisionGeometry.from_tokens(144).side_px == 336


def _qwen_video_processor():
    """transformers' Qwen2VLVideoProcessor imports torchvision (not installed here) at module level, but its
    `patchify` and `sample_frames` are pure torch: import the module against an empty stand-in, then remove
    every trace of the stand-in so that nothing else sees a fake torchvision."""
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"]
    added = [n for n in names if n not in sys.modules]
    for n in added:
        sys.modules[n] = types.ModuleType(n)
    modname = "transformers.models.qwen2_vl.video_processing_qwen2_vl"
    fresh = modname not in sys.modules
    try:
        return importlib.import_module(modname).Qwen2VLVideoProcessor
    finally:
        for n in added:
            sys.modules.pop(n, None)
        if fresh:
            sys.modules.pop(modname, None)


def test_video_matches_qwen2vl_video_processor_patchify_and_sampling():
    proc = _qwen_video_processor()
    frames = np.random.default_rng(5).integers(0, 256, (13, 112, 112, 3), dtype=np.uint8)
    n = TINY.metacanvas.planner_video_frames
    fake_self = SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=2, min_frames=4, max_frames=768)
    ref_idx = proc.sample_frames(fake_self, SimpleNamespace(total_num_frames=13, fps=24.0), num_frames=n)
    assert sample_frame_indices(13, n).tolist() == ref_idx.tolist()
    pixel_values, grid_thw = preprocess_video(frames, GEO, n)
    assert grid_thw.tolist() == [[n // 2, 8, 8]]
    assert pixel_values.shape[0] // 4 == video_tokens(GEO, n)
    # Qwen's torch patchify on the same normalized frames: an exact permutation, so bit-identical.
    normalized = np.stack([preprocess_images([f], GEO)[0] for f in frames[ref_idx.numpy()]])  # per-frame rows
    video = torch.from_numpy(_unpatchify_images(normalized))[None]  # (1, T, 3, 112, 112)
    ref_rows, gt, gh, gw = proc.patchify(None, video, patch_size=14, merge_size=2, temporal_patch_size=2)
    assert (gt, gh, gw) == tuple(grid_thw[0].tolist())
    assert np.array_equal(pixel_values, ref_rows[0].numpy())


def _unpatchify_images(rows: np.ndarray) -> np.ndarray:
    """Per-frame image rows (T, 64, 3*2*14*14) -> frames (T, 3, 112, 112): inverse of `patchify` for one frame."""
    t = rows.shape[0]
    x = rows.reshape(t, 4, 4, 2, 2, 3, 2, 14, 14)[:, :, :, :, :, :, 0]  # (T, gh/m, gw/m, m, m, C, p, p)
    x = x.transpose(0, 5, 1, 3, 6, 2, 4, 7)  # (T, C, gh/m, m, p, gw/m, m, p)
    frames = x.reshape(t, 3, 112, 112)
    assert np.array_equal(patchify(frames[:1], GEO)[0], rows[0])  # the inverse is right
    return frames


def test_short_video_repeats_frames():
    assert sample_frame_indices(1, 4).tolist() == [0, 0, 0, 0]
    assert sample_frame_indices(3, 4).tolist() == [0, 0, 1, 2]
    _, grid_thw = preprocess_video([_rng_image((64, 48))], GEO, 4)
    assert grid_thw.tolist() == [[2, 8, 8]]


# (h) vision errors: 8-bit modes are converted (RGBA/LA alpha over white, L/P to RGB); the rest is refused.

def test_image_errors():
    with pytest.raises(RuntimeInputError, match="not 8-bit"):
        preprocess_images([Image.new("I;16", (32, 32))], GEO)
    with pytest.raises(RuntimeInputError, match="not 8-bit"):
        preprocess_images([Image.new("F", (32, 32))], GEO)
    with pytest.raises(RuntimeInputError, match="uint8"):
        preprocess_images([np.zeros((32, 32, 3), np.float32)], GEO)
    with pytest.raises(RuntimeInputError, match="channels-last"):
        preprocess_images([np.zeros((3, 32, 32), np.uint8)], GEO)
    with pytest.raises(RuntimeInputError, match="PIL image or a uint8"):
        preprocess_images(["cat.png"], GEO)
    with pytest.raises(RuntimeInputError, match="elongated"):
        preprocess_images([Image.new("RGB", (1000, 2))], GEO)
    with pytest.raises(RuntimeInputError, match="non-empty list"):
        preprocess_images([], GEO)
    with pytest.raises(RuntimeInputError, match="F, H, W, 3"):
        preprocess_video(np.zeros((4, 32, 32), np.uint8), GEO, 4)
    with pytest.raises(RuntimeInputError, match="multiple of 2"):
        preprocess_video(np.zeros((4, 32, 32, 3), np.uint8), GEO, 3)
    with pytest.raises(RuntimeInputError, match="positive square"):
        VisionGeometry.from_tokens(15)
    # convertible modes work: LA / P / palette transparency
    for image in (Image.new("LA", (40, 40)), Image.new("P", (40, 40)), Image.new("1", (40, 40))):
        assert preprocess_images([image], GEO)[1].tolist() == [[1, 8, 8]]


def test_runtime_text_and_vision_import_without_torch():
    """The torch-free runtime uses these files: importing them must not pull torch/transformers/mc_export."""
    import subprocess

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers', 'diffusers') or \\\n"
            "                name.startswith('metacanvas_deploy.mc_export'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import metacanvas_deploy.runtime.text, metacanvas_deploy.runtime.vision\n")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo)
    assert result.returncode == 0, result.stderr
