"""The wheel as a user gets it: every package installs under `metacanvas_deploy` (nothing a user's own `runtime/`,
`calib/` or `benchmarks/` folder, or another distribution, can shadow), benchmarks/ is not shipped, and the runtime,
compiler and calibration import from a working directory that holds decoy packages of those names.

The fresh environment gets the wheel with pip (no editable install, no source tree on sys.path) and sees the
test environment's third-party packages through a view that leaves out this project's editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mc_export", "runtime", "calib")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):  # a copy: setuptools writes build/ next to the sources
        shutil.copy(REPO / name, src / name)
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("metacanvas_deploy-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory, wheel) -> Path:
    """A new virtual environment with the wheel installed, and this one's third-party packages visible."""
    root = tmp_path_factory.mktemp("env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    view = root / "third_party"
    view.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.suffix == ".pth" or entry.name.startswith(("__editable__", "metacanvas_deploy", "_metacanvas")):
            continue
        (view / entry.name).symlink_to(entry)
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    (target / "third_party.pth").write_text(str(view) + "\n")
    return python


def _decoys(tmp_path: Path) -> Path:
    """A user's project whose own packages are named like ours (and fail loudly when imported)."""
    for name in (*PACKAGES, "benchmarks", "metacanvas_deploy_decoy"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the decoy {name} was imported')\n")
    return tmp_path


def _run(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(python), "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_wheel_holds_every_package_under_one_namespace_and_no_benchmarks(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"metacanvas_deploy"}, tops
    shipped = {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    in_tree = {str(Path("metacanvas_deploy") / p.parent.relative_to(REPO))
               for pkg in PACKAGES for p in (REPO / pkg).rglob("__init__.py")}
    assert shipped == in_tree, f"not shipped: {in_tree - shipped}; not in the tree: {shipped - in_tree}"
    assert "metacanvas_deploy/calib/data/prompts.json" in names
    assert not [n for n in names if n.startswith("metacanvas_deploy/benchmarks")]


def test_installed_packages_import_beside_decoys_of_the_same_names(fresh_env, tmp_path, bundles):
    out = _run(fresh_env, f"""
        import metacanvas_deploy.calib.prompts as prompts, metacanvas_deploy.calib.quantize
        import metacanvas_deploy.mc_export.build, metacanvas_deploy.runtime.pipeline as rp
        assert 'site-packages' in rp.__file__, rp.__file__
        assert len(prompts.load_prompts('generation', 'calibration')) > 0
        out = rp.Pipeline.load({str(bundles['sana'])!r})('a fox', num_inference_steps=2)
        print('ok', out.frames.shape)
    """, _decoys(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok (1, ")


def test_the_installed_runtime_needs_no_torch_onnx_or_compiler(fresh_env, tmp_path, bundles):
    """numpy + onnxruntime (+ tokenizers, Pillow, imageio): importing the rest is blocked."""
    out = _run(fresh_env, f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'diffusers', 'onnx', 'onnxscript', 'onnx_ir') \\
                        or name.startswith(('metacanvas_deploy.mc_export', 'metacanvas_deploy.calib')):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        from metacanvas_deploy.runtime.pipeline import Pipeline
        out = Pipeline.load({str(bundles['sana'])!r})('a fox', num_inference_steps=2)
        print('ok', out.frames.shape)
    """, _decoys(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


@pytest.mark.parametrize("script", ["mc-export", "mc-generate", "mc-calib"])
def test_console_scripts_run(fresh_env, tmp_path, script):
    res = subprocess.run([str(fresh_env.parent / script), "--help"], cwd=_decoys(tmp_path), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("usage:")
