"""config.py and training/config.py: defaults, TOML + CLI precedence, validation naming the option when built."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sdlora.config import add_arguments, config_from_args, load_toml
from sdlora.training.config import TrainConfig, to_toml


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_are_an_sd15_style_lora():
    config = parse(["data", "--output", "out"])
    assert (config.rank, config.alpha, config.lr, config.batch_size) == (16, 16.0, 1e-4, 1)
    assert config.resolution is None  # the model's own size: 512 for SD1.5 (tests/training/test_recipe.py)
    assert config.preset == "attn" and config.mixed_precision == "no"


def test_every_option_is_a_flag_and_a_toml_key(tmp_path):
    config_file = tmp_path / "train.toml"
    config_file.write_text(
        'data_dir = "images"\noutput_dir = "out"\nrank = 4\nalpha = 2.5\nbuckets = true\nvalidation_prompts = ["a", "b"]\nlr = 3e-4\n'
    )
    config = parse(["--config", str(config_file), "--rank", "8", "--no-buckets", "--validation-prompts", "c"])
    assert config.rank == 8  # flag beats file
    assert config.alpha == 2.5 and config.lr == 3e-4  # file beats default
    assert config.buckets is False and config.validation_prompts == ["c"]
    assert config.data_dir == str((tmp_path / "images").resolve())  # relative to the file
    assert config.output_dir == str((tmp_path / "out").resolve())


def test_effective_config_round_trips_through_toml(tmp_path):
    config = parse(["data", "--output", "out", "--rank", "4", "--alpha", "3", "--trigger", 'say "hi"', "--validation-prompts", "x"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    # the paths as the run meant them (from the folder it ran in), wherever config.toml is read from
    assert TrainConfig(**load_toml(path)).to_dict() == {
        **config.to_dict(),
        "data_dir": str(Path("data").resolve()),
        "output_dir": str(Path("out").resolve()),
    }


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--rank", "0"], "--rank"),
        (["--steps", "-1"], "--steps"),
        (["--lr", "nan"], "--lr"),
        (["--resolution", "30"], "--resolution"),
        (["--dropout", "1.5"], "--dropout"),
        (["--val-split", "1"], "--val-split"),
        (["--alpha", "inf"], "--alpha"),
    ],
)
def test_bad_values_name_the_option(argv, option):
    with pytest.raises(ValueError, match=f"^{option} "):
        parse(["data", "--output", "out", *argv])


def test_unknown_toml_key_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rnak = 4\n")
    with pytest.raises(ValueError, match="'rnak'"):
        load_toml(path)
    path.write_text("rank = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_toml(path)


def test_nan_is_rejected_not_compared():
    with pytest.raises(ValueError, match="--lr"):
        TrainConfig(data_dir="d", output_dir="o", lr=float("nan"))
