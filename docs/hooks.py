"""MkDocs hook: the site's reference pages are generated from the code at build time, so they cannot drift.

A page holds a marker line (an HTML comment, invisible where the generator does not run, e.g. on GitHub) that
`on_page_markdown` replaces:

- `<!-- generated: cli-reference -->`: `sdlora --help` and every subcommand's `--help`, from `sdlora.cli.build_parser()`;
- `<!-- generated: training-options -->`: `sdlora train`'s options, one section per argparse argument group (its title
  and description), one table row per option: flags, config.toml key, type, default, choices, help;
- `<!-- generated: api-reference -->`: a mkdocstrings block for each name of sdlora's public API (`sdlora.__all__`).

This file lives beside the pages it serves and is left out of the site by `exclude_docs` in mkdocs.yml.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from typing import get_type_hints

HELP_COLUMNS = "100"  # argparse wraps to the terminal width: fixed so the text is the same everywhere
# argparse's own spelling of a default at the end of a help text (ArgumentDefaultsHelpFormatter's), as sdlora's options have it
_DEFAULT_MARK = "(default: "
_CODE_SPAN = re.compile(r"(`[^`]*`)")


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """sdlora's parser as it is now (imported here so the hook module loads without sdlora until a page needs it)."""
    from sdlora.cli import build_parser as build

    return build()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{name: subparser} of every `sdlora` subcommand, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise ValueError("sdlora's parser has no subcommands")


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a user can give: every action except --help, --version and those hidden with help=SUPPRESS."""
    hidden = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    return [action for action in parser._actions if not isinstance(action, hidden) and action.help != argparse.SUPPRESS]


def help_text(parser: argparse.ArgumentParser) -> str:
    """`parser.format_help()` at a fixed width."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        return parser.format_help().rstrip()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


# ---------------------------------------------------------------- the CLI reference


def render_cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """`sdlora --help`, then a section per subcommand with its `--help`, as markdown."""
    parser = parser or build_parser()
    parts = ["## `sdlora`", "", "```text", help_text(parser), "```"]
    for name, sub in subcommands(parser).items():
        parts += ["", f"## `sdlora {name}`", "", "```text", help_text(sub), "```"]
    return "\n".join(parts)


# ---------------------------------------------------------------- the training options


def toml_keys() -> set[str]:
    """The keys a `config.toml` takes: the names of TrainConfig's fields, looking into fields that are sections."""
    from sdlora.training.config import TrainConfig

    def names(cls: type) -> set[str]:
        hints = get_type_hints(cls)
        found = set()
        for item in dataclasses.fields(cls):
            kind = hints.get(item.name)
            found |= names(kind) if dataclasses.is_dataclass(kind) else {item.name}
        return found

    return names(TrainConfig)


def _expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help with argparse's %(default)s-style fields filled in, on one line."""
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    return " ".join(text.split())


def _help_and_default(parser: argparse.ArgumentParser, action: argparse.Action) -> tuple[str, str | None]:
    """(help without a trailing `(default: X)`, the default as text or None when there is none to show)."""
    text = _expanded_help(parser, action)
    suffix = None
    start = text.rfind(_DEFAULT_MARK)
    if start >= 0 and text.endswith(")"):
        text, suffix = text[:start].rstrip(), text[start + len(_DEFAULT_MARK) : -1]
    if action.default is not argparse.SUPPRESS and action.default is not None and not action.required:
        default = str(action.default)
    else:
        default = suffix
    if default in (None, "None"):
        return text, None
    if _type_name(action) == "bool":
        default = default.lower()  # as config.toml writes it
    return text, default


def _type_name(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "bool"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction, argparse._CountAction)):
        return "flag"
    base = getattr(action.type, "__name__", "str") if action.type is not None else "str"
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)) or action.nargs in ("*", "+"):
        return f"list of {base}"
    if isinstance(action.nargs, int) and action.nargs > 1:
        return " ".join([base] * action.nargs)
    return base


def _flags(action: argparse.Action) -> str:
    if action.option_strings:
        return ", ".join(f"`{flag}`" for flag in action.option_strings)
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return f"`{metavar}` (positional)"


def _cell(text: str) -> str:
    """Plain text made safe in a markdown table cell: code spans kept, markup characters escaped outside them."""
    parts = _CODE_SPAN.split(text)
    for index in range(0, len(parts), 2):  # the even parts are outside code spans
        escaped = parts[index].replace("\\", "\\\\").replace("<", "&lt;").replace(">", "&gt;")
        parts[index] = re.sub(r"([|*_\[\]])", r"\\\1", escaped)
    return "".join(parts)


def _code(text: str | None) -> str:
    if text is None or text == "":
        return ""
    return f"`{text}`" if "`" not in text else _cell(text)


def option_row(parser: argparse.ArgumentParser, action: argparse.Action, keys: set[str]) -> str:
    """One option as a table row: flags | config.toml key | type | default | choices | help."""
    text, default = _help_and_default(parser, action)
    choices = ", ".join(f"`{choice}`" for choice in action.choices) if action.choices else ""
    key = f"`{action.dest}`" if action.dest in keys else ""
    cells = [_flags(action), key, _type_name(action), _code(default), choices, _cell(text)]
    return "| " + " | ".join(cells) + " |"


def render_training_options(parser: argparse.ArgumentParser | None = None) -> str:
    """`sdlora train`'s options: a section per argument group, with its description, and a table of its options."""
    train = subcommands(parser or build_parser())["train"]
    keys = toml_keys()
    shown = set(map(id, documented_actions(train)))
    parts = []
    for group in train._action_groups:
        actions = [action for action in group._group_actions if id(action) in shown]
        if not actions:
            continue
        title = group.title or "options"
        parts += [f"## {title[0].upper()}{title[1:]}", ""]
        if group.description:
            parts += [" ".join(group.description.split()), ""]
        parts += ["| flags | config.toml key | type | default | choices | help |", "| --- | --- | --- | --- | --- | --- |"]
        parts += [option_row(train, action, keys) for action in actions]
        parts.append("")
    return "\n".join(parts).rstrip()


# ---------------------------------------------------------------- the Python API


def render_api_reference() -> str:
    """A mkdocstrings block per public name, by the folder of sdlora that defines it (in the order sdlora lists them),
    each folder introduced by its package docstring."""
    import importlib

    import sdlora

    public = set(sdlora.__all__)
    by_folder: dict[str, list[str]] = {}
    for name, module in sdlora._API.items():  # the lazy-import table behind sdlora.__all__: {name: module}
        if name in public:
            by_folder.setdefault(module.split(".")[0], []).append(f"sdlora.{module}.{name}")
    parts = []
    for folder, paths in by_folder.items():
        parts += [f"## `sdlora.{folder}`", ""]
        summary = (importlib.import_module(f"sdlora.{folder}").__doc__ or "").strip()
        if summary:
            parts += [" ".join(summary.split()), ""]
        for path in paths:
            parts += [f"::: {path}", "    options:", "      heading_level: 3", ""]
    return "\n".join(parts).rstrip()


# ---------------------------------------------------------------- the hook

GENERATORS: dict[str, Callable[[], str]] = {
    "<!-- generated: cli-reference -->": render_cli_reference,
    "<!-- generated: training-options -->": render_training_options,
    "<!-- generated: api-reference -->": render_api_reference,
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace each marker line of a page with what its generator writes now."""
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
