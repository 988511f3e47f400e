"""`TrainConfig` from the command line: one flag per option, grouped by section; a TOML file of options; flags
overriding the file."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any, get_args, get_origin

from .training.config import SECTION_OF, SECTIONS, TrainConfig, option_annotations, option_fields, section_title, toml_options
from .training.kohya_config import read_kohya_config

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "load_toml"]


def _field_type(owner: type, item: Field) -> type:
    """The plain type of a field (str, int, float, bool, list) with Optional removed."""
    annotation = option_annotations(owner)[item.name]
    if get_origin(annotation) is list:
        return list
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option (`--snake-case`), in one group per section, defaulting to 'not given' so the TOML file and
    the defaults stay."""
    parser.add_argument("--config", help="TOML file of options (keys are the option names with underscores); flags override it")
    parser.add_argument(
        "--kohya-config",
        metavar="FILE",
        help="kohya's own training config, as it is: sd-scripts' --config_file TOML or kohya_ss's saved JSON, read with "
        "kohya's meanings and defaults; the run prints the equivalent sdlora options; --config and flags override it",
    )
    for name, section in SECTIONS.items():
        group = parser.add_argument_group(section_title(name), f"{section.__doc__} (config.toml: [{name}] or top-level keys)")
        for _, item in (entry for entry in option_fields() if entry[0] == name):
            _add_option(group, section, item)
        if name == "objective":
            group.add_argument(
                "--timestep-range",
                nargs=2,
                type=int,
                metavar=("MIN", "MAX"),
                default=argparse.SUPPRESS,
                help="training timesteps drawn from [MIN, MAX): --min-timestep and --max-timestep in one flag (kohya's --min_timestep/--max_timestep)",
            )


def _add_option(group, section: type, item: Field) -> None:
    kind = _field_type(section, item)
    default = item.default if item.default is not MISSING else item.default_factory()
    if item.metadata.get("positional"):
        help_text = (item.metadata["help"] + " (or data_dir in --config)").replace("%", "%%")
        group.add_argument(item.name, nargs="?", default=argparse.SUPPRESS, help=help_text)
        return
    flags = ["--" + item.name.replace("_", "-")] + (["--output"] if item.name == "output_dir" else [])
    # argparse expands %-formats in help texts: a literal % (as in "0.4% off") is written %%
    help_text = f"{item.metadata['help']} (default: {default})".replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": item.name, "help": help_text, "default": argparse.SUPPRESS}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind is list:
        # several values after one flag (kohya's `--optimizer_args a=1 b=2`), or the flag repeated
        (element,) = get_args(option_annotations(section)[item.name])
        kwargs.update(action="extend", nargs="+", type=element, metavar="TEXT" if element is str else element.__name__.upper())
    else:
        kwargs.update(type=kind, choices=item.metadata.get("choices"))
    group.add_argument(*flags, **kwargs)


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Flat options from a TOML file: top-level keys, as kohya's and earlier sdlora's files have them, or keys in
    [section] tables (as sdlora writes config.toml now). Each value is checked against its option's type; unknown
    keys, keys in another section's table and values of another type are one-line errors naming the file, the key
    and the value; relative paths are made relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config file not found: {path}") from err
    return toml_options(text, path)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from defaults <- kohya's config (--kohya-config) <- TOML file (--config) <- CLI flags, validated."""
    options: dict[str, Any] = {}
    if getattr(args, "kohya_config", None):
        options.update(_kohya_options(args.kohya_config))
    if getattr(args, "config", None):
        options.update(load_toml(args.config))
    given = {k: v for k, v in vars(args).items() if k in SECTION_OF and v is not None}
    options.update(given)
    if getattr(args, "timestep_range", None):
        options["min_timestep"], options["max_timestep"] = args.timestep_range
    return TrainConfig.from_options(**options)


def _kohya_options(path: str) -> dict[str, Any]:
    """The options of kohya's training config, saying in one line each which keys were ignored (no effect on the
    LoRA) and the equivalent sdlora command line."""
    kohya = read_kohya_config(path)
    if kohya.ignored:
        print(f"{path}: ignored (no effect on the trained LoRA): {', '.join(kohya.ignored)}", file=sys.stderr)
    print(f"{path} as sdlora options: {kohya.command_line()}", file=sys.stderr)
    return kohya.options
