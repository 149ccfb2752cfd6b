"""Presets: every component's config for `tiny`, `small` and `full`, per backbone.

`tiny` runs every task on one CPU core in seconds; `small` is compute-bound on a CPU (benchmarks); `full`
holds the paper's sizes (Qwen2.5-VL-7B + Wan2.2-TI2V-5B / FLUX.1-Kontext-dev / SANA-1.6B) and is only ever
instantiated on the `meta` device or loaded from a local checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.models.config import BACKBONES, MetaCanvasConfig

PRESETS = ("tiny", "small", "full")

# Token ids of the tiny byte-level tokenizer (mc_export.models.tokenizer): 256 bytes, then the specials.
TINY_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
TINY_VOCAB = 256 + len(TINY_SPECIAL_TOKENS) + 9  # padded to a multiple of 16


def _tiny_token_ids() -> dict:
    ids = {tok: 256 + i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    return dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


QWEN_TOKEN_IDS = dict(
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, image_token_id=151655, video_token_id=151656,
    vision_start_token_id=151652, vision_end_token_id=151653,
)


@dataclass(frozen=True)
class SamplingDefaults:
    height: int
    width: int
    num_frames: int  # 1 for image backbones
    num_inference_steps: int
    guidance_scale: float


@dataclass(frozen=True)
class Preset:
    """All configs needed to instantiate one MetaCanvas system with random weights."""

    name: str
    backbone: str
    metacanvas: MetaCanvasConfig
    planner: dict  # kwargs of transformers.Qwen2_5_VLConfig
    transformer: dict  # kwargs of the diffusers transformer class
    vae: dict  # kwargs of the diffusers VAE class
    scheduler: dict  # diffusers scheduler config, "_class_name" included
    defaults: SamplingDefaults


# The full preset's planner: Qwen2.5-VL-7B-Instruct (the paper's), or the 3B of its small studies.
PLANNERS = ("7b", "3b")
# The public checkpoints' text configs (config.json of Qwen/Qwen2.5-VL-{7B,3B}-Instruct); their vision towers are
# identical but for the merger's output width (= the LM's hidden size).
_QWEN_TEXT = {
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064),
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936),
}
_QWEN_TIED = {"7b": False, "3b": True}  # tie_word_embeddings: the 3B shares lm_head with the embeddings


def _planner(size: str, planner: str = "7b") -> dict:
    """Qwen2.5-VL configs. mrope_section sums to head_dim / 2."""
    if size == "tiny":
        text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=TINY_VOCAB, max_position_embeddings=4096,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
        vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        ids = _tiny_token_ids()
    elif size == "small":
        text = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=1408, vocab_size=TINY_VOCAB, max_position_embeddings=8192,
                    rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[8, 12, 12]))
        vision = dict(depth=2, hidden_size=128, num_heads=4, intermediate_size=256, out_hidden_size=512,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        ids = _tiny_token_ids()
    else:  # Qwen2.5-VL-7B-Instruct or -3B-Instruct
        text = dict(_QWEN_TEXT[planner], max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]))
        vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                      out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                      tokens_per_second=2)
        ids = dict(QWEN_TOKEN_IDS)
    text.update(bos_token_id=ids.pop("bos_token_id"), eos_token_id=ids.pop("eos_token_id"),
                pad_token_id=ids.pop("pad_token_id"))
    tied = _QWEN_TIED[planner] if size == "full" else True
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)


_UNIPC_FLOW = dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=1000, prediction_type="flow_prediction",
                   use_flow_sigmas=True, flow_shift=5.0, solver_order=2, solver_type="bh2",
                   lower_order_final=True, predict_x0=True)
_FLUX_EULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                   use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                   max_image_seq_len=4096)
_SANA_EULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)


# Wan2.2's VAE latent statistics (48 channels), as Wan2.2's own VAE (`wan/modules/vae2_2.py`) and the diffusers
# checkpoint's vae/config.json hold them.
_WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
_WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


def _wan(size: str) -> tuple:
    if size == "tiny":
        latent = 8
        dit = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=1, freq_dim=32, text_dim=32)
        vae = dict(base_dim=8, z_dim=latent, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
        mc = dict(mllm_dim=64, text_dim=32, dit_dim=32, canvas_keyframes=2, canvas_height=2, canvas_width=2,
                  lora_rank=4, prep_heads=2, injector_heads=2, vision_tokens_per_image=16)
        defaults = SamplingDefaults(128, 128, 9, 4, 5.0)
    elif size == "small":
        latent = 48
        dit = dict(num_attention_heads=12, attention_head_dim=64, ffn_dim=2048, num_layers=8, freq_dim=256,
                   text_dim=512)
        vae = dict(base_dim=32, z_dim=latent, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
        mc = dict(mllm_dim=512, text_dim=512, dit_dim=768, canvas_keyframes=3, canvas_height=6, canvas_width=8,
                  lora_rank=16, prep_heads=8, injector_heads=12, vision_tokens_per_image=64)
        defaults = SamplingDefaults(384, 512, 17, 20, 5.0)
    else:  # Wan2.2-TI2V-5B
        latent = 48
        dit = dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, freq_dim=256,
                   text_dim=4096)
        vae = dict(base_dim=160, decoder_base_dim=256, z_dim=latent, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
        mc = dict(mllm_dim=3584, text_dim=4096, dit_dim=3072, canvas_keyframes=3, canvas_height=11,
                  canvas_width=20, lora_rank=64, prep_heads=28, injector_heads=24)
        defaults = SamplingDefaults(704, 1280, 121, 50, 5.0)
    condition = latent + 1
    dit.update(patch_size=[1, 2, 2], in_channels=latent + condition, out_channels=latent, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    mean, std = (_WAN22_LATENTS_MEAN, _WAN22_LATENTS_STD) if size == "full" else ([0.0] * latent, [1.0] * latent)
    vae.update(temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
               out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
               latents_mean=list(mean), latents_std=list(std))
    mc.update(condition_channels=condition)
    return dit, vae, _UNIPC_FLOW, mc, defaults


def _flux(size: str) -> tuple:
    if size == "tiny":
        latent = 4
        dit = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
        vae = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8)
        mc = dict(mllm_dim=64, text_dim=32, dit_dim=32, canvas_keyframes=1, canvas_height=4, canvas_width=4,
                  lora_rank=4, prep_heads=2, injector_heads=2, pooled_dim=32, vision_tokens_per_image=16)
        defaults = SamplingDefaults(64, 64, 1, 4, 2.5)
    elif size == "small":
        latent = 16
        dit = dict(num_layers=2, num_single_layers=6, attention_head_dim=128, num_attention_heads=6,
                   joint_attention_dim=512, pooled_projection_dim=512, axes_dims_rope=[16, 56, 56])
        vae = dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=32)
        mc = dict(mllm_dim=512, text_dim=512, dit_dim=768, canvas_keyframes=1, canvas_height=16, canvas_width=16,
                  lora_rank=16, prep_heads=8, injector_heads=12, pooled_dim=512, vision_tokens_per_image=64)
        defaults = SamplingDefaults(512, 512, 1, 20, 2.5)
    else:  # FLUX.1-Kontext-dev
        latent = 16
        dit = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
        vae = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                   sample_size=1024)
        mc = dict(mllm_dim=3584, text_dim=4096, dit_dim=3072, canvas_keyframes=1, canvas_height=32,
                  canvas_width=32, lora_rank=64, prep_heads=28, injector_heads=24, pooled_dim=768)
        defaults = SamplingDefaults(1024, 1024, 1, 28, 2.5)
    dit.update(patch_size=1, in_channels=latent * 4, out_channels=None, guidance_embeds=True)
    vae.update(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=latent, scaling_factor=0.3611,
               shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    return dit, vae, _FLUX_EULER, mc, defaults


def _sana(size: str) -> tuple:
    if size == "tiny":
        latent = 4
        dit = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_cross_attention_heads=2,
                   cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32, sample_size=16)
        vae = dict(attention_head_dim=8, encoder_block_out_channels=[8, 16, 32],
                   decoder_block_out_channels=[8, 16, 32], encoder_layers_per_block=[1, 1, 1],
                   decoder_layers_per_block=[1, 1, 1],
                   encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                   decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                   encoder_qkv_multiscales=[[], [], [5]], decoder_qkv_multiscales=[[], [], [5]])
        mc = dict(mllm_dim=64, text_dim=32, dit_dim=32, canvas_keyframes=1, canvas_height=4, canvas_width=4,
                  lora_rank=4, prep_heads=2, injector_heads=2, vision_tokens_per_image=16)
        defaults = SamplingDefaults(64, 64, 1, 4, 4.5)
    elif size == "small":
        latent = 32
        dit = dict(num_attention_heads=24, attention_head_dim=32, num_layers=8, num_cross_attention_heads=8,
                   cross_attention_head_dim=96, cross_attention_dim=768, caption_channels=512, sample_size=32)
        vae = dict(attention_head_dim=32, encoder_block_out_channels=[32, 64, 128, 128],
                   decoder_block_out_channels=[32, 64, 128, 128], encoder_layers_per_block=[1, 1, 1, 1],
                   decoder_layers_per_block=[1, 1, 1, 1],
                   encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
                   decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
                   encoder_qkv_multiscales=[[], [], [5], [5]], decoder_qkv_multiscales=[[], [], [5], [5]])
        mc = dict(mllm_dim=512, text_dim=512, dit_dim=768, canvas_keyframes=1, canvas_height=16, canvas_width=16,
                  lora_rank=16, prep_heads=8, injector_heads=24, vision_tokens_per_image=64)
        defaults = SamplingDefaults(256, 256, 1, 20, 4.5)
    else:  # SANA-1.6B 512px + DC-AE f32c32
        latent = 32
        dit = dict(num_attention_heads=70, attention_head_dim=32, num_layers=20, num_cross_attention_heads=20,
                   cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304, sample_size=16)
        vae = dict(attention_head_dim=32, encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
                   decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
                   encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
                   encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
                   decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
                   encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
                   decoder_qkv_multiscales=[[], [], [], [5], [5], [5]])
        mc = dict(mllm_dim=3584, text_dim=2304, dit_dim=2240, canvas_keyframes=1, canvas_height=16,
                  canvas_width=16, lora_rank=64, prep_heads=28, injector_heads=70)
        defaults = SamplingDefaults(512, 512, 1, 20, 4.5)
    dit.update(in_channels=latent, out_channels=latent, mlp_ratio=2.5, patch_size=1, attention_bias=False,
               norm_elementwise_affine=False, norm_eps=1e-6)
    vae.update(in_channels=3, latent_channels=latent, upsample_block_type="interpolate",
               downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
               scaling_factor=0.41407)
    return dit, vae, _SANA_EULER, mc, defaults


_BUILDERS = {"wan": _wan, "flux": _flux, "sana": _sana}


def get_preset(backbone: str, name: str, planner: str | None = None) -> Preset:
    """The named preset's configs for one backbone; a clear error for unknown names.

    ``planner`` picks the `full` preset's Qwen2.5-VL (``7b``, the default, or ``3b``); the connectors follow its
    width (the canvas-prep block keeps 128-wide heads). The tiny and small presets have their own planner."""
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    if planner is not None and planner not in PLANNERS:
        raise ConfigError(f"unknown planner {planner!r}; expected one of {', '.join(PLANNERS)}")
    if planner is not None and name != "full":
        raise ConfigError(f"--planner picks the full preset's Qwen2.5-VL; the {name} preset has its own planner")
    planner = planner or "7b"
    dit, vae, scheduler, mc, defaults = _BUILDERS[backbone](name)
    planner_kwargs = _planner(name, planner)
    if name == "full":
        width = planner_kwargs["text_config"]["hidden_size"]
        mc.update(mllm_dim=width, prep_heads=width // 128)
    return Preset(name=name, backbone=backbone, metacanvas=MetaCanvasConfig(backbone=backbone, **mc),
                  planner=planner_kwargs, transformer=dit, vae=vae, scheduler=dict(scheduler), defaults=defaults)
