"""Suite-wide settings. Tiny models run on one thread: on a 2-core CI box two oneDNN threads contend with
ONNX Runtime's own pool and make tiny kernels 10-40x slower, with no effect on results."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch
except ImportError:  # the runtime-only tests run without torch
    torch = None
else:
    torch.set_num_threads(1)


import pytest  # noqa: E402


class _Bundles(dict):
    """Tiny bundles (`mc_export build --backbone B`, the default preset: seed 0, random canvas layers, 3-step
    plan) built on first use and shared by every test file in the session: each stage export takes tens of
    seconds, so no test exports what a bundle already holds."""

    STEPS = 3

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, backbone: str):
        from metacanvas_deploy.mc_export.build import BuildConfig, build

        self[backbone] = build(BuildConfig(out=self.root / backbone, backbone=backbone, steps=self.STEPS),
                               log=lambda *a: None)
        return self[backbone]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """backbone -> path of its tiny bundle (built lazily, once per session)."""
    return _Bundles(tmp_path_factory.mktemp("bundles"))
