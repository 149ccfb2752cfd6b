"""The client side of tests/test_triton.py, run with .venv-triton's Python (tritonclient pins a protobuf older than
the compiler's, so it is not installed in .venv). Three commands, JSON in and out:

    triton_client.py configs FILE...        parse each config.pbtxt with Triton's own ModelConfig schema
    triton_client.py run JOB.json OUT_DIR   send the job's requests (HTTP or gRPC, `concurrency` at a time);
                                            OUT_DIR/<id>.npy holds each request's frames, results.json the rest
    triton_client.py load JOB.json          throughput: `concurrency` clients send the job's first request for
                                            `duration_s`; prints requests/s and latency percentiles

A request's `inputs` map a wire name to {"type": "BYTES", "text": str | "texts": [...] | "files": [...] |
"raw": [hex...]} or {"type": "INT32"/"INT64"/"FP32", "value": number}; "shape" overrides [1, n].
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

NUMPY = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


def _values(spec: dict) -> list:
    if "text" in spec:
        return [spec["text"].encode("utf-8")]
    if "texts" in spec:
        return [t.encode("utf-8") for t in spec["texts"]]
    if "files" in spec:
        return [Path(f).read_bytes() for f in spec["files"]]
    if "raw" in spec:
        return [bytes.fromhex(h) for h in spec["raw"]]
    return [spec["value"]]


def _inputs(module, spec: dict) -> list:
    out = []
    for name, s in spec.items():
        values = _values(s)
        array = np.array(values, dtype=NUMPY[s["type"]]).reshape(s.get("shape", [1, len(values)]))
        tensor = module.InferInput(name, list(array.shape), s["type"])
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _client(job: dict, protocol: str):
    timeout = float(job.get("timeout_s", 60))
    if protocol == "http":
        import tritonclient.http as module

        client = module.InferenceServerClient(job["http"], connection_timeout=timeout, network_timeout=timeout)
    else:
        import tritonclient.grpc as module

        client = module.InferenceServerClient(job["grpc"])
    return module, client


def _send(job: dict, request: dict) -> tuple[dict, np.ndarray | None]:
    """One request on a fresh client (clients are not shared across threads): its result and frames."""
    from tritonclient.utils import InferenceServerException

    protocol = request.get("protocol", "http")
    module, client = _client(job, protocol)
    outputs = [module.InferRequestedOutput(n) for n in ("frames", "timings")]
    start = time.perf_counter()
    try:
        kwargs = {"client_timeout": float(job.get("timeout_s", 60))} if protocol == "grpc" else {}
        result = client.infer(job["model"], _inputs(module, request["inputs"]), outputs=outputs, **kwargs)
    except InferenceServerException as e:
        return {"ok": False, "error": e.message(), "status": str(e.status()),
                "latency_s": time.perf_counter() - start}, None
    finally:
        client.close()
    timings = json.loads(result.as_numpy("timings")[0, 0])
    frames = result.as_numpy("frames")
    return {"ok": True, "timings": timings, "shape": list(frames.shape),
            "latency_s": time.perf_counter() - start}, frames[0]


def run(job_file: str, out_dir: str) -> None:
    job, out = json.loads(Path(job_file).read_text()), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(int(job.get("concurrency", 1))) as pool:
        sent = [(r["id"], pool.submit(_send, job, r)) for r in job["requests"]]
        results = {}
        for rid, future in sent:
            results[rid], frames = future.result()
            if frames is not None:
                np.save(out / f"{rid}.npy", frames)
    (out / "results.json").write_text(json.dumps(results, indent=1))


def load(job_file: str) -> None:
    """Closed-loop load: `concurrency` workers, each sending the first request again until `duration_s` is up."""
    job = json.loads(Path(job_file).read_text())
    request, duration = job["requests"][0], float(job["duration_s"])
    deadline = time.perf_counter() + duration

    def worker(_):
        latencies = []
        while time.perf_counter() < deadline:
            result, _frames = _send(job, request)
            if not result["ok"]:
                raise RuntimeError(result["error"])
            latencies.append(result["latency_s"])
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(int(job["concurrency"])) as pool:
        latencies = sorted(x for xs in pool.map(worker, range(int(job["concurrency"]))) for x in xs)
    elapsed = time.perf_counter() - start
    print(json.dumps({"requests": len(latencies), "seconds": round(elapsed, 2),
                      "requests_per_s": round(len(latencies) / elapsed, 2),
                      "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
                      "latency_p90_ms": round(1000 * latencies[int(len(latencies) * 0.9)], 1)}))


def configs(files: list[str]) -> None:
    """Each file parsed as Triton's ModelConfig (unknown fields and type errors raise): a summary per file."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    summary = {}
    for f in files:
        config = text_format.Parse(Path(f).read_text(), model_config_pb2.ModelConfig())
        summary[f] = {
            "name": config.name, "backend": config.backend, "max_batch_size": config.max_batch_size,
            "inputs": {i.name: [model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional]
                       for i in config.input},
            "outputs": {o.name: [model_config_pb2.DataType.Name(o.data_type), list(o.dims)] for o in config.output},
            "dynamic_batching": config.HasField("dynamic_batching"),
            "instance_group": [[g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)]
                               for g in config.instance_group],
            "warmup": [sorted(w.inputs) for w in config.model_warmup],
            "parameters": {k: v.string_value for k, v in config.parameters.items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"run": run, "load": load, "configs": lambda *files: configs(list(files))}[command](*args)
