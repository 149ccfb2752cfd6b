"""Hostile and careless input, as a user would give it: nothing is lost, and every bad input is refused with one
clear line before any work starts. One section per failure class; new features extend it.

Oracle: the files a user had are still there byte for byte; the CLIs exit 2 with one `error:` line and no
traceback; the API raises the package's own error type.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_bundle import edit_manifest, populate_ok

from metacanvas_deploy.mc_export.build import BuildConfig
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.runtime.bundle import load_bundle, write_bundle
from metacanvas_deploy.runtime.errors import BundleError, BundleWriteError, ManifestError, RuntimeInputError

REPO = Path(__file__).resolve().parents[1]


def cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def assert_one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, one `error:` line on stderr naming ``words``, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines and lines[-1].startswith("error: "), res.stderr[-2000:]
    for w in words:
        assert w in lines[-1], (w, lines[-1])


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- nothing lost: a build writes only into a new or empty folder, or a bundle holding nothing else ----------

def test_a_folder_with_a_file_named_manifest_json_is_not_a_bundle(tmp_path: Path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "my web app", "version": "1.0"}))
    (out / "index.html").write_text("<html>precious</html>")
    before = snapshot(out)
    with pytest.raises(BundleWriteError, match="not a bundle's"):
        write_bundle(out, populate_ok)
    assert snapshot(out) == before


def test_a_bundle_holding_the_users_files_is_not_replaced(tmp_path: Path):
    out = tmp_path / "bundle"
    write_bundle(out, populate_ok)
    (out / "notes.txt").write_text("my measurements")
    before = snapshot(out)
    with pytest.raises(BundleWriteError, match="notes.txt"):
        write_bundle(out, populate_ok)
    assert snapshot(out) == before
    (out / "notes.txt").unlink()
    write_bundle(out, populate_ok)  # a bundle holding only its own files is replaced
    load_bundle(out)


def test_a_symlinked_out_is_not_followed(tmp_path: Path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(BundleWriteError, match="not a bundle"):
        write_bundle(tmp_path / "link", populate_ok)
    assert (target / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_build_never_writes_into_its_checkpoint(tmp_path: Path, where: str):
    ckpt = tmp_path / "ckpt"
    out = {"same": ckpt, "inside": ckpt / "bundle", "around": tmp_path}[where]
    with pytest.raises(ConfigError, match="checkpoint"):
        BuildConfig(out=out, checkpoint=ckpt).validate(gpu_available=False)


def test_build_never_replaces_the_float_bundle_it_reads(tmp_path: Path):
    with pytest.raises(ConfigError, match="float bundle"):
        BuildConfig(out=tmp_path / "b", backbone="sana", precision="int8",
                    float_bundle=tmp_path / "b").validate(gpu_available=False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=0), "--steps must be in 1..1000, got 0"),
    (dict(steps=10**7), "--steps must be in 1..1000"),
    (dict(steps=2.5), "--steps must be an integer"),
    (dict(seed=-1), "--seed must be in 0.."),
    (dict(range_overrides=(("height", (0, 64, 128)),)), "--height must be in 1.."),
    (dict(range_overrides=(("frames", (1, 9, 10**6)),)), "--frames must be in 1..4097"),
])
def test_build_numbers_are_bounded_before_any_work(tmp_path: Path, kwargs, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("-", r"\-")):
        BuildConfig(out=tmp_path / "b", backbone="sana", **kwargs).validate(gpu_available=False)


def test_the_cli_refuses_a_checkpoint_as_out_in_one_line(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "weights.safetensors").write_bytes(b"precious")
    res = cli("mc_export", "build", "--checkpoint", str(ckpt), "--out", str(ckpt))
    assert_one_line_error(res, "checkpoint")
    assert (ckpt / "weights.safetensors").read_bytes() == b"precious"


# --- manifests: every field the runtime uses is typed and bounded before use -----------------------------------

def _nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["defaults"].update(num_inference_steps=10**9), "defaults.num_inference_steps"),
    (lambda m: m["defaults"].update(num_inference_steps=True), "defaults.num_inference_steps"),
    (lambda m: m["defaults"].update(height=4096), "defaults.height"),
    (lambda m: m["defaults"].update(guidance_scale=1e300), "defaults.guidance_scale"),
    (lambda m: m["defaults"].pop("negative_prompt"), "defaults.negative_prompt"),
    (lambda m: m["ranges"].update(height=[32, 2**40]), "ranges.height"),
    (lambda m: m["build"].update(huge=2**80), "build.huge"),
    (lambda m: m["build"].update(deep=_nested(40)), "nests deeper"),
    (lambda m: m["scheduler"].update(plans={"100000": {}}), "scheduler.plans"),
    (lambda m: m["engines"]["denoiser"].update(size_bytes=2**60), "size_bytes"),
])
def test_a_manifest_with_unbounded_or_mistyped_values_is_refused(tmp_path: Path, edit, words):
    out = tmp_path / "bundle"
    write_bundle(out, populate_ok)
    edit_manifest(out, edit)
    with pytest.raises(ManifestError, match=words.replace(".", r"\.")):
        load_bundle(out)


def test_a_manifest_nested_past_the_parser_is_one_error(tmp_path: Path):
    out = tmp_path / "bundle"
    write_bundle(out, populate_ok)
    (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="nests too deeply"):
        load_bundle(out)


# --- media: decoded as a viewer shows them, sized from headers before decoding -----------------------------------

def _png_claiming(path: Path, width: int, height: int) -> None:
    """A valid tiny PNG whose header claims ``width`` x ``height`` (CRC fixed): only a full decode would notice."""
    import struct
    import zlib

    from PIL import Image

    Image.new("RGB", (2, 2)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_a_huge_image_is_refused_from_its_header(tmp_path: Path):
    from metacanvas_deploy.runtime.media import read_image

    _png_claiming(tmp_path / "big.png", 9000, 9000)  # past our 64 Mpixel bound, under Pillow's own
    with pytest.raises(RuntimeInputError, match="is 9000x9000: images and frames may be at most"):
        read_image(tmp_path / "big.png")
    _png_claiming(tmp_path / "bomb.png", 100_000, 100_000)  # Pillow's decompression-bomb check, as our error
    with pytest.raises(RuntimeInputError, match="cannot read image .*decompression bomb"):
        read_image(tmp_path / "bomb.png")


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path):
    from PIL import Image

    from metacanvas_deploy.runtime.media import read_image

    grey = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(grey).save(tmp_path / "deep.png")
    got = read_image(tmp_path / "deep.png")
    assert np.array_equal(got, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1))


def test_exif_orientation_is_applied(tmp_path: Path):
    from PIL import Image

    from metacanvas_deploy.runtime.media import read_image

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    got = read_image(tmp_path / "phone.jpg")
    assert got.shape == (40, 20, 3)  # portrait, as a viewer shows it
    assert got[:10].mean() > 200 and got[30:].mean() < 50  # the band is now on top


def test_a_video_longer_than_allowed_stops_decoding_early(tmp_path: Path):
    from PIL import Image

    from metacanvas_deploy.runtime.media import read_video

    frames = [Image.fromarray(np.full((8, 8), 10 * i, np.uint8)) for i in range(20)]
    frames[0].save(tmp_path / "long.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(RuntimeInputError, match="more than 5 frames"):
        read_video(tmp_path / "long.gif", max_frames=5)
    video = read_video(tmp_path / "long.gif", max_frames=20)
    assert video.shape == (20, 8, 8, 3)  # grey frames become RGB, not sliced


@pytest.mark.parametrize("name, frames, words", [
    ("out.txt", 1, "unsupported output"),
    ("out.png", 9, "9 frames cannot be written"),
    ("blocker/out.png", 1, "cannot write to"),
])
def test_outputs_are_checked_before_the_work(tmp_path: Path, name, frames, words):
    from metacanvas_deploy.runtime.media import check_output

    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(RuntimeInputError, match=words):
        check_output(tmp_path / name, frames)


@pytest.mark.parametrize("args, words", [
    (["--out", "x.txt"], "unsupported output"),
    (["--threads", "0"], "--threads must be in 1.."),
    (["--image", "missing.png"], "cannot read image"),
])
def test_generate_refuses_bad_input_before_opening_engines(bundles, tmp_path: Path, args, words):
    base = ["generate", "--bundle", str(bundles["sana"]), "--prompt", "a fox", "--out", str(tmp_path / "o.png")]
    res = cli("runtime", *base, *[a if not a.endswith((".txt", ".png")) else str(tmp_path / a) for a in args],
              timeout=120)
    assert_one_line_error(res, words)


# --- requests: typed, finite, bounded; zero is never "the default" ----------------------------------------------

@pytest.fixture(scope="module")
def sana(bundles):
    from metacanvas_deploy.runtime.pipeline import Pipeline

    return Pipeline.load(bundles["sana"])


@pytest.mark.parametrize("kwargs, words", [
    (dict(height=0), "height must be in 1.."),
    (dict(width=-64), "width must be in 1.."),
    (dict(num_inference_steps=0), "num_inference_steps must be in 1..1000, got 0"),
    (dict(num_inference_steps=10**9), "num_inference_steps must be in 1..1000"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
    (dict(num_inference_steps=True), "num_inference_steps must be an integer"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (dict(guidance_scale="7"), "guidance_scale must be a number"),
    (dict(true_cfg_scale=-1.0), "true_cfg_scale must be a finite number"),
    (dict(seed=-1), "seed must be in 0.."),
    (dict(seed=2**70), "seed must be in 0.."),
    (dict(seed="0"), "seed must be an integer"),
    (dict(prompt="\udcff broken bytes"), "cannot be encoded as UTF-8"),
    (dict(prompt="x" * 200_000), "at most 100000"),
    (dict(prompt=b"a fox"), "prompt must be a string"),
    (dict(negative_prompt=3), "negative_prompt must be a string"),
])
def test_a_bad_request_is_refused_before_any_engine_runs(sana, kwargs, words):
    kwargs = {"prompt": "a fox", **kwargs}
    before = {s: e.calls for s, e in sana.engines.items()}
    with pytest.raises(RuntimeInputError, match=words):
        sana(**kwargs)
    assert {s: e.calls for s, e in sana.engines.items()} == before  # no work started


def test_threads_are_bounded(bundles):
    from metacanvas_deploy.runtime.pipeline import Pipeline

    for threads in (0, -2, 10**6, 1.5):
        with pytest.raises(RuntimeInputError, match="threads must be"):
            Pipeline.load(bundles["sana"], threads=threads)


def test_reference_checks_its_output_before_loading_the_model(tmp_path: Path):
    """The checkpoint does not even exist: the output error comes first, before any loading."""
    res = cli("mc_export", "reference", "--checkpoint", str(tmp_path / "nowhere"), "--task", "t2v",
              "--prompt", "a fox", "--out", str(tmp_path / "fox.png"), "--frames", "9")
    assert_one_line_error(res, "9 frames cannot be written to fox.png")


def test_a_disk_that_fills_mid_write_keeps_the_previous_bundle(tmp_path: Path):
    import errno
    import os

    out = tmp_path / "bundle"
    write_bundle(out, populate_ok)
    before = snapshot(out)

    def fills_up(tmp: Path):
        populate_ok(tmp)
        (tmp / "big.onnx").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a full disk raises mid-write

    with pytest.raises(BundleWriteError, match="filled up.*partial bundle is removed.*previous bundle is untouched"):
        write_bundle(out, fills_up)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["bundle"]


def test_a_bundle_too_big_for_memory_is_refused_naming_the_mode_that_fits(bundles, monkeypatch):
    """Pretend the machine has less memory than the bundle's weights: a copying load is refused before any
    session opens, saying how much it needs and which mode fits; the mapped low-memory mode loads."""
    from metacanvas_deploy.runtime import pipeline as pl

    sizes = pl._stage_bytes(load_bundle(bundles["sana"]))
    monkeypatch.setattr(pl, "available_bytes", lambda: max(sizes.values()) + 1)  # one stage fits, not all
    with pytest.raises(BundleError, match=r"need .* GiB in memory at once.*Load it with low_memory=True"):
        pl.Pipeline.load(bundles["sana"])
    monkeypatch.setattr(pl, "available_bytes", lambda: 1)
    with pytest.raises(BundleError, match="Load it with mapped=True"):
        pl.Pipeline.load(bundles["sana"])
    with pytest.raises(BundleError, match="per stage"):
        pl.Pipeline.load(bundles["sana"], low_memory=True, mapped=False)
    out = pl.Pipeline.load(bundles["sana"], low_memory=True)("a fox", num_inference_steps=2)  # mapped: runs
    assert out.frames.dtype == np.uint8
