"""Triton Python-backend model serving one MetaCanvas engine bundle. `python -m mc_export triton` copies this file as
`<repository>/<model>/1/model.py`, beside `bundle/` (the engine bundle) and `metacanvas_deploy/runtime/` (the
runtime that wrote the repository, so the served code matches the bundle and nothing of ours need be installed).

It runs inside Triton's Python stub and imports only numpy, that runtime and `triton_python_backend_utils`; the
stub's Python environment needs the runtime's dependencies (onnxruntime, tokenizers, pillow, imageio; numpy 1.26
or 2.x). One request is one generation: the whole denoising loop runs here, one engine call per step. Requests
that the dynamic batcher hands over together run concurrently on one shared `Pipeline` (thread-safe).

Model config `parameters` (strings): `threads`: ONNX Runtime intra-op threads per session ("" = the cores divided
by instances x max_batch_size); `low_memory`: "true" to open each stage's engine only while it runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the runtime copied beside this file comes before any installed one

import triton_python_backend_utils as pb_utils

from metacanvas_deploy.runtime.pipeline import Pipeline
from metacanvas_deploy.runtime.serving import INPUTS, error_code, request_kwargs, response_arrays


def _parameters(config: dict) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def _threads(config: dict, given: str) -> int:
    """Intra-op threads per session: as given, or the cores shared among every request this model can run at once
    (instances x max_batch_size), so that a loaded server does not oversubscribe its cores."""
    if given.strip():
        return int(given)
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
    return max(1, (os.cpu_count() or 1) // (instances * max(1, int(config.get("max_batch_size", 1)))))


class TritonPythonModel:
    """One model instance: a verified `Pipeline` over `bundle/` and a pool that runs a batch's requests."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        if args.get("model_instance_kind") == "GPU":  # each instance is its own process: pin it to its GPU
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
        # Pipeline.load verifies the bundle as the command line does: manifest schema, every file's size and
        # sha256, backend versions, paths. A bundle that fails is a model that does not load, with the reason.
        self.pipe = Pipeline.load(HERE / "bundle", threads=_threads(config, params.get("threads", "")),
                                  low_memory=params.get("low_memory", "false").lower() == "true")
        self.max_video_frames = self.pipe.manifest.ranges["num_frames"][1]
        self.pool = ThreadPoolExecutor(max(1, int(config.get("max_batch_size", 1))),
                                       thread_name_prefix=f"{args['model_name']}-generate")

    def execute(self, requests: list) -> list:
        """One response per request, in order; a request that fails gets its error, the others their frames."""
        tensors = [{w.name: _input(r, w.name) for w in INPUTS} for r in requests]
        futures = [self.pool.submit(self._generate, t) for t in tensors]
        return [_response(f.result(), self.pipe.bundle.path) for f in futures]

    def _generate(self, tensors: dict):
        """The response arrays of one request, or the exception it raised (reported, never re-raised)."""
        try:
            with tempfile.TemporaryDirectory(prefix="metacanvas-request-") as scratch:
                kwargs = request_kwargs(tensors.get, Path(scratch), self.max_video_frames)
                return response_arrays(self.pipe(**kwargs))
        except Exception as e:  # noqa: BLE001  every failure becomes that request's error response
            if error_code(e) == "INTERNAL":
                pb_utils.Logger.log_error("".join(traceback.format_exception(e)))
            return e

    def finalize(self) -> None:
        self.pool.shutdown(wait=True)


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _response(result, bundle: Path):
    if isinstance(result, Exception):
        message = str(result) if _ours(result) else \
            f"internal error ({type(result).__name__}: {result}); the server log has the traceback"
        message = message.replace(str(bundle), "BUNDLE")  # a rebuild hint names the bundle, not the server's disk
        code = getattr(pb_utils.TritonError, error_code(result))
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in result.items()])


def _ours(error: Exception) -> bool:
    return type(error).__module__.startswith("metacanvas_deploy.")
