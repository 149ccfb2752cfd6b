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


def _planner(size: str) -> dict:
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
    else:  # Qwen2.5-VL-7B-Instruct
        text = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000,
                    rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]))
        vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
        ids = dict(QWEN_TOKEN_IDS)
    text.update(bos_token_id=ids.pop("bos_token_id"), eos_token_id=ids.pop("eos_token_id"),
                pad_token_id=ids.pop("pad_token_id"))
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=size != "full", **ids)


_UNIPC_FLOW = dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=1000, prediction_type="flow_prediction",
                   use_flow_sigmas=True, flow_shift=5.0, solver_order=2, solver_type="bh2",
                   lower_order_final=True, predict_x0=True)
_FLUX_EULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                   use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                   max_image_seq_len=4096)
_SANA_EULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)


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
    vae.update(temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
               out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
               latents_mean=[0.0] * latent, latents_std=[1.0] * latent)
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
        vae = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)
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


def get_preset(backbone: str, name: str) -> Preset:
    """The named preset's configs for one backbone; a clear error for unknown names."""
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    dit, vae, scheduler, mc, defaults = _BUILDERS[backbone](name)
    return Preset(name=name, backbone=backbone, metacanvas=MetaCanvasConfig(backbone=backbone, **mc),
                  planner=_planner(name), transformer=dit, vae=vae, scheduler=dict(scheduler), defaults=defaults)
