"""The product loop: `mc_export build` -> bundle -> `runtime.pipeline.Pipeline`, for every backbone and task,
against the PyTorch reference on the same weights and initial latents.

Oracle tolerances (issue: cosine >= 0.99999 on the final latents, frames within 1 uint8 level): every stage is
fp32 in both; the engines differ from eager PyTorch only in summation order (per-stage max_rel ~1e-6, see the
build's parity table), compounded over the steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from metacanvas_deploy.mc_export.backbones import get
from metacanvas_deploy.mc_export.build import BuildConfig, build
from metacanvas_deploy.mc_export.errors import BuildError
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.runtime.errors import BundleIntegrityError, RuntimeInputError, ShapeError
from metacanvas_deploy.runtime.pipeline import Pipeline

STEPS = 3
IMG = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
# The backbones this file tests end to end, each on every task its record serves: tests/test_registry.py fails
# when a registered backbone is missing here.
END_TO_END_BACKBONES = ("sana", "flux", "wan")
TASKS = {b: get(b).tasks for b in END_TO_END_BACKBONES}


@pytest.fixture(scope="session")
def references() -> dict[str, MetaCanvas]:
    """The same weights the bundles were built from (build's default: seed 0, random canvas layers)."""
    return {b: MetaCanvas.from_preset(b, "tiny", seed=0, random_canvas=True) for b in TASKS}


def task_inputs(task: str, d) -> dict:
    rng = np.random.RandomState(3)
    return {"edit": {"image": IMG}, "i2v": {"image": IMG}, "r2v": {"reference_images": [IMG, IMG[::-1].copy()]},
            "v2v": {"video": (rng.rand(d.num_frames, d.height, d.width, 3) * 255).astype(np.uint8)}}.get(task, {})


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference_latents(backbone: str, runtime_latents: np.ndarray) -> torch.Tensor:
    """The runtime's initial sample in the reference adapter's layout (FLUX packs its latents)."""
    x = torch.from_numpy(runtime_latents)
    if backbone == "flux":
        from metacanvas_deploy.mc_export.models.backbones.flux import pack_latents

        return pack_latents(x)
    return x


@pytest.mark.parametrize("backbone,task", [(b, t) for b, ts in TASKS.items() for t in ts])
def test_runtime_matches_the_pytorch_reference(bundles, references, backbone, task):
    model = references[backbone]
    d = model.defaults
    pipe = Pipeline.load(bundles[backbone])
    shape = pipe.latents_shape()
    noise = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    kw = dict(task_inputs(task, d), num_inference_steps=STEPS)
    ours = pipe("a red fox in the snow", task=task, latents=noise, **kw)
    ref = model.generate(task, "a red fox in the snow", latents=reference_latents(backbone, noise), **kw)
    ref_latents = ref.latents.numpy()
    if backbone == "flux":
        from metacanvas_deploy.mc_export.models.backbones.flux import unpack_latents

        _, h_tok, w_tok = model.adapter.token_grid(d.height, d.width, 1)
        ref_latents = unpack_latents(ref.latents, h_tok, w_tok).numpy()
    assert ours.latents.shape == ref_latents.shape
    assert cosine(ours.latents, ref_latents) >= 0.99999
    np.testing.assert_allclose(ours.prompt_embeds, ref.prompt_embeds.numpy(), rtol=0, atol=1e-4)
    assert ours.frames.dtype == np.uint8 and ours.frames.shape == ref.frames[0].shape
    assert np.abs(ours.frames.astype(int) - ref.frames[0].astype(int)).max() <= 1
    assert set(ours.timings) >= {"planner", "denoise", "vae_decoder", "total"}


def test_planner_runs_once_per_request_and_denoise_once_per_step(bundles):
    pipe = Pipeline.load(bundles["sana"])
    pipe("a fox", num_inference_steps=4)
    assert pipe.engines["planner"].calls == 1
    assert pipe.engines["denoise"].calls == 4
    assert pipe.engines["vae_decoder"].calls == 1


def test_identical_rebuild_is_a_cache_hit(bundles):
    logs = []
    manifest = (bundles["sana"] / "manifest.json").read_text()
    build(BuildConfig(out=bundles["sana"], backbone="sana", steps=STEPS), log=logs.append)
    assert any("up to date" in line for line in logs)
    assert (bundles["sana"] / "manifest.json").read_text() == manifest


def test_a_build_that_fails_midway_leaves_the_old_bundle(bundles, monkeypatch, tmp_path):
    import metacanvas_deploy.mc_export.stages as stages

    existing = bundles["sana"]  # built before the exporter is broken

    def killed_during_export(comp, path, weights=None, fused_attention=True, log=None):
        Path(path).write_bytes(b"half an onnx file")  # the first stage's export is cut short
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "export_component", killed_during_export)
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(out=tmp_path / "new", backbone="sana", steps=STEPS, seed=1), log=lambda *a: None)
    assert not (tmp_path / "new").exists(), "an interrupted first build leaves no bundle"
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(out=existing, backbone="sana", steps=STEPS, seed=1), log=lambda *a: None)
    assert Pipeline.load(existing).manifest.build["source"]["seed"] == 0, "the old bundle is intact"


def test_corrupt_engine_is_refused(bundles, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundles["sana"], broken)
    data = bytearray((broken / "denoise.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "denoise.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="denoise.onnx"):
        Pipeline.load(broken)


def test_out_of_range_and_bad_inputs_are_clear_errors(bundles):
    pipe = Pipeline.load(bundles["sana"])
    with pytest.raises(ShapeError, match="height 4096 is outside"):
        pipe("a fox", height=4096)
    with pytest.raises(RuntimeInputError, match="non-empty"):
        pipe("  ")
    flux = Pipeline.load(bundles["flux"])
    with pytest.raises(RuntimeInputError, match="needs an input image"):
        flux("make it blue")
    with pytest.raises(RuntimeInputError, match="RGB"):
        from PIL import Image

        flux("make it blue", image=Image.fromarray(IMG).convert("L"))
    with pytest.raises(RuntimeInputError, match="latents must be finite float32"):
        pipe("a fox", latents=np.full((1, 4, 16, 16), np.nan, np.float32))


def test_unservable_precision_and_target_name_what_can_be_built(tmp_path):
    with pytest.raises(BuildError, match="this machine can build: fp32, int8, fp8"):
        BuildConfig(out=tmp_path, backbone="wan", precision="bf16").validate(gpu_available=False)
    with pytest.raises(BuildError, match="--target onnxruntime"):
        BuildConfig(out=tmp_path, backbone="wan", target="tensorrt").validate(gpu_available=False)
    cfg = BuildConfig(out=tmp_path, backbone="wan").validate(gpu_available=False)
    assert (cfg.target, cfg.preset) == ("onnxruntime", "tiny")


def test_runtime_works_with_torch_transformers_and_diffusers_unimportable(bundles, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'diffusers', 'onnx') or \
                        name.startswith(('metacanvas_deploy.mc_export', 'metacanvas_deploy.calib')):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        from metacanvas_deploy.runtime.pipeline import Pipeline
        from metacanvas_deploy.runtime.media import write_media
        out = Pipeline.load({str(bundles['sana'])!r})('a fox', num_inference_steps=2)
        write_media({str(tmp_path / 'fox.png')!r}, out.frames)
        print('ok', out.frames.shape)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok" in res.stdout and (tmp_path / "fox.png").is_file()


def test_cli_build_and_generate(bundles, tmp_path):
    from metacanvas_deploy.runtime.__main__ import main as runtime_main

    assert runtime_main(["generate", "--bundle", str(bundles["wan"]), "--prompt", "a fox", "--steps", "2",
                         "--out", str(tmp_path / "fox.mp4")]) == 0
    assert (tmp_path / "fox.mp4").stat().st_size > 0
    assert runtime_main(["generate", "--bundle", str(bundles["wan"]), "--prompt", "a fox", "--height", "999",
                         "--out", str(tmp_path / "x.mp4")]) == 2
    manifest = json.loads((bundles["wan"] / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"t2v", "i2v", "v2v", "r2v"}


def test_verify_reruns_every_gate(bundles, capsys):
    from metacanvas_deploy.mc_export.__main__ import main

    assert main(["verify", "--bundle", str(bundles["sana"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = {line.split()[0] for line in lines[1:]}
    assert stages == set(json.loads((bundles["sana"] / "manifest.json").read_text())["engines"])


def test_a_checkpoint_builds_the_same_bundle_key_as_its_preset(tmp_path, references):
    """`--checkpoint DIR` loads the weights `init-checkpoint` wrote: the content key sees the same weights."""
    from metacanvas_deploy.mc_export.build import load_model
    from metacanvas_deploy.mc_export.writer import weights_hash

    references["sana"].save_pretrained(tmp_path / "ckpt")
    from_ckpt = load_model(BuildConfig(out=tmp_path / "b", checkpoint=tmp_path / "ckpt").validate(False))
    from_preset = load_model(BuildConfig(out=tmp_path / "b", backbone="sana").validate(False))
    assert weights_hash(from_ckpt) == weights_hash(from_preset)
    with pytest.raises(Exception, match="holds a sana model"):
        load_model(BuildConfig(out=tmp_path / "b", backbone="wan", checkpoint=tmp_path / "ckpt").validate(False))


def test_low_memory_mode_holds_one_stage_at_a_time_and_generates_the_same(bundles, monkeypatch):
    """`low_memory=True` opens each engine when its stage runs and frees it after: at every open, no other
    engine is resident. Same sessions (mapped weights, the low-memory default), same inputs: the frames are
    identical to the resident pipeline's with mapped weights."""
    import metacanvas_deploy.runtime.engine as engine_mod

    image = (np.random.RandomState(5).rand(64, 64, 3) * 255).astype(np.uint8)
    ref = Pipeline.load(bundles["flux"], threads=1, mapped=True)(prompt="make it red", image=image, seed=3)
    pipe = Pipeline.load(bundles["flux"], threads=1, low_memory=True)
    assert not any(e.loaded for e in pipe.engines.values())
    resident_at_open, real_open = [], engine_mod._open

    def spy(path, entry, *args):
        resident_at_open.append((entry.stage, [s for s, e in pipe.engines.items() if e.loaded]))
        return real_open(path, entry, *args)

    monkeypatch.setattr(engine_mod, "_open", spy)
    out = pipe(prompt="make it red", image=image, seed=3)
    assert [stage for stage, _ in resident_at_open] == ["vision_encoder", "planner", "vae_encoder", "denoise",
                                                        "vae_decoder"]
    assert all(others == [] for _, others in resident_at_open)
    assert not any(e.loaded for e in pipe.engines.values())
    np.testing.assert_array_equal(out.frames, ref.frames)
    assert out.timings.keys() == ref.timings.keys()


def test_the_manifest_records_each_stages_cost(bundles):
    """Per stage: export and gate seconds, peak resident and private memory, and the bytes it wrote (exactly the
    engine file plus its external data)."""
    from metacanvas_deploy.runtime.bundle import load_bundle

    bundle = load_bundle(bundles["wan"])
    records = bundle.manifest.build["stages"]
    assert set(records) == set(bundle.manifest.engines)
    for stage, entry in bundle.manifest.engines.items():
        rec = records[stage]
        files = [entry.file, *entry.external_data]
        assert rec["bytes"] == sum((bundle.path / f).stat().st_size for f in files)
        assert rec["export_s"] > 0 and rec["gate_s"] > 0 and rec["peak_rss_mb"] > 0


def test_defaults_outside_the_built_ranges_become_the_ranges_opt(tmp_path):
    """A model built for smaller requests than its own defaults (a full-size Wan for 256x256): the manifest's
    defaults are inside the ranges, so a request without sizes runs (the manifest check refuses anything else)."""
    from metacanvas_deploy.runtime.bundle import load_bundle

    out = build(BuildConfig(out=tmp_path / "b", backbone="sana", steps=STEPS, range_overrides=(
        ("height", (32, 32, 32)), ("width", (32, 32, 32)))), log=lambda *a: None)
    d = load_bundle(out).manifest.defaults
    assert (d["height"], d["width"]) == (32, 32)
    assert Pipeline.load(out)("a fox", num_inference_steps=2).frames.shape == (1, 32, 32, 3)
