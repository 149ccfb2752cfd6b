"""Library chatter that tells a user nothing, kept out of a build's output.

ONNX Runtime's quantizer logs through the root logger (``WARNING:root:...``): "Please consider to run pre-processing
before quantization" (its shape inference and optimisation; calibration prepares the graph itself,
`calib.quantize.prepare`) and "Expected bias 'val_N' to be an initializer" (a bias computed in the graph stays
float: nothing to do). Its HistogramCollector prints per call (`calib.ranges` captures that). Python warnings
from onnx / onnxruntime inside the quantizer are dropped too; anything at ERROR or above still shows.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

_QUIET_PATHS = ("onnxruntime/quantization", "onnxruntime\\quantization", "/onnx/", "\\onnx\\")


class _LibraryWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not any(p in record.pathname for p in _QUIET_PATHS)


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Within the block: ONNX Runtime's quantizer's and onnx's warnings dropped (logged ones and Python warnings).
    The root logger gets a handler only for the duration when it has none, so that a library's
    ``logging.warning`` does not install a stderr handler (``logging.basicConfig``) for the rest of the process."""
    root = logging.getLogger()
    quiet = _LibraryWarnings()
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"onnx(runtime)?(\..*)?$")
            yield
    finally:
        root.removeFilter(quiet)
        if placeholder is not None:
            root.removeHandler(placeholder)
