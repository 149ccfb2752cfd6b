"""Every error the compiler raises on purpose. Each says what was expected, what came, and what to do."""

from __future__ import annotations


class MetaCanvasError(Exception):
    """Base class: the CLI maps these to exit code 2 with the message, never a traceback."""


class ConfigError(MetaCanvasError, ValueError):
    """A configuration, preset or option that cannot be honoured (unknown backbone, bad dims...)."""


class TaskError(MetaCanvasError, ValueError):
    """A task that the backbone does not serve, or a task called with the wrong inputs."""


class InputError(MetaCanvasError, ValueError):
    """A request input with the wrong shape, range or type."""


class CheckpointError(MetaCanvasError):
    """A checkpoint folder that is missing a part or whose parts do not fit together."""
