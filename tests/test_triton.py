"""A model repository from `python -m mc_export triton`, served by a real Triton Inference Server: tritonserver 2.51
from nvidia-pytriton 0.7.0 (CPU, Python backend) in .venv-triton (scripts/bootstrap_triton.sh, run here if the
environment is missing or stale). The server is started by the fixture on 127.0.0.1 (free ports), waited for with a
deadline, and stopped by its finalizer (the whole process group, SIGKILL if SIGTERM is not enough). Clients are
tritonclient over HTTP and gRPC, run with .venv-triton's Python (tests/triton_client.py): tritonclient's protobuf
pin would downgrade the compiler's, so it is not installed in .venv.

Skips only for a stated platform cause: not Linux x86_64, a Python version the wheel has no backend stub for, an
interpreter without a shared libpython (the stub embeds it), or a binary the system's loader refuses (an older
glibc, a missing system library: the log line is the reason). Anything else is a failure with the server log."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metacanvas_deploy.mc_export.triton_repo import TritonConfig, write_repository
from metacanvas_deploy.runtime import serving
from metacanvas_deploy.runtime.media import read_image, read_video, synthetic_image, synthetic_media

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-triton"
PYTHON = VENV / "bin" / "python"
CLIENT = Path(__file__).with_name("triton_client.py")
READY_DEADLINE_S = 90
STUB_PYTHONS = ("3.10", "3.11", "3.12")  # nvidia-pytriton 0.7.0 ships Python backend stubs for these
PLATFORM_FAILURES = ("error while loading shared libraries", "version `GLIBC", "version `GLIBCXX")


def _platform_cause() -> str | None:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"nvidia-pytriton's tritonserver is built for Linux x86_64; this is {sys.platform} {platform.machine()}"
    version = "{}.{}".format(*sys.version_info[:2])
    if version not in STUB_PYTHONS:
        return f"nvidia-pytriton 0.7.0 has no Python backend stub for Python {version} (it has {STUB_PYTHONS})"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return "this Python has no shared libpython (built without --enable-shared); the backend stub embeds it"
    return None


@pytest.fixture(scope="session")
def triton_env() -> Path:
    """.venv-triton, made or brought up to date by scripts/bootstrap_triton.sh (quick when it is current)."""
    cause = _platform_cause()
    if cause:
        pytest.skip(cause)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap_triton.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, f"scripts/bootstrap_triton.sh failed:\n{done.stderr[-3000:]}"
    return VENV


def _client(*args: str, timeout: float = 180) -> str:
    done = subprocess.run([str(PYTHON), str(CLIENT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"triton_client.py {args[0]} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A tritonserver process on 127.0.0.1 serving ``repo``; `stop` ends its process group."""

    def __init__(self, repo: Path, log: Path):
        self.repo, self.log = repo, log
        self.http, self.grpc = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
        args = ["--model-repository", str(repo), "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
                "--http-port", self.http.split(":")[1], "--grpc-port", self.grpc.split(":")[1],
                "--allow-metrics", "false", "--exit-on-error", "false", "--strict-readiness", "false",
                "--exit-timeout-secs", "5"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "tritonserver.sh"), *args], cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.http}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://{self.http}{path}", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()

    def wait_ready(self, model: str) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                cause = next((line for line in self.log_tail().splitlines() if any(
                    m in line for m in PLATFORM_FAILURES)), None)
                if cause:  # the binary cannot run here (an older glibc, a missing system library)
                    pytest.skip(f"tritonserver cannot start on this platform: {cause.strip()}")
                pytest.fail(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get(f"/v2/models/{model}/ready")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.25)
        pytest.fail(f"model {model} not ready after {READY_DEADLINE_S} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break


@pytest.fixture(scope="module")
def served(triton_env, bundles, tmp_path_factory):
    """One server: `wan` (the tiny Wan bundle, 1 thread per session, batches of 4), `corrupt` (the same bundle
    with one engine byte changed after the repository was written) and `lazy` (low-memory mode)."""
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    write_repository(TritonConfig(bundles=(bundles["wan"],) * 3, names=("wan", "corrupt", "lazy"), out=repo,
                                  threads=1, max_batch_size=4), log=lambda *a: None)
    config = repo / "lazy" / "config.pbtxt"  # opens each engine when a request needs it, checking its hash again
    config.write_text(config.read_text().replace('string_value: "false"', 'string_value: "true"'))
    _flip_last_byte(repo / "corrupt" / "1" / "bundle" / "denoise.onnx")
    server = Server(repo, root / "tritonserver.log")
    try:
        server.wait_ready("wan")
        server.wait_ready("lazy")
        yield server
    finally:
        server.stop()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Encoded inputs as a client holds them: PNG images, a GIF video, a file that is not an image."""
    root = tmp_path_factory.mktemp("media")
    files = {}
    for name, seed, size in (("image", 1, (128, 128)), ("ref0", 2, (96, 64)), ("ref1", 3, (64, 128))):
        Image.fromarray(synthetic_image(*size, seed)).save(root / f"{name}.png")
        files[name] = root / f"{name}.png"
    frames = [Image.fromarray(f) for f in synthetic_media("v2v", 64, 64, 5, seed=4)["video"]]
    frames[0].save(root / "video.gif", save_all=True, append_images=frames[1:], duration=62, loop=0)
    files["video"] = root / "video.gif"
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image follows")
    files["bad"] = root / "bad.png"
    return files


def _job(server: Server, requests: list[dict], concurrency: int, tmp: Path, model: str = "wan") -> dict:
    """Send ``requests`` (`concurrency` at a time); returns id -> result, with "frames" for the ones that worked."""
    job = {"http": server.http, "grpc": server.grpc, "model": model, "concurrency": concurrency, "timeout_s": 120,
           "requests": requests}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "job.json").write_text(json.dumps(job))
    _client("run", str(tmp / "job.json"), str(tmp / "out"))
    results = json.loads((tmp / "out" / "results.json").read_text())
    for rid, result in results.items():
        if result["ok"]:
            result["frames"] = np.load(tmp / "out" / f"{rid}.npy")
    return results


def _wire(kwargs: dict, media: dict[str, Path]) -> dict:
    """Pipeline keyword arguments -> the job's input specs (media given by their file names in ``media``)."""
    types = {w.name: w.data_type for w in serving.INPUTS}
    client_type = {"TYPE_STRING": "BYTES", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP32": "FP32"}
    out = {}
    for name, value in kwargs.items():
        spec = {"type": client_type[types[name]]}
        if name in ("image", "video"):
            spec["files"] = [str(media[value])]
        elif name == "reference_images":
            spec["files"] = [str(media[v]) for v in value]
        elif isinstance(value, str):
            spec["text"] = value
        else:
            spec["value"] = value
        out[name] = spec
    return out


REQUESTS = [  # id, protocol, Pipeline arguments (media by name)
    ("t2v_http", "http", {"prompt": "a red fox running through snow", "seed": 0}),
    ("t2v_grpc", "grpc", {"prompt": "a red fox running through snow", "seed": 0}),
    ("t2v_small", "grpc", {"prompt": "a boat", "seed": 5, "height": 64, "width": 96, "num_frames": 5,
                           "num_inference_steps": 2}),
    ("no_cfg", "http", {"prompt": "a boat", "negative_prompt": "blurry", "seed": 6, "guidance_scale": 1.0,
                        "num_frames": 1}),
    ("i2v", "grpc", {"prompt": "the fox turns its head", "image": "image", "seed": 1, "num_frames": 5}),
    ("r2v", "http", {"prompt": "two friends", "reference_images": ["ref0", "ref1"], "seed": 2, "num_frames": 5}),
    ("v2v", "grpc", {"prompt": "make it snow", "video": "video", "height": 64, "width": 64, "num_frames": 5,
                     "seed": 3}),
    ("seed_big", "http", {"prompt": "a red fox running through snow", "seed": 2**63 - 1, "num_frames": 1}),
]


def test_frames_equal_the_pipelines_over_http_and_grpc_concurrently(served, media, bundles, tmp_path):
    """Eight requests in flight at once (batches of four in one instance): every task, two sizes, CFG on and off;
    the frames are the Pipeline's for the same arguments, bit for bit (the server runs numpy 1.26, this process
    numpy 2.x)."""
    from metacanvas_deploy.runtime.pipeline import Pipeline

    requests = [{"id": rid, "protocol": proto, "inputs": _wire(kw, media)} for rid, proto, kw in REQUESTS]
    results = _job(served, requests, concurrency=len(requests), tmp=tmp_path)
    pipe = Pipeline.load(bundles["wan"], threads=1)
    readers = {"image": read_image, "video": read_video}
    for rid, _, kwargs in REQUESTS:
        result = results[rid]
        assert result["ok"], f"{rid}: {result['error']}"
        local = {k: ([read_image(media[r]) for r in v] if k == "reference_images" else
                     readers[k](media[v]) if k in readers else v) for k, v in kwargs.items()}
        expected = pipe(**local).frames
        np.testing.assert_array_equal(result["frames"], expected, err_msg=rid)
        assert result["timings"]["total"] > 0 and "denoise" in result["timings"]


BAD = [  # id, protocol, inputs, what the error says
    ("empty_prompt", "http", {"prompt": {"type": "BYTES", "text": "   "}}, "prompt must be a non-empty string"),
    ("long_prompt", "grpc", {"prompt": {"type": "BYTES", "text": "x" * 100_001}},
     "prompt has 100001 characters; at most 100000 are accepted"),
    ("too_many_tokens", "http", {"prompt": {"type": "BYTES", "text": "fox " * 2000}}, "this build accepts at most"),
    ("not_utf8", "grpc", {"prompt": {"type": "BYTES", "raw": ["fffe00"]}}, "input `prompt` is not UTF-8 text"),
    ("height", "http", {"prompt": {"type": "BYTES", "text": "x"}, "height": {"type": "INT32", "value": 4096}},
     "height 4096 is outside this bundle's 64..256"),
    ("frames", "grpc", {"prompt": {"type": "BYTES", "text": "x"}, "num_frames": {"type": "INT32", "value": 6}},
     "num_frames"),
    ("steps", "http", {"prompt": {"type": "BYTES", "text": "x"}, "num_inference_steps": {"type": "INT32",
                                                                                         "value": 0}},
     "num_inference_steps must be in 1..1000, got 0"),
    ("seed", "grpc", {"prompt": {"type": "BYTES", "text": "x"}, "seed": {"type": "INT64", "value": -1}},
     "seed must be in 0..9223372036854775807, got -1"),
    ("guidance", "http", {"prompt": {"type": "BYTES", "text": "x"}, "guidance_scale": {"type": "FP32",
                                                                                      "value": float("nan")}},
     "guidance_scale must be a finite number"),
    ("steps_as_float", "grpc", {"prompt": {"type": "BYTES", "text": "x"}, "num_inference_steps": {"type": "FP32",
                                                                                                 "value": 2.5}},
     "inference input 'num_inference_steps' data-type is 'FP32', but model 'wan' expects 'INT32'"),
    ("prompt_as_int", "http", {"prompt": {"type": "INT32", "value": 7}},
     "inference input 'prompt' data-type is 'INT32', but model 'wan' expects 'BYTES'"),
    ("bad_image", "grpc", {"prompt": {"type": "BYTES", "text": "x"}, "image": {"type": "BYTES", "files": ["bad"]}},
     "cannot read image input `image`: cannot identify image file"),
    ("two_in_one", "http", {"prompt": {"type": "BYTES", "texts": ["a", "b"], "shape": [2, 1]}},
     "input `prompt` has shape [2, 1]; expected [1, 1] (batch size 1"),
    ("no_prompt", "grpc", {"seed": {"type": "INT64", "value": 1}}, "prompt"),
    ("task", "http", {"prompt": {"type": "BYTES", "text": "x"}, "task": {"type": "BYTES", "text": "t2i"}},
     "task 't2i' is not in this bundle; it serves t2v, i2v, v2v, r2v"),
]


def test_bad_input_is_a_clear_triton_error_and_the_server_keeps_serving(served, media, tmp_path):
    """Each bad request, sent together with good ones (so they share batches), gets its own error (HTTP 400 /
    gRPC INVALID_ARGUMENT, the runtime's message); the good ones their frames; the server serves on."""
    requests = []
    for rid, proto, inputs, _ in BAD:
        for spec in inputs.values():
            if "files" in spec:
                spec["files"] = [str(media[f]) for f in spec["files"]]
        requests.append({"id": rid, "protocol": proto, "inputs": inputs})
    good = {"prompt": {"type": "BYTES", "text": "a fox"}, "num_frames": {"type": "INT32", "value": 1}}
    requests += [{"id": f"good{i}", "protocol": "http" if i % 2 else "grpc", "inputs": good} for i in range(3)]
    results = _job(served, requests, concurrency=6, tmp=tmp_path)
    for rid, proto, _, message in BAD:
        result = results[rid]
        assert not result["ok"], f"{rid} was served"
        assert message in result["error"], f"{rid}: {result['error']}"
        assert result["status"] == ("400" if proto == "http" else "StatusCode.INVALID_ARGUMENT"), (rid, result)
    assert all(results[f"good{i}"]["ok"] for i in range(3))
    assert served.proc.poll() is None
    again = _job(served, [{"id": "after", "protocol": "grpc", "inputs": good}], concurrency=1, tmp=tmp_path / "2")
    assert again["after"]["ok"]


def test_a_changed_bundle_is_refused_at_load_and_named(served):
    """The copy whose engine changed after it was written does not load (sha256 checked as Pipeline.load
    does); the server says why and serves the other model."""
    status, _ = served.get("/v2/models/corrupt/ready")
    assert status != 200
    _, body = served.post("/v2/repository/index")
    state = {m["name"]: m for m in json.loads(body)}
    assert state["corrupt"]["state"] == "UNAVAILABLE" and "denoise.onnx" in state["corrupt"]["reason"]
    assert "sha256" in state["corrupt"]["reason"] and state["wan"]["state"] == "READY"


def test_an_engine_changed_while_serving_is_an_internal_error_and_the_server_serves_on(served, tmp_path):
    """Low-memory mode re-checks each engine's sha256 when a request opens it: an engine changed on disk after
    the load fails that request with INTERNAL (HTTP 500 / gRPC INTERNAL), the message naming the file and the
    traceback in the server log; the other models serve on."""
    prompt = {"prompt": {"type": "BYTES", "text": "a fox"}, "num_frames": {"type": "INT32", "value": 1}}
    assert _job(served, [{"id": "before", "inputs": prompt}], 1, tmp_path / "1", model="lazy")["before"]["ok"]
    _flip_last_byte(served.repo / "lazy" / "1" / "bundle" / "denoise.onnx")
    results = _job(served, [{"id": "http", "protocol": "http", "inputs": prompt},
                            {"id": "grpc", "protocol": "grpc", "inputs": prompt}], 2, tmp_path / "2", model="lazy")
    assert results["http"]["status"] == "500" and results["grpc"]["status"] == "StatusCode.INTERNAL"
    for result in results.values():
        assert "denoise.onnx" in result["error"] and "sha256" in result["error"], result
        assert str(served.repo) not in result["error"]  # the server's paths stay in its log
    assert "BundleIntegrityError" in served.log_tail() and "Traceback" in served.log_tail()
    assert _job(served, [{"id": "wan", "inputs": prompt}], 1, tmp_path / "3")["wan"]["ok"]


def test_every_config_parses_with_tritons_model_config_schema(triton_env, bundles, tmp_path):
    """Every variant of config.pbtxt, parsed by protobuf text_format into tritonclient's ModelConfig: the inputs
    and outputs are `runtime.serving`'s, with the options asked for."""
    variants = {"default": {}, "wide": {"instances": 2, "max_batch_size": 1, "threads": 2, "low_memory": True,
                                        "warmup": False, "queue_delay_us": 0}}
    files = []
    for name, options in variants.items():
        write_repository(TritonConfig(bundles=(bundles["wan"],), out=tmp_path / name, **options),
                         log=lambda *a: None)
        files.append(str(tmp_path / name / "wan" / "config.pbtxt"))
    parsed = json.loads(_client("configs", *files))
    default, wide = parsed[files[0]], parsed[files[1]]
    for config in (default, wide):
        assert config["backend"] == "python" and config["dynamic_batching"]
        assert config["inputs"] == {w.name: [w.data_type, list(w.dims), w.optional] for w in serving.INPUTS}
        assert config["outputs"] == {w.name: [w.data_type, list(w.dims)] for w in serving.OUTPUTS}
    assert default["instance_group"] == [[1, "KIND_CPU"]] and default["max_batch_size"] == 4
    assert default["warmup"] == [sorted(["prompt", "task", "num_inference_steps"])]
    assert default["parameters"] == {"threads": "", "low_memory": "false"}
    assert wide["instance_group"] == [[2, "KIND_CPU"]] and wide["max_batch_size"] == 1 and wide["warmup"] == []
    assert wide["parameters"] == {"threads": "2", "low_memory": "true"}


NUMPY_1_RUN = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])  # the model's version folder: its copy of the runtime, as model.py imports it
from metacanvas_deploy.runtime.media import synthetic_media
from metacanvas_deploy.runtime.pipeline import Pipeline
pipe = Pipeline.load(sys.argv[2], threads=1)
d, task = pipe.manifest.defaults, pipe.manifest.tasks[0]
media = synthetic_media(task, d["height"], d["width"], d["num_frames"], seed=1)
np.save(sys.argv[3], pipe("a red fox running through snow", seed=4, **media).frames)
print(np.__version__)
"""


@pytest.mark.parametrize("backbone", ["wan", "flux", "sana"])
def test_the_served_runtime_gives_the_same_frames_under_numpy_1_26(triton_env, bundles, backbone, tmp_path):
    """The runtime copied into a repository, run by the server's environment (numpy 1.26), against this
    process's (numpy 2.x): every backbone's frames bit-identical."""
    from metacanvas_deploy.runtime.pipeline import Pipeline

    repo = tmp_path / "repo"
    write_repository(TritonConfig(bundles=(bundles[backbone],), out=repo, warmup=False), log=lambda *a: None)
    version = repo / Path(bundles[backbone]).name / "1"
    done = subprocess.run([str(PYTHON), "-c", NUMPY_1_RUN, str(version), str(version / "bundle"),
                           str(tmp_path / "frames.npy")], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith("1.26.") and np.__version__.startswith("2.")
    pipe = Pipeline.load(bundles[backbone], threads=1)
    d, task = pipe.manifest.defaults, pipe.manifest.tasks[0]
    media = synthetic_media(task, d["height"], d["width"], d["num_frames"], seed=1)
    expected = pipe("a red fox running through snow", seed=4, **media).frames
    np.testing.assert_array_equal(np.load(tmp_path / "frames.npy"), expected)
