"""The training form: `TrainConfig`'s sections and options as the page draws them (names, types, defaults, help,
choices), and a submitted form checked as `sdlora train` checks its flags, each problem tied to its option.

Nothing here lists an option by hand: a new option of `training/config.py` appears in the form with its help,
and the page sends values keyed exactly as config.toml's keys."""

from __future__ import annotations

import re
import types
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from ..errors import UserError
from ..models.loading import is_builtin_model, peek_family, peek_resolution
from ..storage.output_rules import check_run_folder
from ..training.config import SECTION_OF, SECTIONS, TrainConfig, option_annotations, option_fields, section_title, value_problem
from ..training.recipe import family_defaults
from .roots import OutsideRoots, Roots

# options the page leaves out of the form: the UI's own resume button passes --resume latest
FORM_HIDDEN = frozenset({"resume"})
_FLAG = re.compile(r"--([a-z0-9][a-z0-9-]*)")


class OptionError(UserError):
    """A submitted option that `sdlora train` would refuse: the one-line message and the option it is about (None
    when the message names none)."""

    def __init__(self, message: str, option: str | None) -> None:
        super().__init__(message)
        self.option = option


def option_schema() -> list[dict[str, Any]]:
    """Each section (name, title, description) with its options: name, flag, type (bool, int, float, str, list),
    whether it may be left unset, default, help, choices, whether it names a path."""
    sections = []
    for name, section in SECTIONS.items():
        options = []
        for owner, item in option_fields():
            if owner != name or item.name in FORM_HIDDEN:
                continue
            kind, optional = _kind(option_annotations(section)[item.name])
            options.append(
                {
                    "name": item.name,
                    "flag": None if item.metadata["positional"] else "--" + item.name.replace("_", "-"),
                    "type": kind,
                    "items": _items(option_annotations(section)[item.name]),
                    "optional": optional,
                    "default": _default(item),
                    "help": item.metadata["help"],
                    "choices": list(item.metadata["choices"]) if item.metadata["choices"] else None,
                    "path": item.metadata["path"],
                    "required": item.name in ("data_dir", "output_dir"),
                }
            )
        sections.append({"name": name, "title": section_title(name), "description": section.__doc__ or "", "options": options})
    return sections


def _kind(annotation: Any) -> tuple[str, bool]:
    optional = False
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation, optional = args[0], True
    if get_origin(annotation) is list:
        return "list", optional
    return annotation.__name__, optional


def _items(annotation: Any) -> str | None:
    """A list option's element type (str, int, float); None for other options."""
    return get_args(annotation)[0].__name__ if get_origin(annotation) is list else None


def _default(item: Field) -> Any:
    return item.default if item.default is not MISSING else item.default_factory()


def check_options(raw: Any, roots: Roots) -> TrainConfig:
    """The TrainConfig a submitted form (a JSON object of config.toml keys) makes, every path resolved under the
    roots; an OptionError naming the option otherwise. Unset optional values (None) keep the default."""
    if not isinstance(raw, dict):
        raise OptionError("the training options must be a JSON object of config.toml keys", None)
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTION_OF:
            raise OptionError(f"unknown option {key!r} (see sdlora train --help)", None)
        if value is None:
            continue
        section = SECTIONS[SECTION_OF[key]]
        item = section.__dataclass_fields__[key]
        expected = value_problem(section, item, value, toml=True)
        if expected is not None:
            raise OptionError(f"{key} = {_shown(value)} must be {expected}", key)
        options[key] = _path_option(item, value, roots) if item.metadata["path"] and value else value
    try:
        config = TrainConfig.from_options(**options)
    except UserError as err:
        raise OptionError(str(err).splitlines()[0], _option_named(str(err))) from None
    inputs = [config.data.data_dir, config.data.reg_data, config.data.dataset_config, config.base.model, config.network.init_lora]
    try:
        check_run_folder(config.run.output_dir, [path for path in inputs if path and Path(path).exists()])
    except (UserError, OSError) as err:
        raise OptionError(str(err).splitlines()[0], "output_dir") from None
    return config


def _shown(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _path_option(item: Field, value: str, roots: Roots) -> str:
    """A path option's value as a real path under the roots; an option that may be a name (a built-in model, a hub
    id, `latest`) keeps a value that is no path here."""
    home_relative = not Path(value).expanduser().is_absolute() and not value.startswith((".", "~"))
    if item.metadata["may_be_name"] and home_relative and ".." not in Path(value).parts and not (roots.home / value).exists():
        return value
    try:
        real = roots.resolve(value, item.name)
    except OutsideRoots as err:
        raise _Refused(str(err), item.name) from None
    if item.name != "output_dir" and not real.exists():
        raise OptionError(f"{item.name} {value}: not found (under {roots.home})", item.name)
    return str(real)


class _Refused(OptionError, OutsideRoots):
    """A path option outside the roots: an OptionError the server answers with 403."""


def _option_named(message: str) -> str | None:
    """The option a UserError's message is about: its first `--flag` that is an option, or an option name it opens with."""
    for match in _FLAG.finditer(message):
        name = "output_dir" if match.group(1) == "output" else match.group(1).replace("-", "_")
        if name in SECTION_OF:
            return name
    first = message.split(" ", 1)[0]
    return first if first in SECTION_OF else None


def model_defaults(model: str, roots: Roots) -> dict[str, Any]:
    """What training would take for the options left to the model named in the form: its family (from the built-in
    name, the folder's model_index.json and configs, or a single file's keys, nothing loaded), its resolution (where
    its configs tell) and the family's bucketing and gradient checkpointing at that resolution; nulls where the name
    tells nothing yet (a hub id, a path being typed)."""
    if not isinstance(model, str) or not model:
        raise UserError("give ?model=...")
    name = model if is_builtin_model(model) and not (roots.home / model).exists() else str(roots.resolve(model, "model"))
    family = peek_family(name)
    resolution = peek_resolution(name) if family is not None else None
    defaults: dict[str, Any] = {"resolution": resolution, "buckets": None, "gradient_checkpointing": None}
    if family is not None:
        defaults |= {"buckets": family.buckets_by_default}
        if resolution is not None:
            defaults |= family_defaults(family, resolution)
    return {
        "model": name,
        "family": family.name if family else None,
        "label": family.label if family else None,
        "defaults": defaults,
    }
