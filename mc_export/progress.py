"""Progress of a long phase with the time left: the helper lives in `calib.progress` (calibration reports its
phases through it too, and calib cannot import the compiler); this module keeps the compiler's import path."""

from __future__ import annotations

import sys  # noqa: F401  (tests patch sys.stderr / time.perf_counter through this module)
import time  # noqa: F401

from metacanvas_deploy.calib.progress import Progress, _clock  # noqa: F401
