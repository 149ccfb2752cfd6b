"""calib.prompts: the shipped calibration prompt set and its loader."""

from __future__ import annotations

import copy
import json
from importlib import resources

import pytest

from metacanvas_deploy.calib.prompts import KINDS, SPLITS, load_prompts, validate

MIN_COUNTS = {("generation", "calibration"): 128, ("generation", "held_out"): 32,
              ("edit", "calibration"): 32, ("edit", "held_out"): 16}


def _raw() -> dict:
    return json.loads(resources.files("calib").joinpath("data/prompts.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(("kind", "split"), list(MIN_COUNTS))
def test_counts(kind, split):
    prompts = load_prompts(kind, split)
    assert isinstance(prompts, tuple)
    assert len(prompts) >= MIN_COUNTS[kind, split]
    assert all(isinstance(p, str) and p for p in prompts)


def test_generation_calibration_is_exactly_128():
    assert len(load_prompts("generation", "calibration")) == 128
    assert len(load_prompts("edit", "calibration")) == 32


@pytest.mark.parametrize("kind", KINDS)
def test_splits_disjoint(kind):
    assert not set(load_prompts(kind, "calibration")) & set(load_prompts(kind, "held_out"))


def test_unique_ascii_single_line_across_file():
    every = [p for kind in KINDS for split in SPLITS for p in load_prompts(kind, split)]
    assert len(every) == len(set(every))
    assert len({p.casefold() for p in every}) == len(every)
    for p in every:
        assert p.isascii() and p.isprintable() and p == p.strip() and "\n" not in p, p


def test_file_structure():
    raw = _raw()
    assert list(raw) == ["version", "description", "generation", "edit"]
    assert raw["version"] == 1
    assert isinstance(raw["description"], str) and raw["description"].strip()
    for kind in KINDS:
        assert list(raw[kind]) == ["calibration", "held_out"]
    resources.files("calib").joinpath("data/prompts.json").read_bytes().decode("ascii")


@pytest.mark.parametrize("split", SPLITS)
def test_generation_has_short_and_long_prompts(split):
    lengths = [len(p.split()) for p in load_prompts("generation", split)]
    assert any(n <= 4 for n in lengths)
    assert any(40 <= n <= 70 for n in lengths)
    assert max(lengths) <= 70


def test_cached():
    assert load_prompts("edit", "held_out") is load_prompts("edit", "held_out")


@pytest.mark.parametrize(("kind", "split", "match"), [
    ("images", "calibration", "unknown prompt kind 'images'"),
    ("generation", "train", "unknown prompt split 'train'"),
    ("Edit", "held_out", "unknown prompt kind"),
    ("edit", "heldout", "unknown prompt split"),
    ("", "", "unknown prompt kind"),
])
def test_loader_rejects_bad_arguments(kind, split, match):
    with pytest.raises(ValueError, match=match):
        load_prompts(kind, split)


def test_validate_accepts_shipped_file():
    out = validate(_raw())
    assert out["generation"]["held_out"] == load_prompts("generation", "held_out")


def _broken(mutate):
    raw = copy.deepcopy(_raw())
    mutate(raw)
    return raw


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda r: r.pop("edit"), "top level must hold exactly"),
    (lambda r: r.update(extra=[]), "top level must hold exactly"),
    (lambda r: r.update(version=2), "unsupported version 2"),
    (lambda r: r.update(description=""), "description must be"),
    (lambda r: r["edit"].pop("held_out"), "'edit' must hold exactly"),
    (lambda r: r["generation"].update(held_out=[]), r"generation\.held_out must be a non-empty list"),
    (lambda r: r["generation"].update(held_out="a cat"), r"generation\.held_out must be a non-empty list"),
    (lambda r: r["edit"]["calibration"].append(""), "must be a non-empty string"),
    (lambda r: r["edit"]["calibration"].append(7), "must be a non-empty string"),
    (lambda r: r["edit"]["calibration"].append("Make it look caf\u00e9-like"), "printable ASCII"),
    (lambda r: r["edit"]["calibration"].append("two\nlines"), "printable ASCII"),
    (lambda r: r["edit"]["calibration"].append("trailing space "), "leading or trailing whitespace"),
    (lambda r: r["generation"]["held_out"].append(r["generation"]["calibration"][0]),
     r"generation\.held_out\[\d+\] duplicates generation\.calibration\[0\]"),
    (lambda r: r["edit"]["held_out"].append(r["generation"]["calibration"][3]),
     r"duplicates generation\.calibration\[3\]"),
    (lambda r: r["edit"]["calibration"].append(r["edit"]["calibration"][0]), r"duplicates edit\.calibration\[0\]"),
])
def test_validate_rejects(mutate, match):
    with pytest.raises(ValueError, match=match):
        validate(_broken(mutate))


def test_validate_rejects_non_dict():
    with pytest.raises(ValueError, match="top level"):
        validate([])
