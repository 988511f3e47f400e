"""The site's pages cannot drift from the CLI or from each other: every `sdlora` command in a page's shell blocks
parses with today's parser, shell blocks are ```bash (so those checks see them), and the nav of mkdocs.yml lists
exactly the pages there are. (`mkdocs build --strict` in .ci/run checks links and renders the pages.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sdlora.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
# other spellings of a shell block: they would escape the command checks, which read ```bash blocks
OTHER_SHELL_FENCES = re.compile(r"^[ \t]*```[ \t]*(sh|shell|console|zsh|bash[ \t]+\S.*)[ \t]*$", re.M)


def _pages(docs_dir: Path) -> dict[str, str]:
    return {path.relative_to(docs_dir).as_posix(): path.read_text(encoding="utf-8") for path in sorted(docs_dir.rglob("*.md"))}


def _nav_pages(nav) -> list[str]:
    """The page paths of mkdocs.yml's nav, in order (sections hold lists of {title: page or section})."""
    found = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found += _nav_pages(value) if isinstance(value, list) else [value]
    return found


def test_every_sdlora_command_in_the_docs_parses(docs_dir, bash_blocks, shell_commands, sdlora_invocations, capsys):
    checked, failures = 0, []
    for name, text in _pages(docs_dir).items():
        for line_number, block in bash_blocks(text):
            for command in shell_commands(block):
                for args in sdlora_invocations(command):
                    checked += 1
                    try:
                        parsed = build_parser().parse_args(args)
                    except SystemExit as exit_:
                        error = capsys.readouterr().err.strip().splitlines()[-1:]
                        failures.append(f"docs/{name}, block at line {line_number}: sdlora {' '.join(args)}\n  exit {exit_.code}: {error}")
                        continue
                    assert callable(parsed.run)
    assert checked > 10, f"only {checked} sdlora commands found in docs/"
    assert not failures, f"{len(failures)} commands in docs/ do not parse:\n" + "\n".join(failures)


def test_shell_blocks_are_bash(docs_dir):
    pages = _pages(docs_dir)
    other = [f"docs/{name}: {match.group(0).strip()}" for name, text in pages.items() for match in OTHER_SHELL_FENCES.finditer(text)]
    assert not other, "write shell blocks as ```bash, which the command checks read:\n" + "\n".join(other)


def test_nav_lists_every_page_once(docs_dir):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), [page for page in nav if nav.count(page) > 1]
    missing = [page for page in nav if not (docs_dir / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"
    left_out = sorted(set(_pages(docs_dir)) - set(nav))
    assert not left_out, f"pages in docs/ that mkdocs.yml's nav does not list: {left_out}"


def test_the_build_hook_is_not_a_page(docs_dir):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["hooks"] == ["docs/hooks.py"] and (docs_dir / "hooks.py").is_file()
    assert "hooks.py" in config["exclude_docs"].split()
