"""The planner (mc_export/models/planner.py, lora.py) against transformers' own Qwen2.5-VL.

Tolerances: states are O(1) float32. 1e-5 absolute wherever two computations do the same math through
different kernels or shapes (eager attention with our additive mask vs transformers' sdpa and its own mask,
merged vs separate LoRA matmuls, padded vs unpadded matmul blocking); those differ by float32 reassociation,
measured at ~1e-6. Exact equality only where the computation is the same code on the same shapes.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from metacanvas_deploy.mc_export.errors import CheckpointError, ConfigError, InputError
from metacanvas_deploy.mc_export.models.lora import LoRALinear, lora_modules, unwrap_lora
from metacanvas_deploy.mc_export.models.planner import Planner, planner_attention_mask, random_planner
from metacanvas_deploy.mc_export.models.presets import get_preset
from metacanvas_deploy.mc_export.models.tokenizer import save_tokenizer
from metacanvas_deploy.runtime.errors import RuntimeInputError
from metacanvas_deploy.runtime.text import PromptTokenizer, planner_position_ids
from metacanvas_deploy.runtime.vision import VisionGeometry, preprocess_images, preprocess_video, video_tokens

ATOL = 1e-5  # see the module docstring
WAN, SANA = get_preset("wan", "tiny"), get_preset("sana", "tiny")  # video canvas 2x2x2, image canvas 4x4
GEO = VisionGeometry.from_tokens(WAN.metacanvas.vision_tokens_per_image)
N_VIDEO_FRAMES = WAN.metacanvas.planner_video_frames


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return PromptTokenizer.from_file(save_tokenizer(tmp_path_factory.mktemp("planner")), max_tokens=256)


def _planner(preset, lora_seed: int | None = 1) -> Planner:
    planner = random_planner(preset.planner, preset.metacanvas, seed=0)
    if lora_seed is not None:
        planner.randomize_lora(torch.Generator().manual_seed(lora_seed))
    return planner


@pytest.fixture(scope="module")
def wan_planner():
    return _planner(WAN)


@pytest.fixture(scope="module")
def sana_planner():
    return _planner(SANA)


def _reference_qwen(planner: Planner):
    """transformers' Qwen2.5-VL with the planner's base weights (LoRA removed), its default sdpa attention."""
    ref = unwrap_lora(copy.deepcopy(planner.qwen), merge=False)
    ref.set_attn_implementation("sdpa")
    return ref


def _images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8) for i in range(n)]


def _batch(tok, prompts, n_images=None, n_video=None, images=None, video=None):
    """Tokenized prompts plus their preprocessed vision inputs, as torch tensors (the planner's inputs)."""
    ids, mask = tok.encode_batch(prompts, n_images, n_video)
    kw = {}
    if images:
        pv, thw = preprocess_images(images, GEO)
        kw.update(pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(thw))
    if video is not None:
        pv, thw = preprocess_video(video, GEO, N_VIDEO_FRAMES)
        kw.update(pixel_values_videos=torch.from_numpy(pv), video_grid_thw=torch.from_numpy(thw))
    return torch.from_numpy(ids), torch.from_numpy(mask), kw


def _mm_types(planner, ids):
    cfg = planner.qwen.config
    return (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()


# (a) prefix states = transformers' forward --------------------------------------------------------------------

@pytest.mark.parametrize("case", ["text", "image", "two_images", "video"])
def test_prefix_states_match_qwen_forward(tok, wan_planner, case):
    t = GEO.tokens_per_image
    video = np.random.default_rng(3).integers(0, 256, (7, 64, 80, 3), dtype=np.uint8)
    args = {"text": (None, None, None, None), "image": ([[t]], None, _images(1), None),
            "two_images": ([[t, t]], None, _images(2), None),
            "video": ([[]], [video_tokens(GEO, N_VIDEO_FRAMES)], None, video)}[case]
    ids, mask, kw = _batch(tok, ["a red fox jumps"], *args[:2], images=args[2], video=args[3])
    ref = _reference_qwen(wan_planner)
    with torch.no_grad():
        out = wan_planner(ids, mask, **kw)
        expected = ref.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=_mm_types(wan_planner, ids),
                             output_hidden_states=True, **kw)
    assert torch.equal(expected.hidden_states[-1], expected.last_hidden_state)  # the last layer, post norm
    torch.testing.assert_close(out.context_states, expected.last_hidden_state, rtol=0, atol=ATOL)
    assert out.canvas_states.shape == (1, WAN.metacanvas.canvas_tokens, WAN.metacanvas.mllm_dim)


# (b) canvas positions = Qwen's rope index for an equivalent grid ------------------------------------------------

@pytest.mark.parametrize("preset", [WAN, SANA], ids=["video_canvas", "image_canvas"])
def test_canvas_positions_match_qwen_rope_index(tok, preset):
    """Append N canvas placeholders after each row's prefix as a Qwen image grid (K = 1) or video grid (K > 1,
    one position per temporal step: second_per_grid_ts = 1 / tokens_per_second). Qwen's grid_thw counts patches
    before the 2x2 merge, so the grid is (K, 2h, 2w)."""
    planner = random_planner(preset.planner, preset.metacanvas)
    mc, qcfg = preset.metacanvas, planner.qwen.config
    t = GEO.tokens_per_image
    ids, mask, kw = _batch(tok, ["a cat", "a much longer prompt here"], [[t], []], images=_images(1))
    ours = planner.position_ids(ids, mask, kw["image_grid_thw"])
    b, n = ids.shape[0], mc.canvas_tokens
    merge = qcfg.vision_config.spatial_merge_size
    canvas_grid = torch.tensor([[mc.canvas_keyframes, mc.canvas_height * merge, mc.canvas_width * merge]])
    slot = qcfg.image_token_id if mc.canvas_keyframes == 1 else qcfg.video_token_id
    ids_ext = torch.cat([ids, torch.full((b, n), slot)], dim=1)
    mask_ext = torch.cat([mask, torch.ones(b, n, dtype=mask.dtype)], dim=1)
    prefix_grids = [[kw["image_grid_thw"][0]], []]  # row 0 has one image, row 1 none
    if mc.canvas_keyframes == 1:  # grids are consumed row by row: row 0's image, row 0's canvas, row 1's canvas
        grids = dict(image_grid_thw=torch.cat([torch.stack(g + [canvas_grid[0]]) for g in prefix_grids]))
    else:
        grids = dict(image_grid_thw=kw["image_grid_thw"], video_grid_thw=canvas_grid.repeat(b, 1),
                     second_per_grid_ts=torch.full((b,), 1.0 / qcfg.vision_config.tokens_per_second))
    expected, _ = planner.qwen.model.get_rope_index(ids_ext, mm_token_type_ids=_mm_types(planner, ids_ext),
                                                    attention_mask=mask_ext, **grids)
    assert ours.shape == (3, b, ids.shape[1] + n)
    assert torch.equal(ours[:, :, ids.shape[1]:], expected[:, :, ids.shape[1]:])
    prefix = slice(0, ids.shape[1])
    assert torch.equal(ours[:, :, prefix][:, mask.bool()], expected[:, :, prefix][:, mask.bool()])


# (c) LoRA acts on canvas positions only ------------------------------------------------------------------------

def test_lora_changes_canvas_states_only(tok):
    planner = _planner(WAN, lora_seed=1)
    ids, mask, kw = _batch(tok, ["short", "a longer prompt"], [[GEO.tokens_per_image], []], images=_images(1))
    with torch.no_grad():
        before = planner(ids, mask, **kw)
        planner.randomize_lora(torch.Generator().manual_seed(2))
        after = planner(ids, mask, **kw)
    # Exact: same code on the same shapes, and no prefix row reads a canvas row (masked keys weigh exactly 0).
    assert torch.equal(before.context_states, after.context_states)
    assert (before.canvas_states - after.canvas_states).abs().max() > 1e-2


def test_fresh_lora_is_identity_and_rank_zero_has_none(tok):
    with_lora = _planner(WAN, lora_seed=None)  # PEFT init: B = 0
    no_lora = random_planner(WAN.planner, dataclasses.replace(WAN.metacanvas, lora_rank=0))
    assert len(list(lora_modules(with_lora))) == 7 * WAN.planner["text_config"]["num_hidden_layers"]
    assert not list(lora_modules(no_lora))
    ids, mask, _ = _batch(tok, ["a prompt"])
    with torch.no_grad():
        a, b = with_lora(ids, mask), no_lora(ids, mask)
    assert torch.equal(a.canvas_states, b.canvas_states) and torch.equal(a.context_states, b.context_states)


# (d) one pass == two passes through transformers' KV cache -----------------------------------------------------

@pytest.mark.parametrize("preset", [WAN, SANA], ids=["video_canvas", "image_canvas"])
def test_one_pass_equals_two_pass_kv_cache(tok, preset, wan_planner, sana_planner):
    """Reference: the prefix through transformers with the base weights (use_cache=True), then the canvas
    tokens through transformers with the LoRA merged into the weights, reading that cache."""
    planner = wan_planner if preset is WAN else sana_planner
    ids, mask, kw = _batch(tok, ["a cat", "a much longer prompt here"], [[GEO.tokens_per_image], []],
                           images=_images(1))
    base = unwrap_lora(copy.deepcopy(planner.qwen), merge=False).model.language_model
    adapted = unwrap_lora(copy.deepcopy(planner.qwen), merge=True).model.language_model
    b, length, n = ids.shape[0], ids.shape[1], planner.n_canvas
    with torch.no_grad():
        out = planner(ids, mask, **kw)
        embeds = planner.embed_prefix(ids, **kw)
        pos = planner.position_ids(ids, mask, kw["image_grid_thw"])
        first = base(inputs_embeds=embeds, attention_mask=mask, position_ids=pos[:, :, :length], use_cache=True)
        canvas = planner.canvas_tokens[None].expand(b, n, -1)
        second = adapted(inputs_embeds=canvas, attention_mask=torch.cat([mask, torch.ones(b, n, dtype=mask.dtype)], 1),
                         position_ids=pos[:, :, length:], past_key_values=first.past_key_values, use_cache=True)
    real = mask.bool()
    torch.testing.assert_close(out.context_states[real], first.last_hidden_state[real], rtol=0, atol=ATOL)
    torch.testing.assert_close(out.canvas_states, second.last_hidden_state, rtol=0, atol=ATOL)


# (e) a left-padded batch gives each prompt's own states ----------------------------------------------------------

def test_left_padded_batch_equals_single_prompts(tok, wan_planner):
    t = GEO.tokens_per_image
    prompts, n_images, images = ["a cat", "a very much longer prompt about a dog", "x"], [[t], [], [t, t]], _images(3)
    ids, mask, kw = _batch(tok, prompts, n_images, images=images)
    with torch.no_grad():
        out = wan_planner(ids, mask, **kw)
    assert torch.isfinite(out.context_states).all() and torch.isfinite(out.canvas_states).all()
    assert (out.context_states[~mask.bool()] == 0).all()  # padding positions are zeroed
    used = 0
    for i, prompt in enumerate(prompts):
        row_images = images[used:used + len(n_images[i])]
        used += len(n_images[i])
        ids1, mask1, kw1 = _batch(tok, [prompt], [n_images[i]], images=row_images)
        with torch.no_grad():
            single = wan_planner(ids1, mask1, **kw1)
        real = mask[i].bool()
        torch.testing.assert_close(out.context_states[i, real], single.context_states[0], rtol=0, atol=ATOL)
        torch.testing.assert_close(out.canvas_states[i], single.canvas_states[0], rtol=0, atol=ATOL)


def test_attention_mask_shape_and_padding_rows():
    mask = planner_attention_mask(torch.tensor([[0, 0, 1], [1, 1, 1]]), n_canvas=2, dtype=torch.float32)
    assert mask.shape == (2, 1, 5, 5)
    open_ = mask[:, 0] == 0
    assert open_[0].tolist() == [[True, False, False, False, False],  # padding query: itself only (no NaN)
                                 [False, True, False, False, False],
                                 [False, False, True, False, False],
                                 [False, False, True, True, False],  # canvas: real prefix + earlier canvas
                                 [False, False, True, True, True]]
    assert open_[1].tolist() == torch.tril(torch.ones(5, 5, dtype=torch.bool)).tolist()


# (h) bad inputs ------------------------------------------------------------------------------------------------------

def test_planner_input_errors(tok, wan_planner):
    t = GEO.tokens_per_image
    ids, mask, kw = _batch(tok, ["a cat"], [[t]], images=_images(1))
    with pytest.raises(InputError, match="no image pixels"):
        wan_planner(ids, mask)
    two = _batch(tok, ["a cat"], [[t, t]], images=_images(2))[2]
    with pytest.raises(InputError, match="give 32 vision tokens but the prompts hold 16"):
        wan_planner(ids, mask, **two)
    with pytest.raises(InputError, match="image_grid_thw"):
        wan_planner(ids, mask, pixel_values=kw["pixel_values"])
    with pytest.raises(InputError, match=r"must both be \(B, L\)"):
        wan_planner(ids, mask[:, 1:])
    with pytest.raises(InputError, match="no real tokens"):
        wan_planner(ids, torch.zeros_like(mask))


def test_planner_config_errors():
    with pytest.raises(ConfigError, match="mllm_dim"):
        random_planner(WAN.planner, dataclasses.replace(WAN.metacanvas, mllm_dim=128, prep_heads=2))
    with pytest.raises(ConfigError, match="match no Linear"):
        random_planner(WAN.planner, dataclasses.replace(WAN.metacanvas, lora_targets=("q_proj", "qkv")))
    with pytest.raises(ConfigError, match="rank > 0"):
        LoRALinear(torch.nn.Linear(4, 4), rank=0, alpha=1.0, n_canvas=2)


def test_stock_save_and_metacanvas_weights_round_trip(tok, wan_planner, tmp_path):
    """save_stock writes a plain transformers Qwen2.5-VL folder; with metacanvas_state_dict on top, a reloaded
    planner computes exactly the same states (same weights, same code)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    wan_planner.save_stock(tmp_path)
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True)
    assert not any("lora" in k or "base_layer" in k for k in qwen.state_dict())
    reloaded = Planner(qwen, WAN.metacanvas).eval()
    extra = wan_planner.metacanvas_state_dict()
    assert "canvas_tokens" in extra and sum(".lora_B." in k for k in extra) == len(list(lora_modules(reloaded)))
    reloaded.load_metacanvas_state_dict(extra)
    ids, mask, kw = _batch(tok, ["a cat", "a dog on a mat"], [[GEO.tokens_per_image], []], images=_images(1))
    with torch.no_grad():
        a, b = wan_planner(ids, mask, **kw), reloaded(ids, mask, **kw)
    assert torch.equal(a.context_states, b.context_states) and torch.equal(a.canvas_states, b.canvas_states)
    assert reloaded.vision_geometry() == GEO
    with pytest.raises(CheckpointError, match="do not fit"):
        reloaded.load_metacanvas_state_dict({k: v for k, v in extra.items() if k != "canvas_tokens"})
    with pytest.raises(CheckpointError, match="wrong shape"):
        reloaded.load_metacanvas_state_dict({**extra, "canvas_tokens": torch.zeros(3, 64)})


@pytest.mark.parametrize("preset", [WAN, SANA], ids=["video_canvas", "image_canvas"])
def test_runtime_position_ids_match_planner(tok, preset):
    """runtime.text.planner_position_ids (numpy, for the torch-free runtime) == Planner.position_ids (Qwen's
    own rope index + the canvas grid), on a padded batch with images and a video."""
    planner = random_planner(preset.planner, preset.metacanvas)
    t, v = GEO.tokens_per_image, video_tokens(GEO, N_VIDEO_FRAMES)
    video = np.random.default_rng(4).integers(0, 256, (6, 50, 70, 3), dtype=np.uint8)
    ids, mask, kw = _batch(tok, ["a cat", "a much longer prompt here", "z"], [[t, t], [], [t]], [None, None, v],
                           images=_images(3), video=video)
    expected = planner.position_ids(ids, mask, kw["image_grid_thw"], kw["video_grid_thw"])
    qcfg, mc = planner.qwen.config, preset.metacanvas
    ours = planner_position_ids(
        ids.numpy(), mask.numpy(), image_token_id=qcfg.image_token_id, video_token_id=qcfg.video_token_id,
        canvas=(mc.canvas_keyframes, mc.canvas_height, mc.canvas_width),
        spatial_merge_size=qcfg.vision_config.spatial_merge_size,
        tokens_per_second=qcfg.vision_config.tokens_per_second,
        image_grid_thw=kw["image_grid_thw"].numpy(), video_grid_thw=kw["video_grid_thw"].numpy())
    assert ours.dtype == np.int64 and np.array_equal(ours, expected.numpy())
    with pytest.raises(RuntimeInputError, match="more vision blocks"):
        planner_position_ids(ids.numpy(), mask.numpy(), image_token_id=qcfg.image_token_id,
                             video_token_id=qcfg.video_token_id, canvas=(1, 2, 2), spatial_merge_size=2,
                             tokens_per_second=2)
