"""A float graph's intermediate activations, fetched within a memory budget.

Calibration, sensitivity and SmoothQuant read the input and output of every quantizable layer. Fetched in one
run, a full-size call's activations dwarf the model: Wan2.2-5B at 704x1280x121 has about 27k tokens, so one
(2, 27k, 3072) fp32 tensor is 670 MB and the denoise graph has a few hundred of them.

ONNX Runtime keeps every graph output of a run alive until the run ends, fetched or not (measured: fetching
one of 24 exposed 32 MB tensors peaks as high as fetching all 24). So `Exposer` splits the tensors into chunks
of at most ``budget`` bytes and gives each chunk its own session, whose only outputs are that chunk, run over
every call before the next chunk's session is made; one session exists at a time, so the weights are held
once. A first session that outputs only each tensor's shape (a ``Shape`` node each) sizes them, once per
distinct input shape. Each tensor sees the calls in the same order whatever the chunking, and the graph runs
unoptimised, so what a consumer accumulates per tensor does not depend on the budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from metacanvas_deploy.runtime.memory import available_bytes


def activation_budget() -> int:
    """Bytes of activations one chunk may hold: a quarter of the memory available now (floor 64 MiB)."""
    return max(64 << 20, available_bytes() // 4)


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
    """``expose(feeds)`` yields ``(tensor, value)`` for every one of ``tensors`` of the graph at ``model_path``
    and every call in ``feeds``: chunk by chunk, and within a chunk call by call.

    Each session's graph is handed to ONNX Runtime in memory, its external weights read from ``model_path``'s
    folder: nothing is written there (it may be a float bundle's)."""

    def __init__(self, model_path: Path, tensors: list[str], budget: int | None = None,
                 threads: int | None = None):
        self.model_path = Path(model_path)
        self.tensors = list(dict.fromkeys(tensors))
        self.budget = activation_budget() if budget is None else budget
        self.threads = threads
        self.sessions: list[list[str]] = []  # each session's outputs, in the order they were made

    def sizes(self, feeds: Sequence[dict]) -> dict[str, int]:
        """Each tensor's largest size in bytes over ``feeds``: one run per distinct input shape of a session
        whose outputs are only the tensors' shapes."""
        shapes = [f"{t}::shape" for t in self.tensors]
        sess = self._session(shapes, shape_of=self.tensors)
        itemsize = _itemsizes(self.model_path, self.tensors)
        sizes, seen = dict.fromkeys(self.tensors, 0), set()
        for f in feeds:
            key = tuple((i.name, np.shape(f[i.name])) for i in sess.get_inputs())
            if key in seen:
                continue
            seen.add(key)
            for t, shape in zip(self.tensors, _run(sess, shapes, f)):
                sizes[t] = max(sizes[t], int(np.prod(shape)) * itemsize[t])
        return sizes

    def __call__(self, feeds: Sequence[dict]) -> Iterator[tuple[str, np.ndarray]]:
        for chunk in plan_chunks(self.sizes(feeds), self.budget):
            sess = self._session(chunk)
            for f in feeds:
                values = _run(sess, chunk, f)
                for i, name in enumerate(chunk):
                    value, values[i] = values[i], None  # ours dropped: the consumer's is the last reference
                    yield name, value
            del sess

    def _session(self, outputs: list[str], shape_of: Sequence[str] = ()):
        """A session over the float graph whose only outputs are ``outputs``; with ``shape_of``, a ``Shape`` node
        for each of those tensors right after its producer (so that the tensor can be freed as the run goes
        on). Graph optimisation off, so that every tensor survives as the exporter named it."""
        import onnxruntime as ort

        model = onnx.load(str(self.model_path), load_external_data=False)
        if shape_of:
            wanted = set(shape_of)

            def shapes(names):
                return [helper.make_node("Shape", [t], [f"{t}::shape"], name=f"{t}::shape") for t in names
                        if t in wanted]

            nodes = shapes(i.name for i in model.graph.input)
            for node in model.graph.node:
                nodes += [node, *shapes(node.output)]
            del model.graph.node[:]
            model.graph.node.extend(nodes)
        del model.graph.output[:]
        model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in outputs)
        options = session_options(self.threads)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(self.model_path.resolve().parent))
        graph = model.SerializeToString()
        del model
        sess = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.sessions.append(list(outputs))
        return sess


def session_options(threads: int | None = None):
    """The options of every session that reads a float graph's activations for calibration: graph optimisation
    off, so that every tensor survives as the exporter named it. The block pass (`calib.blockwise`) runs its
    segments with the same options: kernels chosen differently (a prepacked weight, a fusion) round differently,
    and the two passes' ranges would no longer be equal."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # ONNX Runtime's default order ran every Shape node last, holding every tensor to the end (measured:
    # 24 x 32 MB chained MatMuls peaked at +793 MB; in priority order, +97 MB).
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.enable_cpu_mem_arena = False  # an arena keeps its high-water mark; these runs free as they go
    if threads:
        so.intra_op_num_threads = threads
    return so


def _itemsizes(model_path: Path, tensors: list[str]) -> dict[str, int]:
    """Bytes per element of each tensor, from the graph's type annotations (4, float32, where it has none)."""
    g = onnx.load(str(model_path), load_external_data=False).graph
    elem = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    return {t: np.dtype(helper.tensor_dtype_to_np_dtype(elem[t])).itemsize if elem.get(t) else 4 for t in tensors}


def _run(sess, outputs: list[str], feeds: dict) -> list[np.ndarray]:
    return sess.run(outputs, {i.name: feeds[i.name] for i in sess.get_inputs()})
