"""Every error the runtime raises on purpose. Each message says what was expected, what came, and what to do.

The runtime never imports `mc_export`, so these are its own classes; a CLI maps `MetaCanvasRuntimeError` to exit
code 2 with the message (tracebacks only for bugs).
"""

from __future__ import annotations


class MetaCanvasRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ShapeError(MetaCanvasRuntimeError, ValueError):
    """A tensor or request whose shape, dtype or size is outside what the bundle was built for."""


class BundleError(MetaCanvasRuntimeError):
    """A bundle that cannot be used as it is. The message says what to rebuild or fix."""


class CudaError(MetaCanvasRuntimeError):
    """A CUDA or TensorRT call failed at run time (TensorRT backend)."""


class _FieldMessage:
    """Mixin for errors about one manifest field: `detail` says what is wrong, `field` is the dotted path of the
    field (e.g. `engines.denoiser.inputs[0].dims[1]`, "" for the document as a whole), and str() names both."""

    def __init__(self, detail: str, field: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field

    def __str__(self) -> str:
        return f"manifest field `{self.field}`: {self.detail}" if self.field else self.detail

    def within(self, prefix: str):
        """The same error with `prefix` put in front of its field (used while parsing nested objects)."""
        return type(self)(self.detail, f"{prefix}.{self.field}" if self.field else prefix)

    def with_hint(self, hint: str):
        """The same error with `hint` (what to do) appended to its detail."""
        return type(self)(f"{self.detail}. {hint}", self.field)


class ManifestError(_FieldMessage, BundleError, ValueError):
    """`manifest.json` (or a `Manifest` built in code) is malformed: invalid JSON, unknown, missing or
    mistyped field. `.field` names the offending field."""


class SchemaVersionError(ManifestError):
    """The manifest's `schema_version` is not one this runtime reads."""


class BundleFileError(BundleError, FileNotFoundError):
    """The bundle directory, its manifest, or a file the manifest lists is missing or not a regular file."""


class BundleIntegrityError(BundleError):
    """A file whose size or sha256 differs from the manifest: corrupt, truncated or edited after the build."""


class BackendVersionError(BundleError):
    """The installed backend (onnxruntime, tensorrt) cannot run engines built with the recorded version."""


class BundleSecurityError(_FieldMessage, BundleError):
    """A path in the bundle (manifest entry, symlink, ONNX external-data location) that is absolute, climbs
    with `..`, resolves outside the bundle directory, or points at a file the manifest does not list."""


class BundleWriteError(BundleError):
    """`write_bundle` refused or failed; the previous bundle (if any) is left as it was."""


class RuntimeInputError(MetaCanvasRuntimeError, ValueError):
    """A request input the runtime cannot use as given: an empty or over-long prompt, an image of an
    unsupported type or mode, a video with too few frames. The message says what was expected and what came."""


class SchedulerConfigError(MetaCanvasRuntimeError, ValueError):
    """A diffusers scheduler config (or step count) that `runtime.schedulers.make_plan` cannot reproduce exactly:
    an unknown scheduler class, an option outside the parity-tested set, a missing FLUX image_seq_len."""


def run_cli(call, errors: tuple[type[BaseException], ...] = (MetaCanvasRuntimeError,)) -> int:
    """Run a CLI command: ``errors`` (the ones raised on purpose) become one line on stderr and exit code 2;
    anything else is a bug and keeps its traceback. Returns the exit code."""
    import sys

    try:
        call()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
