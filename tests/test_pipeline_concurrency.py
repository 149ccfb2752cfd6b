"""One Pipeline, many threads: concurrent requests of mixed tasks, sizes and seeds give exactly the sequential
results (ordinary and low-memory mode); a low-memory engine file changed after load is refused on reopen; the
observation hook sees exactly one request's calls and nothing after its block; a substituted engine serves only
the request that asked for it. Runtime only (the tiny bundles of tests/conftest.py)."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from metacanvas_deploy.runtime.backbones import BACKBONES, backbone_module
from metacanvas_deploy.runtime.engine import OnDemandEngine
from metacanvas_deploy.runtime.errors import BundleError, BundleIntegrityError, RuntimeInputError
from metacanvas_deploy.runtime.media import synthetic_media
from metacanvas_deploy.runtime.pipeline import Pipeline

# (task, height, width, num_frames, seed, guidance): every Wan task, three sizes, distinct seeds, one without CFG
WAN_REQUESTS = [("t2v", 64, 64, 5, 0, None), ("i2v", 96, 64, 9, 1, None), ("v2v", 64, 96, 5, 2, None),
                ("t2v", 96, 96, 9, 3, None), ("i2v", 64, 64, 5, 4, None), ("v2v", 96, 64, 9, 5, None),
                ("r2v", 64, 64, 5, 6, None), ("t2v", 64, 64, 5, 7, 1.0)]
STEPS = 2


def _generate(pipe: Pipeline, spec, **kw):
    task, h, w, f, seed, guidance = spec
    return pipe("a fox in the snow", task=task, height=h, width=w, num_frames=f, seed=seed, guidance_scale=guidance,
                num_inference_steps=STEPS, **synthetic_media(task, h, w, f, seed), **kw)


def _concurrently(pipe: Pipeline, specs) -> list:
    """Every request on its own thread; an observer holds each at the planner until all are in flight, so they
    overlap for certain from the backbone's preparation to the decoder."""
    barrier = threading.Barrier(len(specs))
    with pipe.observe("planner", lambda feeds, outputs: barrier.wait(timeout=120)):
        with ThreadPoolExecutor(len(specs)) as pool:
            return list(pool.map(lambda s: _generate(pipe, s), specs))


def _assert_same(got, want, spec) -> None:
    for name in ("frames", "latents", "prompt_embeds"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), f"{spec}: {name} differs"
    assert got.calls == want.calls and got.calls["denoise"] == STEPS, spec


@pytest.mark.parametrize("low_memory", [False, True], ids=["resident", "low_memory"])
def test_concurrent_requests_equal_sequential_ones(bundles, low_memory):
    pipe = Pipeline.load(bundles["wan"], threads=1, low_memory=low_memory)
    sequential = [_generate(pipe, s) for s in WAN_REQUESTS]
    concurrent = _concurrently(pipe, WAN_REQUESTS)
    for spec, got, want in zip(WAN_REQUESTS, concurrent, sequential):
        _assert_same(got, want, spec)
    if low_memory:
        assert not any(e.loaded for e in pipe.engines.values()), "every engine is freed after the last request"


def test_a_low_memory_engine_file_changed_after_load_is_refused_on_reopen(bundles, tmp_path):
    bundle = tmp_path / "sana"
    shutil.copytree(bundles["sana"], bundle)
    pipe = Pipeline.load(bundle, threads=1, low_memory=True)
    pipe("a fox", num_inference_steps=1)  # opens and frees every engine
    data = bytearray((bundle / "denoise.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    (bundle / "denoise.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="engine `denoise`: denoise.onnx no longer hash"):
        pipe("a fox", num_inference_steps=1)
    assert not any(e.loaded for e in pipe.engines.values()), "a failed request releases what it held"
    (bundle / "denoise.onnx").write_bytes(bytes(data) + b"\0")
    with pytest.raises(BundleIntegrityError, match="is .* bytes, the manifest says"):
        pipe("a fox", num_inference_steps=1)


def test_release_from_another_thread_waits_for_the_users(bundles):
    pipe = Pipeline.load(bundles["sana"], threads=1)
    feeds = {}
    with pipe.observe("denoise", lambda f, o: feeds.setdefault("step", dict(f))):
        pipe("a fox", num_inference_steps=1)
    engine = OnDemandEngine(pipe.bundle.engine_path("denoise"), pipe.manifest.engines["denoise"], threads=1)
    want = pipe.engines["denoise"](feeds["step"])["next_sample"]
    with engine.hold():
        threading.Thread(target=engine.release).start()  # another request is done with the stage
        assert engine.loaded
        assert np.array_equal(engine(feeds["step"])["next_sample"], want)
    assert not engine.loaded, "freed when the last user leaves"
    assert np.array_equal(engine(feeds["step"])["next_sample"], want) and engine.loaded  # reopened on use


def test_observe_sees_exactly_the_calls_of_its_block(bundles):
    pipe = Pipeline.load(bundles["wan"], threads=1)
    seen = []
    with pipe.observe("denoise", lambda feeds, outputs: seen.append((feeds, outputs))):
        out = _generate(pipe, WAN_REQUESTS[0])
    assert len(seen) == STEPS == out.calls["denoise"]
    assert np.array_equal(seen[0][0]["sample"], np.random.default_rng(0).standard_normal(
        seen[0][0]["sample"].shape, dtype=np.float32))  # step 0 starts from the request's seeded noise
    assert np.array_equal(seen[1][0]["sample"], seen[0][1]["next_sample"])
    assert np.array_equal(seen[-1][1]["next_sample"], out.latents)  # t2v: the last step's output is the result
    _generate(pipe, WAN_REQUESTS[1])
    assert len(seen) == STEPS, "nothing after the block exits"
    with pytest.raises(RuntimeInputError, match="no stage 'denoiser'"):
        pipe.observe("denoiser", print)


def test_a_substituted_engine_serves_only_its_own_request(bundles):
    pipe = Pipeline.load(bundles["wan"], threads=1)
    real = pipe.engines["denoise"]
    calls = []

    def spy(feeds):
        calls.append(threading.get_ident())
        return real(feeds)

    specs = WAN_REQUESTS[:2]
    want = [_generate(pipe, s) for s in specs]
    with ThreadPoolExecutor(2) as pool:
        got = [pool.submit(_generate, pipe, specs[0], engines={"denoise": spy}), pool.submit(_generate, pipe, specs[1])]
        got = [g.result() for g in got]
    assert len(calls) == STEPS and pipe.engines["denoise"] is real
    for spec, g, w in zip(specs, got, want):
        _assert_same(g, w, spec)
    with pytest.raises(TypeError):
        pipe.engines["denoise"] = spy  # read-only: swap per request with engines=
    with pytest.raises(RuntimeInputError, match="no stage 'nope'"):
        _generate(pipe, specs[0], engines={"nope": spy})


def test_backbones_are_a_registry_and_an_unknown_one_is_a_bundle_error():
    assert set(BACKBONES) == {"wan", "flux", "sana"}
    assert backbone_module("wan").__name__.endswith("backbones.wan")
    with pytest.raises(BundleError, match="'hunyuan', which this runtime does not serve"):
        backbone_module("hunyuan")
