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
