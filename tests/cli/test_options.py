"""Options several commands share are declared once: one help text for --allow-pickle, one set of dtype choices,
one --model-config; the old spelling --config of the commands other than train still works, hidden, and warns."""

from __future__ import annotations

import argparse

import pytest

from sdlora import cli
from sdlora.models.loading import ALLOW_PICKLE_HELP, DTYPES, MODEL_CONFIG_HELP

MODEL_CONFIG_COMMANDS = {
    "convert": ["in.safetensors", "out.safetensors", "--to", "kohya"],
    "extract": ["--base", "a", "--tuned", "b", "--rank", "4", "--out", "out.safetensors"],
    "generate": ["--prompt", "a cat", "--out", "images"],
    "grid": ["--prompt", "a cat", "--out", "grid"],
    "merge": ["--model", "model.safetensors", "--lora", "lora.safetensors", "--out", "merged"],
    "unmerge": ["--model", "model.safetensors", "--lora", "lora.safetensors", "--out", "unmerged"],
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def options(command: str) -> dict[str, argparse.Action]:
    return {flag: action for action in subparsers()[command]._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", MODEL_CONFIG_COMMANDS)
def test_model_config_is_the_option_and_config_its_hidden_old_spelling(command, capsys):
    parser = cli.build_parser()
    args = parser.parse_args([command, *MODEL_CONFIG_COMMANDS[command], "--model-config", "configs"])
    assert args.model_config == "configs" and capsys.readouterr().err == ""
    args = parser.parse_args([command, *MODEL_CONFIG_COMMANDS[command], "--config", "configs"])
    assert args.model_config == "configs"
    assert capsys.readouterr().err == "sdlora: warning: --config is now --model-config\n"
    assert parser.parse_args([command, *MODEL_CONFIG_COMMANDS[command]]).model_config is None
    help_text = subparsers()[command].format_help()
    assert "--model-config" in help_text and "--config" not in help_text
    assert options(command)["--model-config"].help == MODEL_CONFIG_HELP


def test_train_keeps_config_as_its_toml_file(capsys):
    args = cli.build_parser().parse_args(["train", "--config", "train.toml"])
    assert args.config == "train.toml" and capsys.readouterr().err == ""
    assert "--config" in subparsers()["train"].format_help()


def test_every_command_but_train_shares_one_allow_pickle_help():
    commands = [name for name in subparsers() if name != "train" and "--allow-pickle" in options(name)]
    assert len(commands) >= 8
    assert {options(name)["--allow-pickle"].help for name in commands} == {ALLOW_PICKLE_HELP}


def test_every_dtype_option_has_the_same_choices():
    dtype_options = [
        action for name in subparsers() if name != "train" for flag, action in options(name).items() if flag in ("--dtype", "--load-dtype")
    ]
    assert len(dtype_options) >= 7
    assert all(tuple(action.choices) == tuple(DTYPES) for action in dtype_options)
