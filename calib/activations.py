"""A float graph's intermediate activations, fetched within a memory budget.

Calibration, sensitivity and SmoothQuant read the input and output of every quantizable layer. Fetched in one
run, a full-size call's activations dwarf the model: Wan2.2-5B at 704x1280x121 has about 27k tokens, so one
(2, 27k, 3072) fp32 tensor is 670 MB and the denoise graph has a few hundred of them. `Exposer` fetches them
in chunks of at most ``budget`` bytes: one run per new input-shape signature returns only every tensor's
shape (a ``Shape`` node each, a few bytes), then each chunk is a run that returns only its tensors while ONNX
Runtime frees the rest as usual. The values are the same whatever the budget: the graph runs unoptimised, so
every chunk's run computes the same tensors in the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

_ITEMSIZE = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(double)": 8,
             "tensor(int32)": 4, "tensor(int64)": 8}


def activation_budget() -> int:
    """Bytes of activations one chunk may hold: a quarter of the memory available now (floor 64 MiB)."""
    from mc_export.models.lazy import memory_budget

    return max(64 << 20, memory_budget() // 2)


def plan_chunks(sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Group tensors, in order, into runs of at most ``budget`` bytes (a tensor larger than the budget runs
    alone)."""
    chunks: list[list[str]] = []
    total = budget + 1
    for name, size in sizes.items():
        if total + size > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(name)
        total += size
    return chunks


class Exposer:
    """``expose(feeds)`` yields every one of ``tensors`` of the graph at ``model_path``, in chunked runs.

    The session's graph (the original plus the extra outputs) is written beside ``model_path``, so that
    external weight files resolve and the weights are held once, by ONNX Runtime."""

    def __init__(self, model_path: Path, tensors: list[str], budget: int | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.tensors = list(dict.fromkeys(tensors))
        self.budget = activation_budget() if budget is None else budget
        self._shapes = [f"{t}::shape" for t in self.tensors]
        model = onnx.load(str(model_path), load_external_data=False)
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in self.tensors if t not in have)
        model.graph.node.extend(helper.make_node("Shape", [t], [s], name=s)
                                for t, s in zip(self.tensors, self._shapes))
        model.graph.output.extend(helper.make_tensor_value_info(s, onnx.TensorProto.INT64, [None])
                                  for s in self._shapes)
        path = Path(model_path).with_name(Path(model_path).stem + ".expose.onnx")
        onnx.save(model, str(path))
        del model
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor must survive
        if threads:
            so.intra_op_num_threads = threads
        self._sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        path.unlink()
        self._inputs = [i.name for i in self._sess.get_inputs()]
        types = {o.name: o.type for o in self._sess.get_outputs()}
        self._itemsize = {t: _ITEMSIZE.get(types[t], 8) for t in self.tensors}
        self._plans: dict[tuple, list[list[str]]] = {}
        self.runs = 0  # graph runs so far, the shape runs included

    def sizes(self, feeds: dict) -> dict[str, int]:
        """Each tensor's bytes for these feeds: one run that returns only the shapes."""
        shapes = self._run(self._shapes, feeds)
        return {t: int(np.prod(s)) * self._itemsize[t] for t, s in zip(self.tensors, shapes)}

    def __call__(self, feeds: dict) -> Iterator[tuple[str, np.ndarray]]:
        """(tensor, value) pairs, a chunk's run at a time. Pairs, not chunks, so that a consumer's loop variable
        keeps one tensor alive during the next run, not a whole chunk."""
        key = tuple((n, np.shape(feeds[n])) for n in self._inputs)
        if key not in self._plans:
            self._plans[key] = plan_chunks(self.sizes(feeds), self.budget)
        for chunk in self._plans[key]:
            values = self._run(chunk, feeds)
            for i, name in enumerate(chunk):
                value, values[i] = values[i], None  # ours dropped: the consumer's is the last reference
                yield name, value

    def _run(self, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        self.runs += 1
        return self._sess.run(outputs, {n: feeds[n] for n in self._inputs})
