"""The bounds every numeric input is held to, in the compiler, the runtime and the manifest alike, and the
checks that enforce them: an integer is an int (not a bool, not a float), a real is finite, and both sit inside
a stated range. A value outside is one clear error naming the input, what came and what is allowed.

Upper bounds exist so that a typo cannot take the machine: a step count beyond the scheduler's training
timesteps means nothing (and each step costs a DiT call), a seed must fit numpy's and torch's generators, and a
manifest that claims a billion-pixel image is refused before anything is allocated.
"""

from __future__ import annotations

import math
import operator
import os

MAX_STEPS = 1000  # diffusers' schedulers train on 1000 timesteps: more steps than that repeat timesteps
MAX_SEED = 2**63 - 1  # numpy's SeedSequence and torch.manual_seed both take it
MAX_GUIDANCE = 100.0  # far above any published setting (FLUX 2.5-3.5, Wan 5, SANA 4.5)
MAX_SIDE = 16384  # pixels per side of an image or video frame
MAX_FRAMES = 4097  # frames of one video request
MAX_PROMPT_TOKENS = 32768
MAX_JSON_INT = 2**53  # integers JSON readers agree on
MAX_JSON_DEPTH = 32  # nesting of a manifest's opaque sections (the deepest written today is 5)


def max_threads() -> int:
    """Intra-op threads a session may ask for: four per core (over-subscription beyond that only thrashes)."""
    return 4 * (os.cpu_count() or 1)


def check_int(name: str, value, lo: int, hi: int, error: type[Exception]) -> int:
    """``value`` as an int in [lo, hi], or ``error`` naming ``name``. Bools and floats are refused (2.7 steps,
    True frames), numpy integers accepted."""
    if isinstance(value, bool):
        raise error(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise error(f"{name} must be an integer in {lo}..{hi}, got {value!r}") from None
    if not lo <= value <= hi:
        raise error(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def check_real(name: str, value, lo: float, hi: float, error: type[Exception]) -> float:
    """``value`` as a finite float in [lo, hi], or ``error`` naming ``name``. Bools and strings are refused
    ("7" is a typo'd call, not a number), numpy floats accepted."""
    if isinstance(value, (bool, str, bytes)):
        raise error(f"{name} must be a number in {lo:g}..{hi:g}, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a number in {lo:g}..{hi:g}, got {value!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise error(f"{name} must be a finite number in {lo:g}..{hi:g}, got {value!r}")
    return value


MAX_PROMPT_CHARS = 100_000  # far past what any tokenizer window holds; refused before tokenizing


def check_prompt(name: str, value, allow_empty: bool) -> str:
    """A prompt as text the tokenizer can take: a str, encodable as UTF-8 (no lone surrogates, as undecodable
    command-line bytes become), no NUL, at most `MAX_PROMPT_CHARS`; non-blank unless ``allow_empty``."""
    from metacanvas_deploy.runtime.errors import RuntimeInputError

    if not isinstance(value, str):
        raise RuntimeInputError(f"{name} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RuntimeInputError(f"{name} must be a non-empty string")
    if len(value) > MAX_PROMPT_CHARS:
        raise RuntimeInputError(f"{name} has {len(value)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RuntimeInputError(f"{name} is not valid text: character {e.start} cannot be encoded as UTF-8 "
                                "(undecodable bytes?)") from None
    if "\x00" in value:
        raise RuntimeInputError(f"{name} contains a NUL character")
    return value
