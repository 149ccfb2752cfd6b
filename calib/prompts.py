"""The calibration prompt set shipped with the package (`calib/data/prompts.json`).

Two kinds: "generation" (text-to-image/video prompts, for Wan and SANA) and "edit" (edit instructions, for
FLUX-Kontext and Wan video edit). Each has a "calibration" split, used to collect activation ranges for
INT8/FP8, and a disjoint "held_out" split, used to check the quantized model on prompts it was not
calibrated on. Both splits are ordered round-robin over categories, so any prefix is varied too.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from metacanvas_deploy.calib.errors import CalibrationDataError

KINDS = ("generation", "edit")
SPLITS = ("calibration", "held_out")
_RESOURCE = "data/prompts.json"


def load_prompts(kind: str, split: str) -> tuple[str, ...]:
    """The prompts of one kind ("generation" or "edit") and split ("calibration" or "held_out")."""
    if kind not in KINDS:
        raise CalibrationDataError(f"unknown prompt kind {kind!r}; expected one of {', '.join(KINDS)}")
    if split not in SPLITS:
        raise CalibrationDataError(f"unknown prompt split {split!r}; expected one of {', '.join(SPLITS)}")
    return _load()[kind][split]


@functools.cache
def _load() -> dict[str, dict[str, tuple[str, ...]]]:
    text = resources.files(__package__).joinpath(_RESOURCE).read_text(encoding="utf-8")
    return validate(json.loads(text))


def validate(data: object) -> dict[str, dict[str, tuple[str, ...]]]:
    """Check the structure of a parsed prompts file and return its splits as tuples.

    Raises CalibrationDataError unless: the top level holds exactly version (1), description, generation and edit;
    each kind holds exactly the two splits, each a non-empty list of non-empty, printable-ASCII strings with
    no surrounding whitespace; and no string appears twice anywhere in the file (so splits are disjoint).
    """
    where = f"calib/{_RESOURCE}"
    if not isinstance(data, dict) or set(data) != {"version", "description", *KINDS}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CalibrationDataError(f"{where}: top level must hold exactly version, description, {', '.join(KINDS)}; "
                         f"got {keys}")
    if data["version"] != 1:
        raise CalibrationDataError(f"{where}: unsupported version {data['version']!r}; expected 1")
    if not isinstance(data["description"], str) or not data["description"].strip():
        raise CalibrationDataError(f"{where}: description must be a non-empty string")
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    seen: dict[str, str] = {}
    for kind in KINDS:
        splits = data[kind]
        if not isinstance(splits, dict) or set(splits) != set(SPLITS):
            keys = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
            raise CalibrationDataError(f"{where}: {kind!r} must hold exactly {', '.join(SPLITS)}; got {keys}")
        out[kind] = {}
        for split in SPLITS:
            prompts = splits[split]
            if not isinstance(prompts, list) or not prompts:
                raise CalibrationDataError(f"{where}: {kind}.{split} must be a non-empty list of strings")
            for i, p in enumerate(prompts):
                at = f"{where}: {kind}.{split}[{i}]"
                if not isinstance(p, str) or not p:
                    raise CalibrationDataError(f"{at} must be a non-empty string; got {p!r}")
                if not (p.isascii() and p.isprintable()):
                    raise CalibrationDataError(f"{at} must be printable ASCII on one line; got {p!r}")
                if p != p.strip():
                    raise CalibrationDataError(f"{at} has leading or trailing whitespace: {p!r}")
                if p in seen:
                    raise CalibrationDataError(f"{at} duplicates {seen[p]}: {p!r}")
                seen[p] = f"{kind}.{split}[{i}]"
            out[kind][split] = tuple(prompts)
        if set(out[kind]["calibration"]) & set(out[kind]["held_out"]):  # implied by the check above; kept explicit
            raise CalibrationDataError(f"{where}: {kind} calibration and held_out splits overlap")
    return out
