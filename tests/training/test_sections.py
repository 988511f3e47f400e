"""The options in sections: TrainConfig is its sections, each part of the trainer below the recipe is handed only
its own sections (it cannot read another's), and the recipe's setup reads top to bottom."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import sdlora.training
from sdlora.training import recipe
from sdlora.training.config import SECTION_OF, SECTIONS, TrainConfig, option_fields, section_title

TRAINING = Path(sdlora.training.__file__).parent
# the modules that take the whole TrainConfig: it is defined in config; the recipe hands out its sections; outputs
# records every option of the run (config.toml, kohya's ss_* metadata, the model card)
WHOLE_CONFIG = {"config.py", "recipe.py", "outputs.py"}


def test_train_config_is_a_handful_of_frozen_sections():
    sections = dataclasses.fields(TrainConfig)
    assert len(sections) <= 10
    for item in sections:
        section = SECTIONS[item.name]
        assert dataclasses.is_dataclass(section) and section.__dataclass_params__.frozen, item.name
        assert item.metadata["title"] == section_title(item.name) and section.__doc__.strip()
    assert TrainConfig.__dataclass_params__.frozen
    default = TrainConfig.from_options(data_dir="d", output_dir="o")
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.network.rank = 8  # a run's options never change under it


def test_every_option_is_in_exactly_one_section_with_its_help():
    assert len(option_fields()) == len(SECTION_OF) >= 74  # the flat TrainConfig's 74 options, and those added since
    for section, item in option_fields():
        assert SECTION_OF[item.name] == section and item.metadata["help"].strip(), item.name


def test_parts_below_the_recipe_never_see_the_whole_config():
    """No module below the recipe names TrainConfig, so each reads only the sections it is handed."""
    whole = []
    for path in sorted(TRAINING.glob("*.py")):
        if path.name in WHOLE_CONFIG:
            continue
        names = {node.id for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.Name)}
        names |= {
            alias.name
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        if "TrainConfig" in names or "TrainConfig" in path.read_text(encoding="utf-8"):
            whole.append(path.name)
    assert not whole, f"modules below the recipe that take the whole TrainConfig: {whole}"


def test_setup_reads_top_to_bottom():
    lines = inspect.getsource(recipe.setup).splitlines()
    assert len(lines) < 40, f"recipe.setup is {len(lines)} lines: give a new job its own _setup_* function"


def test_replace_and_to_dict_speak_flat_option_names():
    config = TrainConfig.from_options(data_dir="d", output_dir="o", rank=8)
    changed = config.replace(rank=4, steps=7)
    assert (changed.network.rank, changed.optimization.steps, config.network.rank) == (4, 7, 8)
    assert changed.to_dict()["rank"] == 4 and set(changed.to_dict()) == set(SECTION_OF)
    with pytest.raises(ValueError, match="^--rank 0 is invalid"):
        config.replace(rank=0)  # the section checks itself again
    with pytest.raises(ValueError, match="unknown option 'rnak'"):
        TrainConfig.from_options(data_dir="d", output_dir="o", rnak=8)
