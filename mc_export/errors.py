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


class ExportError(MetaCanvasError):
    """An exported graph that holds what a target rejects (DOUBLE tensors, scatters) or cannot be exported."""


class StageParityError(MetaCanvasError):
    """A stage whose compiled output misses its spec's tolerance against the PyTorch reference."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"stage {stage!r}: {message}")
        self.stage = stage


class BuildError(MetaCanvasError):
    """A build that cannot be done as asked (a precision or target this machine cannot serve...)."""


class ExportFolderError(MetaCanvasError):
    """A TensorRT export folder (`build --export-only`) that cannot be used: not an export, another version, or a
    file changed, missing or added since it was written."""


def run_cli(call) -> int:
    """Run a compiler CLI command: our errors (compiler's, calibration's and runtime's) become one line on stderr
    and exit code 2; anything else is a bug and keeps its traceback. Returns the exit code."""
    from metacanvas_deploy.calib.errors import CalibError
    from metacanvas_deploy.runtime.errors import MetaCanvasRuntimeError
    from metacanvas_deploy.runtime.errors import run_cli as run

    return run(call, (MetaCanvasError, CalibError, MetaCanvasRuntimeError))
