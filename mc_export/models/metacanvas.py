"""The whole MetaCanvas system in PyTorch: planner + connectors + one backbone. The reference every
compiled stage is measured against.

What is model-specific comes from the backbone's record (`mc_export.backbones`): the adapter class, the diffusers
classes, the presets; an unknown backbone name is a ConfigError. ``from_pretrained(lazy=True)`` builds the same
model on `meta` and leaves the weights on disk (`mc_export.models.lazy` says where each one lives).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metacanvas_deploy.mc_export import backbones
from metacanvas_deploy.mc_export.errors import CheckpointError, InputError
from metacanvas_deploy.mc_export.models import checkpoint as ckpt
from metacanvas_deploy.mc_export.models.backbones.base import Conditioning, SampleOutput
from metacanvas_deploy.mc_export.models.config import MetaCanvasConfig
from metacanvas_deploy.mc_export.models.connectors import (
    CanvasInjector,
    CanvasPrep,
    ContextMLP,
    PooledProjection,
    randomize_zero_layers,
)
from metacanvas_deploy.mc_export.models.lazy import LazyWeights, check_weight_files
from metacanvas_deploy.mc_export.models.presets import Preset, SamplingDefaults

# Distinct seed offsets per component: changing one component's size never reshuffles another's weights.
_SEED_PLANNER, _SEED_TRANSFORMER, _SEED_VAE, _SEED_METACANVAS = 0, 1, 2, 3


def _scheduler_from_config(config: dict):
    import diffusers

    name = config.get("_class_name")
    if name not in backbones.SCHEDULER_CLASSES:
        raise CheckpointError(f"unsupported scheduler {name!r}; expected {' or '.join(backbones.SCHEDULER_CLASSES)}")
    return getattr(diffusers, name).from_config(config)


def read_checkpoint_configs(path: Path) -> tuple[MetaCanvasConfig, SamplingDefaults, tuple[type, type]]:
    """A checkpoint folder's MetaCanvas config, sampling defaults and diffusers classes, all checked."""
    ckpt.check_layout(path)
    cfg = MetaCanvasConfig.from_dict(ckpt.read_json(path / "metacanvas" / "config.json"))
    sampling = path / "metacanvas" / "sampling.json"
    backbone = backbones.get(cfg.backbone)
    defaults = SamplingDefaults(**ckpt.read_json(sampling)) if sampling.is_file() else backbone.preset("full").defaults
    t_cls, v_cls = backbone.diffusers_classes()
    ckpt.check_class(path, "transformer", t_cls.__name__)
    ckpt.check_class(path, "vae", v_cls.__name__)
    check_weight_files(path)  # shards and indexes agree, from the headers alone, before a library reads them
    return cfg, defaults, (t_cls, v_cls)


class MetaCanvas(nn.Module):
    """Planner (Qwen2.5-VL + canvas tokens + LoRA), context MLP, canvas preparation and injector, and a
    stock diffusers backbone (transformer, VAE, scheduler) behind its adapter."""

    def __init__(self, cfg: MetaCanvasConfig, planner: nn.Module, transformer: nn.Module, vae: nn.Module,
                 scheduler, tokenizer, defaults: SamplingDefaults):
        super().__init__()
        self.cfg, self.defaults, self.tokenizer = cfg, defaults, tokenizer
        self.planner = planner
        self.context_mlp = ContextMLP(cfg.mllm_dim, cfg.text_dim)
        self.pooled_proj = PooledProjection(cfg.mllm_dim, cfg.pooled_dim) if cfg.pooled_dim else None
        self.canvas_prep = CanvasPrep(cfg)
        self.injector = CanvasInjector(cfg)
        self.transformer, self.vae = transformer, vae
        adapter = backbones.get(cfg.backbone).adapter
        self.adapter = adapter(transformer, vae, scheduler, cfg, self.canvas_prep, self.injector)
        self._check_dims()

    # construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, backbone: str, preset: str | Preset = "tiny", seed: int = 0, random_canvas: bool = False,
                    device: str = "cpu", overrides: dict | None = None) -> MetaCanvas:
        """Seeded random weights at a preset's sizes. ``device="meta"`` builds shapes only (the `full` sizes).

        ``overrides`` replaces MetaCanvasConfig fields (e.g. ``condition_channels=0`` for a stock layout).
        """
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from metacanvas_deploy.mc_export.models.planner import Planner
        from metacanvas_deploy.mc_export.models.tokenizer import build_tiny_tokenizer
        from metacanvas_deploy.runtime.text import PromptTokenizer

        record = backbones.get(backbone)
        p = record.preset(preset) if isinstance(preset, str) else preset
        cfg = dataclasses.replace(p.metacanvas, **(overrides or {}))
        transformer_kwargs = record.adapter.transformer_config(p.transformer, p.vae, cfg)
        t_cls, v_cls = record.diffusers_classes()
        scheduler = _scheduler_from_config(p.scheduler)  # host-side tables: never on `meta`
        tokenizer = PromptTokenizer(build_tiny_tokenizer(), cfg.max_prompt_tokens) if p.name != "full" else None
        with torch.device(device):
            torch.manual_seed(seed * 16 + _SEED_PLANNER)
            qwen_cfg = Qwen2_5_VLConfig(**p.planner)
            qwen_cfg._attn_implementation = "sdpa"
            qwen = Qwen2_5_VLForConditionalGeneration(qwen_cfg)
            torch.manual_seed(seed * 16 + _SEED_TRANSFORMER)
            transformer = t_cls(**transformer_kwargs)
            torch.manual_seed(seed * 16 + _SEED_VAE)
            vae = v_cls(**p.vae)
            torch.manual_seed(seed * 16 + _SEED_METACANVAS)
            planner = Planner(qwen, cfg)
            model = cls(cfg, planner, transformer, vae, scheduler, tokenizer, p.defaults)
        if random_canvas and device != "meta":
            g = torch.Generator().manual_seed(seed * 16 + _SEED_METACANVAS)
            randomize_zero_layers(model, g)
            model.planner.randomize_lora(g)
        return model.eval()

    def _check_dims(self) -> None:
        """Planner, connectors and DiT must agree on D_mllm, D_txt, D_dit."""
        cfg = self.cfg
        text_hidden = self.planner.qwen.config.text_config.hidden_size
        if text_hidden != cfg.mllm_dim:
            raise CheckpointError(f"planner hidden size {text_hidden} != metacanvas mllm_dim {cfg.mllm_dim}")
        dit_text = _dit_text_dim(cfg.backbone, self.transformer.config)
        if dit_text != cfg.text_dim:
            raise CheckpointError(f"the DiT takes text of width {dit_text}, but metacanvas text_dim is {cfg.text_dim}")
        dit_dim = _dit_width(cfg.backbone, self.transformer.config)
        if dit_dim != cfg.dit_dim:
            raise CheckpointError(f"the DiT is {dit_dim} wide, but metacanvas dit_dim is {cfg.dit_dim}")

    # inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str | None, images=None, video=None) -> Conditioning:
        """Run the planner once for [negative, positive] (batched) and map its states to DiT conditioning."""
        from metacanvas_deploy.runtime.vision import preprocess_images, preprocess_video, video_tokens

        if self.tokenizer is None:
            raise CheckpointError("this model has no tokenizer (a `full` preset on meta): load a checkpoint")
        prompts = [prompt] if negative_prompt is None else [negative_prompt, prompt]
        rows, geo, vis = len(prompts), self.planner.vision_geometry(), {}
        n_image_tokens, n_video_tokens = [], None
        if images:
            pv, grid = preprocess_images(images, geo)
            vis.update(pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid))
            n_image_tokens = [geo.tokens_per_image] * len(images)
        if video is not None:
            pv, grid = preprocess_video(video, geo, self.cfg.planner_video_frames)
            vis.update(pixel_values_videos=torch.from_numpy(pv), video_grid_thw=torch.from_numpy(grid))
            n_video_tokens = video_tokens(geo, self.cfg.planner_video_frames)
        ids, mask = self.tokenizer.encode_batch(prompts, [n_image_tokens] * rows, [n_video_tokens] * rows,
                                                allow_empty=True)
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        # Every row sees the same vision inputs: Qwen scatters features into pad tokens across the batch in order.
        vis = {k: v.repeat(rows, 1) for k, v in vis.items()}  # (rows * n, ...)
        out = self.planner(ids, mask, **vis)
        embeds = self.context_mlp(out.context_states) * mask[..., None].to(out.context_states.dtype)
        pooled = self.pooled_proj(out.context_states, mask) if self.pooled_proj is not None else None
        pos = slice(-1, None)
        cond = Conditioning(prompt_embeds=embeds[pos], prompt_mask=mask[pos], canvas_states=out.canvas_states[pos],
                            pooled_prompt_embeds=None if pooled is None else pooled[pos])
        if negative_prompt is not None:
            cond.negative_prompt_embeds, cond.negative_prompt_mask = embeds[:1], mask[:1]
            cond.negative_canvas_states = out.canvas_states[:1]
            cond.negative_pooled_prompt_embeds = None if pooled is None else pooled[:1]
        return cond

    @torch.no_grad()
    def generate(self, task: str, prompt: str, negative_prompt: str = "", *, image=None, video=None,
                 reference_images=None, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, true_cfg_scale: float = 1.0, seed: int = 0,
                 latents: torch.Tensor | None = None) -> SampleOutput:
        """Reference sampling for one prompt: the planner once, then the backbone's own sampler."""
        self.cfg.check_task(task)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt must be a non-empty string")
        d = self.defaults
        height, width = height or d.height, width or d.width
        num_frames = num_frames or d.num_frames
        steps = num_inference_steps or d.num_inference_steps
        guidance = d.guidance_scale if guidance_scale is None else guidance_scale
        # A guidance-distilled DiT (FLUX-Kontext) has a negative branch only for true CFG.
        distilled = self.adapter.guidance_distilled
        use_cfg = true_cfg_scale > 1.0 if distilled else guidance > 1.0
        planner_images = {"edit": [image], "i2v": [image], "r2v": reference_images}.get(task)
        if planner_images is not None and any(im is None for im in planner_images):
            raise InputError(f"task {task!r} needs {'reference_images' if task == 'r2v' else 'an image'}")
        cond = self.encode(prompt, negative_prompt if use_cfg else None, images=planner_images,
                           video=video if task == "v2v" else None)
        kwargs = dict(image=image, video=video, reference_images=reference_images, height=height, width=width,
                      num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed), latents=latents)
        if distilled:
            kwargs["true_cfg_scale"] = true_cfg_scale
        return self.adapter.sample(task, cond, **kwargs)

    # checkpoints ----------------------------------------------------------------------------------------
    def metacanvas_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything MetaCanvas adds: canvas tokens, LoRA, connectors (never the stock planner/DiT/VAE)."""
        sd = {f"planner.{k}": v for k, v in self.planner.metacanvas_state_dict().items()}
        for name in ("context_mlp", "pooled_proj", "canvas_prep", "injector"):
            m = getattr(self, name)
            if m is not None:
                sd.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
        return {k: v.contiguous() for k, v in sd.items()}

    def save_pretrained(self, path: str | Path) -> None:
        """Write the checkpoint folder atomically: a crash leaves the old folder (or none), never half of one."""
        from metacanvas_deploy.mc_export.models.tokenizer import save_tokenizer

        with ckpt.atomic_dir(Path(path)) as tmp:
            self.planner.save_stock(tmp / "planner")
            save_tokenizer(tmp / "planner", self.tokenizer.tokenizer)
            self.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.adapter.scheduler.save_pretrained(tmp / "scheduler")
            (tmp / "metacanvas").mkdir()
            self.cfg.save(tmp / "metacanvas" / "config.json")
            (tmp / "metacanvas" / "sampling.json").write_text(json.dumps(dataclasses.asdict(self.defaults), indent=2))
            save_file(self.metacanvas_state_dict(), str(tmp / "metacanvas" / "model.safetensors"),
                      metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, lazy: bool = False) -> MetaCanvas:
        """Load a checkpoint folder offline (safetensors only, never pickle).

        ``lazy``: build the structure on `meta` and leave the weights on disk (`mc_export.models.lazy`), for
        models larger than memory; export streams them into the ONNX files one tensor at a time."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        from metacanvas_deploy.mc_export.models.planner import Planner
        from metacanvas_deploy.mc_export.models.tokenizer import load_tokenizer

        path = Path(path)
        if lazy:
            return cls._from_pretrained_lazy(path)
        cfg, defaults, (t_cls, v_cls) = read_checkpoint_configs(path)
        load = dict(local_files_only=True, use_safetensors=True)
        # The reference runs in float32 whatever the files hold (the public checkpoints are bf16; transformers
        # would otherwise load in the config's dtype).
        qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "planner", attn_implementation="sdpa",
                                                                   dtype=torch.float32, **load)
        transformer = t_cls.from_pretrained(path / "transformer", torch_dtype=torch.float32, **load)
        vae = v_cls.from_pretrained(path / "vae", torch_dtype=torch.float32, **load)
        scheduler = _scheduler_from_config(ckpt.read_json(path / "scheduler" / "scheduler_config.json"))
        model = cls(cfg, Planner(qwen, cfg), transformer, vae, scheduler,
                    load_tokenizer(path / "planner", cfg.max_prompt_tokens), defaults)
        model._load_metacanvas(load_file(str(path / "metacanvas" / "model.safetensors")))
        _own_aligned_memory(model)
        return model.eval()

    @classmethod
    def _from_pretrained_lazy(cls, path: Path) -> MetaCanvas:
        """`from_pretrained` without reading the weights: parameters on `meta`, ``model.lazy_weights`` says where
        each one is. Buffers (RoPE tables) are real: derived from the configs, small."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

        from metacanvas_deploy.mc_export.models.planner import Planner
        from metacanvas_deploy.mc_export.models.tokenizer import load_tokenizer

        cfg, defaults, (t_cls, v_cls) = read_checkpoint_configs(path)
        with init_empty_weights(include_buffers=False):
            qwen = Qwen2_5_VLForConditionalGeneration._from_config(
                AutoConfig.from_pretrained(path / "planner", local_files_only=True), attn_implementation="sdpa",
                dtype=torch.float32)
            transformer = t_cls.from_config(t_cls.load_config(path / "transformer", local_files_only=True))
            vae = v_cls.from_config(v_cls.load_config(path / "vae", local_files_only=True))
            scheduler = _scheduler_from_config(ckpt.read_json(path / "scheduler" / "scheduler_config.json"))
            model = cls(cfg, Planner(qwen, cfg), transformer, vae, scheduler,
                        load_tokenizer(path / "planner", cfg.max_prompt_tokens), defaults)
        # as from_pretrained does: a tied lm_head has no tensor of its own on disk. Outside init_empty_weights,
        # whose register_parameter hook would replace the shared parameter by a fresh one.
        qwen.tie_weights()
        model = model.float().eval()
        model.lazy_weights = LazyWeights(model, path)
        return model

    def _load_metacanvas(self, sd: dict[str, torch.Tensor]) -> None:
        expected = self.metacanvas_state_dict()
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"metacanvas/model.safetensors does not fit this config: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        bad = [k for k in expected if tuple(sd[k].shape) != tuple(expected[k].shape)]
        if bad:
            k = bad[0]
            raise CheckpointError(f"metacanvas weight {k} has shape {tuple(sd[k].shape)}, the config needs "
                                  f"{tuple(expected[k].shape)} (mismatched dims between planner and DiT?)")
        self.planner.load_metacanvas_state_dict({k[len("planner."):]: v for k, v in sd.items()
                                                 if k.startswith("planner.")})
        for name in ("context_mlp", "pooled_proj", "canvas_prep", "injector"):
            m = getattr(self, name)
            if m is not None:
                m.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})


@torch.no_grad()
def _own_aligned_memory(model: nn.Module) -> None:
    """Copy every weight into freshly allocated memory.

    Weights loaded from safetensors can sit at addresses that are not 64-byte aligned; oneDNN then picks other
    GEMM kernels whose sums differ in the last bit, so a loaded model would not reproduce the one saved. One copy
    per tensor (never the whole model twice) makes save -> load -> generate bit-exact.
    """
    for p in model.parameters():
        p.data = p.data.clone()
    for b in model.buffers():
        b.data = b.data.clone()


def _dit_width(backbone: str, c) -> int:
    return c.num_attention_heads * c.attention_head_dim


def _dit_text_dim(backbone: str, c) -> int:
    """The DiT's text width, from the config field its backbone record names."""
    return getattr(c, backbones.get(backbone).text_dim_field)
