"""`TrainConfig` from the command line: one flag per field, a TOML file of options, flags overriding the file."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import UserError
from .training.config import TrainConfig, toml_value, value_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "load_toml"]


def _field_type(item) -> type:
    """The plain type of a field (str, int, float, bool, list) with Optional removed."""
    annotation = get_type_hints(TrainConfig)[item.name]  # the annotations are strings (`from __future__ import annotations`)
    args = [a for a in get_args(annotation) if a is not type(None)]
    origin = get_origin(annotation)
    if origin is list:
        return list
    return args[0] if args and origin is not list else annotation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`--snake-case`), defaulting to 'not given' so the TOML file and defaults stay."""
    parser.add_argument("--config", help="TOML file of options (keys are the option names with underscores); flags override it")
    for item in fields(TrainConfig):
        kind = _field_type(item)
        default = item.default if item.default is not MISSING else item.default_factory()
        help_text = f"{item.metadata['help']} (default: {default})"
        if item.metadata.get("positional"):
            parser.add_argument(item.name, nargs="?", default=argparse.SUPPRESS, help=item.metadata["help"] + " (or data_dir in --config)")
            continue
        flags = ["--" + item.name.replace("_", "-")] + (["--output"] if item.name == "output_dir" else [])
        kwargs: dict[str, Any] = {"dest": item.name, "help": help_text, "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            # several values after one flag (kohya's `--optimizer_args a=1 b=2`), or the flag repeated
            kwargs.update(action="extend", nargs="+", metavar="TEXT")
        else:
            kwargs.update(type=kind, choices=item.metadata.get("choices"))
        parser.add_argument(*flags, **kwargs)
    parser.add_argument(
        "--timestep-range",
        nargs=2,
        type=int,
        metavar=("MIN", "MAX"),
        default=argparse.SUPPRESS,
        help="training timesteps drawn from [MIN, MAX): --min-timestep and --max-timestep in one flag (kohya's --min_timestep/--max_timestep)",
    )


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a TOML file, each checked against its option's type; unknown keys and values of another type are
    one-line errors naming the file, the key and the value; relative paths are made relative to the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config file not found: {path}") from err
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path} is not valid TOML: {err}") from err
    known = {item.name: item for item in fields(TrainConfig)}
    options = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"{path}: unknown option {unknown[0]!r} (see sdlora train --help)")
    for key, value in data.items():  # here, to name the file: TrainConfig checks them again, worded for Python
        expected = value_problem(TrainConfig, known[key.replace("-", "_")], value, toml=True)
        if expected is not None:
            raise UserError(f"{path}: {key} = {toml_value(value)} must be {expected}")
    # relative paths in a config file are relative to the file, so a dataset's train.toml works from anywhere
    for key, value in options.items():
        item = known[key]
        if not item.metadata["path"] or not value or Path(value).expanduser().is_absolute():
            continue
        beside = path.parent / value
        # a name (a hub id, a built-in model, `latest`, a checkpoint of the run) stays, unless it is a path here
        if not item.metadata["may_be_name"] or value.startswith(".") or beside.exists():
            options[key] = str(beside.resolve())
    return options


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from defaults <- TOML file (--config) <- CLI flags, validated."""
    options: dict[str, Any] = {}
    if getattr(args, "config", None):
        options.update(load_toml(args.config))
    given = {k: v for k, v in vars(args).items() if k in {item.name for item in fields(TrainConfig)} and v is not None}
    options.update(given)
    if getattr(args, "timestep_range", None):
        options["min_timestep"], options["max_timestep"] = args.timestep_range
    return TrainConfig(**options)
