"""Full-size checkpoints without the weights (`init-checkpoint --preset full`): the public models' configs, checked
by their parameter counts on `meta`; the streamed writer (per-name seeded tensors into bf16 shards with an
index), run here on the tiny preset with small shards through the same code path; indexes that disagree with their
shards refused at load; a non-empty --out refused. No full-size weights are written by these tests.

Pinned parameter counts and where the public figures come from:
- Qwen2.5-VL-7B-Instruct 8,292,166,656 (vision tower included): its model.safetensors.index.json total_size,
  16,584,333,312 bytes in bf16 (the same Qwen2.5-VL-7B is Qwen-Image's text_encoder, whose size exo's model
  cards list as that byte count).
- Qwen2.5-VL-3B-Instruct 3,754,622,976 (tied lm_head counted once): MTEB's model metadata (n_parameters,
  embeddings 311,164,928 = 151936 x 2048); the checkpoint ships 2 shards.
- Wan2.2-TI2V-5B-Diffusers transformer 4,999,787,712 in 825 tensors: its index, 19,999,150,848 bytes in fp32.
  MetaCanvas's multi-task layout adds 49 input channels to the patch embedding: + 3072 x 49 x 2 x 2.
- FLUX.1-Kontext-dev transformer 11,901,408,320: the FLUX.1 transformer index total_size, 23,802,816,640 bytes
  in bf16 (Kontext-dev has FLUX.1-dev's architecture and config).
- SANA 1600M 512px transformer 1,604,462,752: no public index figure is reachable here; counted from the public
  config.json (20 layers, 70 x 32 wide, cross-attention 20 x 112, caption 2304), "1.6B" on the model card.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tracemalloc
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from metacanvas_deploy.mc_export.backbones import get
from metacanvas_deploy.mc_export.cli import main
from metacanvas_deploy.mc_export.errors import CheckpointError, ConfigError
from metacanvas_deploy.mc_export.models import init_checkpoint as ic
from metacanvas_deploy.mc_export.models import random_init
from metacanvas_deploy.mc_export.models import safetensors_stream as st
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.mc_export.models.presets import QWEN_TOKEN_IDS, get_preset
from metacanvas_deploy.mc_export.models.tokenizer import build_qwen_layout_tokenizer
from metacanvas_deploy.runtime.text import PromptTokenizer

QWEN_PARAMS = {"7b": 8_292_166_656, "3b": 3_754_622_976}
DIT_PARAMS = {"wan": 4_999_787_712, "flux": 11_901_408_320, "sana": 1_604_462_752}
SHARD = 25_000  # bytes: several shards for every tiny part but metacanvas


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # a tied parameter once


# --- the public configs, pinned by their parameter counts ------------------------------------------------------

@pytest.mark.parametrize("planner", ["7b", "3b"])
def test_full_planner_has_the_public_parameter_count(planner):
    kwargs = get_preset("sana", "full", planner).planner
    with torch.device("meta"):
        qwen = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**kwargs))
    assert _count(qwen) == QWEN_PARAMS[planner]
    assert qwen.config.text_config.vocab_size == {"7b": 152064, "3b": 151936}[planner]


@pytest.mark.parametrize("backbone", sorted(DIT_PARAMS))
def test_full_dit_has_the_public_parameter_count(backbone):
    stock = {"condition_channels": 0} if backbone == "wan" else {}
    dit = MetaCanvas.from_preset(backbone, "full", device="meta", overrides=stock).transformer
    assert _count(dit) == DIT_PARAMS[backbone]
    if backbone == "wan":
        assert len(list(dit.parameters())) == 825
        multitask = MetaCanvas.from_preset("wan", "full", device="meta").transformer
        assert _count(multitask) == DIT_PARAMS["wan"] + 3072 * 49 * 2 * 2


def test_full_planner_plan_is_the_public_layout():
    """The 7B planner's tensors: the public index's total_size, in 4 shards of at most 5 GB, legacy names."""
    plans = {p.part: p for p in ic.plan_checkpoint(MetaCanvas.from_preset("sana", "full", device="meta"),
                                                   ic.DEFAULT_SHARD_BYTES)}
    planner = plans["planner"]
    assert sum(s.data_bytes for s in planner.shards) == 16_584_333_312
    assert [s.file for s in planner.shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    names = {t.name for s in planner.shards for t in s.tensors}
    assert {"model.embed_tokens.weight", "lm_head.weight", "visual.patch_embed.proj.weight"} <= names
    assert all(s.data_bytes <= ic.DEFAULT_SHARD_BYTES for s in planner.shards)
    assert sum(s.data_bytes for s in plans["transformer"].shards) == 2 * DIT_PARAMS["sana"]
    assert [s.file for s in plans["metacanvas"].shards] == ["model.safetensors"]


@pytest.mark.parametrize("backbone,planner", [("wan", "7b"), ("flux", "7b"), ("sana", "7b"), ("sana", "3b")])
def test_full_configs_load_in_the_libraries_and_describe_the_written_tensors(tmp_path, backbone, planner):
    """The folder's configs, read by transformers/diffusers alone, build (on meta) exactly the tensors the
    streamed writer writes: names, shapes."""
    from accelerate import init_empty_weights

    preset = get_preset(backbone, "full", planner)
    model = MetaCanvas.from_preset(backbone, preset, device="meta")
    ic._write_configs(tmp_path, model, preset)
    plans = {p.part: p for p in ic.plan_checkpoint(model, ic.DEFAULT_SHARD_BYTES)}
    t_cls, v_cls = get(backbone).diffusers_classes()
    config = transformers.AutoConfig.from_pretrained(tmp_path / "planner", local_files_only=True)
    assert config.text_config.hidden_size == model.cfg.mllm_dim and config.image_token_id == 151655
    with init_empty_weights():
        built = {"planner": transformers.Qwen2_5_VLForConditionalGeneration._from_config(config),
                 "transformer": t_cls.from_config(t_cls.load_config(tmp_path / "transformer")),
                 "vae": v_cls.from_config(v_cls.load_config(tmp_path / "vae"))}
    built["planner"].tie_weights()  # as from_pretrained does (the 3B's lm_head is its embedding)
    for part, module in built.items():
        want = {t.name: t.shape for s in plans[part].shards for t in s.tensors}
        keys = {ic._planner_key(n) if part == "planner" else n: tuple(p.shape) for n, p in module.named_parameters()}
        assert keys == want, part
    scheduler = getattr(__import__("diffusers"), get(backbone).scheduler_class)
    assert scheduler.from_pretrained(tmp_path / "scheduler").config.num_train_timesteps == 1000
    tok = PromptTokenizer.from_file(tmp_path / "planner", 512)
    assert tok.ids["<|image_pad|>"] == 151655 and tok.tokenizer.get_vocab_size() <= config.text_config.vocab_size


def test_qwen_layout_tokenizer_puts_the_specials_at_qwens_ids():
    tok = build_qwen_layout_tokenizer(152064)
    assert tok.get_vocab_size() == 151665  # Qwen2.5's own: 151643 regular + 22 added, padded to 152064 in config
    assert tok.token_to_id("<|endoftext|>") == QWEN_TOKEN_IDS["bos_token_id"] == 151643
    assert tok.token_to_id("<|im_end|>") == QWEN_TOKEN_IDS["eos_token_id"] == 151645
    assert (tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>")) == (151652, 151653)
    assert (tok.token_to_id("<|image_pad|>"), tok.token_to_id("<|video_pad|>")) == (151655, 151656)
    assert tok.token_to_id("<|file_sep|>") == 151664
    text = "a fox, naïve 狐"
    assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(ConfigError, match="at least 151665"):
        build_qwen_layout_tokenizer(151000)


# --- the streamed writer, on the tiny preset --------------------------------------------------------------------

def _write_tiny(out: Path, backbone: str, seed: int = 7, random_canvas: bool = True) -> ic.WrittenCheckpoint:
    cfg = ic.InitCheckpointConfig(backbone=backbone, preset="tiny", out=out, seed=seed, writer="streamed",
                                  random_canvas=random_canvas, max_shard_bytes=SHARD, progress=False)
    return ic.init_checkpoint(cfg, log=lambda line: None)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """backbone -> a streamed tiny checkpoint (seed 7, random canvas)."""
    root = tmp_path_factory.mktemp("streamed")
    return {b: _write_tiny(root / b, b).path for b in ("wan", "flux", "sana")}


def _expected(backbone: str, seed: int = 7):
    """part -> (file name -> tensor), from the generator alone."""
    model = MetaCanvas.from_preset(backbone, "tiny", device="meta")
    for plan in ic.plan_checkpoint(model, SHARD, random_canvas=True):
        yield plan, {t.name: random_init.make_tensor(seed, f"{plan.part}/{t.name}", t.shape, plan.rules[t.name],
                                                     t.dtype) for s in plan.shards for t in s.tensors}


@pytest.mark.parametrize("backbone", ["wan", "flux", "sana"])
def test_every_written_tensor_is_the_generators_value(written, backbone):
    path = written[backbone]
    for plan, expected in _expected(backbone):
        files = sorted(p.name for p in (path / plan.part).glob("*.safetensors"))
        assert files == sorted(s.file for s in plan.shards)
        if plan.part != "metacanvas":
            assert len(files) > 1, plan.part
            index = json.loads((path / plan.part / f"{plan.prefix}.safetensors.index.json").read_text())
            assert set(index["weight_map"]) == set(expected)
            assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
        for f in files:
            with safe_open(str(path / plan.part / f), "pt") as sf:
                assert sf.metadata() == {"format": "pt"}
                for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    got = sf.get_tensor(key)
                    assert got.dtype == torch.bfloat16 and torch.equal(got, expected.pop(key)), key
        assert not expected, f"{plan.part}: not written: {sorted(expected)[:3]}"


def test_init_rules_follow_the_module_types():
    model = MetaCanvas.from_preset("wan", "tiny", device="meta")
    rules = random_init.model_init_rules(model)
    assert rules["planner.qwen.model.language_model.norm.weight"] == random_init.ONES
    assert rules["vae.encoder.norm_out.gamma"] == random_init.ONES  # Wan's RMS_norm
    assert rules["transformer.patch_embedding.bias"] == random_init.ZEROS
    assert rules["planner.qwen.model.language_model.embed_tokens.weight"] == random_init.InitRule("normal", 0.02)
    conv = rules["transformer.patch_embedding.weight"]  # Conv3d(8 + 9 -> 32, 1x2x2): 1 / sqrt(fan_in)
    assert conv.kind == "normal" and conv.std == pytest.approx((17 * 4) ** -0.5)
    assert rules["transformer.scale_shift_table"].std == pytest.approx(32 ** -0.5)
    assert rules["injector.out.weight"] == random_init.ZEROS  # zero-initialised canvas layers stay zero...
    assert random_init.model_init_rules(model, random_canvas=True)["injector.out.weight"].kind == "normal"
    lora_b = [n for n in rules if n.endswith("lora_B.weight")]
    assert lora_b and all(rules[n] == random_init.ZEROS for n in lora_b)


@pytest.mark.parametrize("backbone", ["wan", "flux", "sana"])
def test_the_libraries_load_the_sharded_folder(written, backbone):
    path = written[backbone]
    qwen, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path / "planner", local_files_only=True, use_safetensors=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    t_cls, v_cls = get(backbone).diffusers_classes()
    for part, cls in (("transformer", t_cls), ("vae", v_cls)):
        _, info = cls.from_pretrained(path / part, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    expected = {plan.part: tensors for plan, tensors in _expected(backbone)}
    for name, p in qwen.named_parameters():  # transformers keeps the files' bf16
        assert torch.equal(p, expected["planner"][ic._planner_key(name)]), name
    for name, p in t_cls.from_pretrained(path / "transformer").named_parameters():  # diffusers: float32
        assert torch.equal(p.to(torch.bfloat16), expected["transformer"][name]), name


@pytest.mark.parametrize("backbone", ["wan", "flux", "sana"])
def test_metacanvas_loads_the_streamed_folder_whole_and_lazily(written, backbone):
    path = written[backbone]
    model = MetaCanvas.from_pretrained(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # bf16 files, a float32 reference
    lazy = MetaCanvas.from_pretrained(path, lazy=True)
    assert all(p.is_meta for p in lazy.parameters())
    refs = lazy.lazy_weights.refs(lazy)
    real = dict(model.named_parameters(remove_duplicate=False))
    for name in ("injector.out.weight", "context_mlp.fc1.weight"):
        assert torch.equal(refs[name].load(), real[name]), name
    if backbone == "sana":
        out = model.generate("t2i", "a red fox", num_inference_steps=2)
        assert out.frames.shape == (1, 1, 64, 64, 3) and torch.isfinite(out.latents).all()


def test_same_seed_same_bytes_other_seed_other_values(tmp_path, written):
    again = _write_tiny(tmp_path / "again", "sana").path
    other = _write_tiny(tmp_path / "other", "sana", seed=8).path
    for f in sorted((written["sana"] / "transformer").glob("*.safetensors")):
        assert (again / "transformer" / f.name).read_bytes() == f.read_bytes()
        assert (other / "transformer" / f.name).read_bytes() != f.read_bytes()


def test_the_writer_holds_one_chunk_and_no_shard(tmp_path, monkeypatch):
    """By construction: each chunk is dropped before the next is made (tracked with weakrefs, chunks forced
    small, on every tensor of a tiny checkpoint), and a shard is never buffered: writing a 6 MB shard allocates
    a few KB of Python memory (torch's chunk memory aside: one chunk, as the first half shows)."""
    real, live, largest, count = random_init.tensor_chunks, [0], [0], [0]

    def tracked(seed, name, shape, rule, dtype):
        chunks = real(seed, name, shape, rule, dtype, chunk_elems=256)
        while True:
            assert live[0] == 0, f"{name}: the writer still holds a chunk when it asks for the next"
            c = next(chunks, None)
            if c is None:
                return
            live[0] += 1
            weakref.finalize(c, lambda: live.__setitem__(0, live[0] - 1))
            largest[0], count[0] = max(largest[0], c.numel() * c.element_size()), count[0] + 1
            yield c
            del c

    monkeypatch.setattr(random_init, "tensor_chunks", tracked)
    plans = ic.plan_checkpoint(MetaCanvas.from_preset("wan", "tiny", device="meta"), SHARD)
    ic._write_weights(tmp_path, plans, 0, lambda n: None)
    assert largest[0] == 256 * 2 and count[0] > sum(len(s.tensors) for p in plans for s in p.shards)
    monkeypatch.undo()

    shard = st.plan_shards([st.TensorPlan(f"w{i}", (1024, 1024), torch.bfloat16) for i in range(3)], "model",
                           10**8)[0]
    rule = random_init.InitRule("normal", 0.02)
    tracemalloc.start()
    try:
        st.write_shard(tmp_path, shard, lambda t: random_init.tensor_chunks(0, t.name, t.shape, rule, t.dtype,
                                                                             chunk_elems=2**16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak  # the shard is 6 MB
    with safe_open(str(tmp_path / shard.file), "pt") as sf:
        assert torch.equal(sf.get_tensor("w2"), random_init.make_tensor(0, "w2", (1024, 1024), rule, torch.bfloat16,
                                                                        chunk_elems=2**16))


# --- refusals: indexes that disagree with their shards, folders that are not empty, a full disk --------------

def _broken_copy(written, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(written["sana"], copy)
    return copy


def _edit_index(path: Path, edit) -> None:
    index = path / "planner" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))


def _shard(path: Path, i: int) -> str:
    return sorted(p.name for p in (path / "planner").glob("model-*-of-*.safetensors"))[i]


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("breakage,words", [
    (lambda p: (p / "planner" / _shard(p, 1)).unlink(), "names the shard {second} ("),
    (lambda p: _edit_index(p, lambda m: m.update({"model.ghost.weight": _shard(p, 0)})),
     "model.ghost.weight in {first} (no shard holds it)"),
    (lambda p: _edit_index(p, lambda m: m.pop("model.norm.weight")), "does not list 1 tensors"),
    (lambda p: shutil.copy(p / "metacanvas" / "model.safetensors", p / "planner" / "model.safetensors"),
     "model.safetensors beside model.safetensors.index.json"),
])
def test_an_index_that_disagrees_with_its_shards_is_a_clear_error(written, tmp_path, breakage, words, lazy):
    path = _broken_copy(written, tmp_path)
    words = words.format(first=_shard(path, 0), second=_shard(path, 1))
    breakage(path)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        MetaCanvas.from_pretrained(path, lazy=lazy)


@pytest.mark.parametrize("preset", ["tiny", "full"])
def test_a_non_empty_out_is_refused_in_one_line(tmp_path, capsys, preset):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert main(["init-checkpoint", "--backbone", "sana", "--preset", preset, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "exists and is not empty" in err[0], err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left


def test_an_empty_out_is_filled_by_either_writer(tmp_path, capsys):
    umask = os.umask(0o022)
    os.umask(umask)
    for writer in ("module", "streamed"):
        out = tmp_path / writer
        out.mkdir()
        assert main(["init-checkpoint", "--backbone", "sana", "--writer", writer, "--max-shard-size", "25KB",
                     "--out", str(out)]) == 0
        assert (out / "metacanvas" / "model.safetensors").is_file()
        assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not a temp folder's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["module", "streamed"]
    assert "wrote tiny sana checkpoint" in capsys.readouterr().out


def test_too_little_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(ic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(CheckpointError, match="has 1.0 KB free; this checkpoint needs"):
        _write_tiny(tmp_path / "ckpt", "sana")
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_mid_write_leaves_nothing_and_says_what_was_needed(tmp_path, monkeypatch):
    real, calls = st.write_shard, [0]

    def fill(directory, shard, chunks, on_bytes=lambda n: None):
        calls[0] += 1
        if calls[0] == 3:
            (Path(directory) / shard.file).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, shard, chunks, on_bytes)

    monkeypatch.setattr(st, "write_shard", fill)
    with pytest.raises(CheckpointError, match=r"the disk filled after .* the checkpoint needs .* partial folder was "
                                              r"removed"):
        _write_tiny(tmp_path / "ckpt", "sana")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,words", [
    (dict(preset="tiny", planner="3b"), "--planner 3b needs --preset full"),
    (dict(preset="full", writer="module"), "written streamed"),
    (dict(preset="tiny", seed=-1), "--seed must be in"),
    (dict(preset="tiny", max_shard_bytes=0), "--max-shard-size must be positive"),
])
def test_init_checkpoint_options_are_checked_first(tmp_path, kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ic.InitCheckpointConfig(backbone="sana", out=tmp_path / "x", **kwargs).validate()
    assert ic.parse_size("5GB") == 5 * 10**9 and ic.parse_size("512MiB") == 512 * 2**20
