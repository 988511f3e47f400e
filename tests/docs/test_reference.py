"""The reference pages generated at build time (docs/hooks.py) cover the whole parser and the whole public API, so a
new subcommand, option or function cannot be left out of the site."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import sdlora
from sdlora.cli import build_parser
from sdlora.training.config import TrainConfig, to_toml

NOT_OPTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _sections(markdown: str) -> dict[str, str]:
    """{heading text: the markdown up to the next `## ` heading} of a generated page."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """What a user can give a (sub)command: every argument but --help, --version, a subcommand and a hidden one."""
    return [a for a in parser._actions if not isinstance(a, NOT_OPTIONS) and a.help != argparse.SUPPRESS]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _first_cell(action: argparse.Action) -> str:
    if action.option_strings:
        return ", ".join(f"`{flag}`" for flag in action.option_strings)
    return f"`{action.metavar if isinstance(action.metavar, str) else action.dest.upper()}` (positional)"


def _rows(page: str) -> dict[str, list[str]]:
    """{first cell: all cells} of every table row of a generated page."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows[cells[0]] = cells
    return rows


# ---------------------------------------------------------------- the CLI reference


def test_cli_reference_has_every_subcommand_and_option(docs_hooks):
    parser = build_parser()
    sections = _sections(docs_hooks.render_cli_reference(parser))
    assert "usage: sdlora" in sections["`sdlora`"]
    subcommands = _subcommands(parser)
    assert set(sections) == {"`sdlora`"} | {f"`sdlora {name}`" for name in subcommands}
    for name, sub in subcommands.items():
        body = sections[f"`sdlora {name}`"]
        assert f"usage: sdlora {name}" in body, name
        for action in _options(sub):
            names = action.option_strings or [action.metavar if isinstance(action.metavar, str) else action.dest]
            for flag in names:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", body), f"sdlora {name}: {flag} missing from the CLI reference"


def test_cli_reference_is_the_parsers_help_at_a_fixed_width(docs_hooks, monkeypatch):
    """The text is argparse's own, wrapped at the same width whatever the terminal it is built in."""
    parser = build_parser()
    monkeypatch.setenv("COLUMNS", "60")
    narrow_terminal = docs_hooks.render_cli_reference(parser)
    monkeypatch.setenv("COLUMNS", "250")
    assert docs_hooks.render_cli_reference(parser) == narrow_terminal
    monkeypatch.setenv("COLUMNS", docs_hooks.HELP_COLUMNS)
    assert parser.format_help().rstrip() in narrow_terminal


# ---------------------------------------------------------------- the training options


def test_training_options_have_every_train_option_once(docs_hooks):
    parser = build_parser()
    rows = _rows(docs_hooks.render_training_options(parser))
    train = _subcommands(parser)["train"]
    expected = [_first_cell(action) for action in _options(train)]
    assert sorted(rows) == sorted(expected), set(rows) ^ set(expected)


def test_training_options_one_section_per_argument_group(docs_hooks):
    """Each argparse group of `sdlora train` (a section of the options) is a section of the page, with its title,
    its description and its own options, in the parser's order."""
    parser = build_parser()
    train = _subcommands(parser)["train"]
    page = docs_hooks.render_training_options(parser)
    sections = _sections(page)
    groups = [group for group in train._action_groups if any(a in _options(train) for a in group._group_actions)]
    assert len(groups) > 2, "sdlora train's options are expected in several argument groups"
    assert [title.lower() for title in sections] == [group.title.lower() for group in groups]
    for group, body in zip(groups, sections.values()):
        if group.description:
            assert " ".join(group.description.split()) in body, group.title
        shown = set(_rows(body))
        assert shown == {_first_cell(action) for action in group._group_actions if action in _options(train)}, group.title


def test_training_options_name_the_config_toml_keys(docs_hooks, tmp_path):
    """The key column holds exactly the keys a config.toml takes (those sdlora writes into a run's config.toml)."""
    parser = build_parser()
    rows = _rows(docs_hooks.render_training_options(parser))
    keys_shown = {cells[1].strip("`") for cells in rows.values() if cells[1]}
    written = tomllib.loads(to_toml(TrainConfig.from_options(data_dir=str(tmp_path / "images"), output_dir=str(tmp_path / "out"))))
    keys_written = {key for table in written.values() for key in table} | {k for k, v in written.items() if not isinstance(v, dict)}
    assert keys_written <= keys_shown, keys_written - keys_shown
    assert keys_shown == docs_hooks.toml_keys()
    by_flag = {cells[0]: cells for cells in rows.values()}
    assert by_flag["`--rank`"][1:4] == ["`rank`", "int", "`16`"]
    assert by_flag["`--config`"][1] == ""  # the file itself is not a key of the file


def test_training_option_cells_keep_markdown_out(docs_hooks):
    text = "W + scale * alpha | [general] <lora:name:0.8> N_words `a|b*c`"
    assert docs_hooks._cell(text) == r"W + scale \* alpha \| \[general\] &lt;lora:name:0.8&gt; N\_words `a|b*c`"


# ---------------------------------------------------------------- the Python API


def test_api_reference_documents_every_public_name(docs_hooks):
    page = docs_hooks.render_api_reference()
    documented = re.findall(r"^::: (\S+)$", page, flags=re.M)
    public = sorted(name for name in sdlora.__all__ if not name.startswith("__"))
    assert sorted(path.rsplit(".", 1)[1] for path in documented) == public
    for path in documented:  # each path names the object `import sdlora` gives (mkdocstrings reads it there)
        module, name = path.rsplit(".", 1)
        assert getattr(importlib.import_module(module), name) is getattr(sdlora, name), path


# ---------------------------------------------------------------- the pages that hold them


def test_each_generated_reference_has_its_page(docs_hooks, docs_dir):
    pages = {path.relative_to(docs_dir).as_posix(): path.read_text(encoding="utf-8") for path in docs_dir.rglob("*.md")}
    for marker in docs_hooks.GENERATORS:
        holders = [name for name, text in pages.items() if marker in text]
        assert len(holders) == 1 and holders[0].startswith("reference/"), (marker, holders)
        filled = docs_hooks.on_page_markdown(pages[holders[0]], page=None, config=None, files=None)
        assert marker not in filled and len(filled) > len(pages[holders[0]]) + 500
