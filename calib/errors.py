"""Every error calibration raises on purpose. Each says what was expected, what came, and what to do.

calib sits below the compiler (which imports it) and above the runtime: its errors are its own classes, and the
CLIs map `CalibError` to exit code 2 with the message.
"""

from __future__ import annotations


class CalibError(Exception):
    """Base class of every error calibration raises on purpose."""


class RecipeError(CalibError, ValueError):
    """A recipe that cannot be used: an unknown format or method, a value out of range, a malformed file, a
    stage or layer pattern the model does not have."""


class CalibrationDataError(CalibError, ValueError):
    """The shipped prompt set, or a calibration set too small for the recipe."""


class BundleMismatchError(CalibError, ValueError):
    """A quantized bundle and the float bundle it is compared with do not belong together."""


class AccuracyBudgetError(CalibError):
    """A quantized stage that misses its accuracy budget after every fallback round; the message holds the
    measured numbers and the shortfall."""


class ExternalDataError(CalibError):
    """An ONNX external-data file not laid out as the compiler writes it: a tensor whose offset is not aligned
    for memory mapping, in another file, without a length, or overlapping another (`calib.external_data`)."""


class CalibrationStateError(CalibError, ValueError):
    """A block-by-block calibration state (`calib.blockwise`) that cannot be resumed: written for another model,
    graph or recipe, unreadable, or missing files it recorded."""
