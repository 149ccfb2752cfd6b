"""The backbone registry (`mc_export.backbones`): every registered backbone has what a backbone needs, and a test
fails when one lacks it, as Optimum's exporter tests fail for a registered model without a test: a runtime host
module, default int8 and fp8 recipes whose patterns name real layers, presets, diffusers classes and the
end-to-end tests of tests/test_build_runtime.py. An unknown name is a ConfigError everywhere (one line and exit
code 2 on the CLI).
"""

from __future__ import annotations

import importlib
import json
import re

import pytest
import test_build_runtime
import torch

from metacanvas_deploy.calib import cli as calib_cli
from metacanvas_deploy.calib.recipes import FORMATS, Recipe
from metacanvas_deploy.mc_export import cli
from metacanvas_deploy.mc_export.backbones import ALL_TASKS, BACKBONES, COMMON_KEEP_FLOAT, get, recipe_for_backbone
from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.models import config
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
from metacanvas_deploy.mc_export.models.presets import PRESETS
from metacanvas_deploy.runtime.backbones import BACKBONES as RUNTIME_BACKBONES
from metacanvas_deploy.runtime.backbones import backbone_module

NAMES = sorted(BACKBONES)


def _dit_weight_names(name: str) -> tuple[list[str], int]:
    """The weight names the recipe's patterns see (module paths of the step graph: `transformer.*`), from the
    tiny preset's DiT built on `meta`, and its depth."""
    backbone = get(name)
    preset = backbone.preset("tiny")
    t_cls, _ = backbone.diffusers_classes()
    with torch.device("meta"):
        dit = t_cls(**backbone.adapter.transformer_config(preset.transformer, preset.vae, preset.metacanvas))
    return [f"transformer.{n}" for n, _ in dit.named_parameters()], dit.config.num_layers


@pytest.mark.parametrize("name", NAMES)
def test_every_backbone_has_a_runtime_host(name):
    host = importlib.import_module(f"metacanvas_deploy.runtime.backbones.{get(name).runtime_host}")
    assert backbone_module(name) is host  # a bundle's manifest names the backbone; the runtime finds this module


def test_the_runtime_serves_the_registered_backbones_and_no_other():
    """The runtime's (torch-free) list, which the benchmarks' CLI offers, is the registry's."""
    assert set(RUNTIME_BACKBONES) == set(BACKBONES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", FORMATS)
def test_every_backbone_has_default_recipes_naming_real_layers(name, precision):
    weights, depth = _dit_weight_names(name)
    recipe = recipe_for_backbone(name, precision, num_layers=depth)
    assert recipe.format == precision and recipe.keep_float[:len(COMMON_KEEP_FLOAT)] == COMMON_KEEP_FLOAT
    for pattern in recipe.keep_float[len(COMMON_KEEP_FLOAT):]:  # the backbone's own: each names a real layer
        assert any(re.search(pattern, w) for w in weights), f"{name}: {pattern!r} matches no weight of its DiT"
    assert not all(recipe.keeps_float(w) for w in weights), f"{name}: the recipe keeps every layer float"


def test_edge_blocks_are_the_first_and_last():
    wan = get("wan")
    assert wan.keep_float_edge_blocks == 1
    assert wan.keep_float_patterns(30)[-2:] == (r"\.blocks\.0\.", r"\.blocks\.29\.")
    assert wan.keep_float_patterns(1)[-1] == r"\.blocks\.0\." and wan.keep_float_patterns(None) == \
        (*COMMON_KEEP_FLOAT, *wan.keep_float)
    assert get("sana").keep_float_patterns(20) == (*COMMON_KEEP_FLOAT, *get("sana").keep_float)


def test_every_backbone_has_an_end_to_end_test():
    assert set(test_build_runtime.END_TO_END_BACKBONES) == set(BACKBONES)
    assert test_build_runtime.TASKS == {name: get(name).tasks for name in BACKBONES}


@pytest.mark.parametrize("name", NAMES)
def test_every_backbone_has_presets_classes_and_tasks(name):
    backbone = get(name)
    assert backbone.name == name and backbone.adapter.backbone == name
    assert backbone.tasks and set(backbone.tasks) <= set(ALL_TASKS)
    t_cls, v_cls = backbone.diffusers_classes()
    assert (t_cls.__name__, v_cls.__name__) == (backbone.transformer_class, backbone.vae_class)
    for preset in PRESETS:
        p = backbone.preset(preset)
        assert p.backbone == name and p.scheduler["_class_name"] == backbone.scheduler_class
    assert callable(backbone.stage_components)
    assert set(config.BACKBONES) == set(BACKBONES)  # the config's own check knows the same names


def test_an_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown backbone 'sdxl'; expected one of wan, flux, sana"):
        get("sdxl")
    with pytest.raises(ConfigError, match="unknown backbone 'sdxl'"):
        MetaCanvas.from_preset("sdxl", "tiny")
    with pytest.raises(ConfigError, match="unknown backbone 'sdxl'"):
        recipe_for_backbone("sdxl", "int8")


@pytest.mark.parametrize("argv", [
    ["recipe", "--backbone", "sdxl", "--precision", "int8"],
    ["init-checkpoint", "--backbone", "sdxl", "--out", "{tmp}/ckpt"],
    ["build", "--backbone", "sdxl", "--out", "{tmp}/bundle"],
], ids=lambda a: a[0])
def test_an_unknown_backbone_on_the_cli_is_one_line_and_exit_code_2(argv, tmp_path, capsys):
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown backbone 'sdxl'; expected one of wan, flux, sana" in err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_the_recipe_command_prints_the_backbones_default(capsys):
    assert cli.main(["recipe", "--backbone", "wan", "--precision", "int8", "--num-layers", "6"]) == 0
    assert Recipe.from_json(json.loads(capsys.readouterr().out)) == recipe_for_backbone("wan", "int8", 6)
    assert cli.main(["recipe", "--backbone", "sana", "--precision", "fp8", "--target", "tensorrt"]) == 0
    assert Recipe.from_json(json.loads(capsys.readouterr().out)) == recipe_for_backbone("sana", "fp8",
                                                                                        target="tensorrt")
    with pytest.raises(SystemExit) as info:  # calibration knows no backbone: the command is the compiler's
        calib_cli.main(["recipe", "--backbone", "sana", "--precision", "int8"])
    assert info.value.code == 2
