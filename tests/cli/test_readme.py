"""README.md stays true: its CLI reference is the parser's own help, its `sdlora` commands parse, its links exist,
its set-up lines are the ones CI and newcomers run, and its main job, 5-minute tour and Python example run.

The CLI reference between the `cli-reference` markers is generated from `sdlora.cli.build_parser()`.
After changing an option, rewrite it with:  SDLORA_UPDATE_README=1 python -m pytest tests/cli/test_readme.py
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdlora.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"
HELP_COLUMNS = "100"  # argparse wraps to the terminal width: fixed so the text is the same everywhere
# argparse's help layout changes between Python versions (3.13 lists `-o, --output OUTPUT`); the README is rendered on this one
REFERENCE_PYTHON = (3, 11)
UPDATE_HINT = "SDLORA_UPDATE_README=1 python -m pytest tests/cli/test_readme.py"
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}


# ---------------------------------------------------------------- the CLI reference


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("sdlora's parser has no subcommands")


def _help_text(parser: argparse.ArgumentParser) -> str:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        return parser.format_help().rstrip()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def render_cli_reference() -> str:
    """The README's CLI reference: `sdlora --help`, then each subcommand's `--help`, as markdown."""
    parser = build_parser()
    parts = [
        f"Generated from `sdlora.cli.build_parser()` by `tests/cli/test_readme.py`, which fails when this text and the "
        f"parser differ; `{UPDATE_HINT}` rewrites it.",
        "",
        "### `sdlora`",
        "",
        "```text",
        _help_text(parser),
        "```",
    ]
    for name, sub in _subparsers(parser).items():
        parts += ["", f"### `sdlora {name}`", "", "```text", _help_text(sub), "```"]
    return "\n".join(parts)


def _split_reference(text: str) -> tuple[str, str, str]:
    assert text.count(START) == 1 and text.count(END) == 1, f"README.md must hold {START} and {END} once each"
    head, rest = text.split(START)
    body, tail = rest.split(END)
    return head, body, tail


def test_cli_reference_matches_the_parser():
    text = README.read_text(encoding="utf-8")
    head, body, tail = _split_reference(text)
    expected = "\n" + render_cli_reference() + "\n"
    if body == expected:
        return
    if os.environ.get("SDLORA_UPDATE_README") == "1":
        README.write_text(head + START + expected + END + tail, encoding="utf-8")
        return
    if sys.version_info[:2] != REFERENCE_PYTHON:
        pytest.skip(
            f"argparse lays out help differently on Python {sys.version_info[0]}.{sys.version_info[1]}; the reference is rendered on {REFERENCE_PYTHON[0]}.{REFERENCE_PYTHON[1]}"
        )
    diff = "\n".join(difflib.unified_diff(body.splitlines(), expected.splitlines(), "README.md", "build_parser()", lineterm="", n=1))
    pytest.fail(f"README.md's CLI reference differs from the parser; run `{UPDATE_HINT}`\n{diff[:6000]}")


def test_cli_reference_covers_every_subcommand():
    _, body, _ = _split_reference(README.read_text(encoding="utf-8"))
    for name in _subparsers(build_parser()):
        assert f"### `sdlora {name}`" in body and f"usage: sdlora {name}" in body, name


# ---------------------------------------------------------------- commands shown in the README


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every ```bash block."""
    blocks, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```bash":
            start, index = index + 1, index + 1
            while lines[index].strip() != "```":
                index += 1
            blocks.append((start + 1, "\n".join(lines[start:index])))
        index += 1
    return blocks


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block, `\\` continuations joined; comment lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def sdlora_invocations(command: str) -> list[list[str]]:
    """The arguments after `sdlora` of every `sdlora ...`, `python -m sdlora ...`, `accelerate launch ... -m sdlora`
    or `torchrun ... -m sdlora` segment of a command line (segments split at &&, ||, ;, |)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token in SHELL_OPERATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for words in segments:
        if words and words[0] == "sdlora":
            found.append(words[1:])
        elif "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "sdlora":
            found.append(words[words.index("-m") + 2 :])
    return found


def readme_invocations() -> list[tuple[str, list[str]]]:
    text = README.read_text(encoding="utf-8")
    found = []
    for line_number, block in bash_blocks(text):
        for command in shell_commands(block):
            for args in sdlora_invocations(command):
                found.append((f"README.md block at line {line_number}: {command}", args))
    return found


def test_readme_shows_every_subcommand_in_a_command():
    shown = {args[0] for _, args in readme_invocations() if args}
    missing = set(_subparsers(build_parser())) - shown
    assert not missing, f"no example command in README.md for: {', '.join(sorted(missing))}"


INVOCATIONS = readme_invocations()


@pytest.mark.parametrize("where,args", INVOCATIONS, ids=[" ".join(args)[:50] for _, args in INVOCATIONS])
def test_readme_command_parses(where, args, capsys):
    parser = build_parser()
    try:
        parsed = parser.parse_args(args)
    except SystemExit as exit_:
        pytest.fail(f"{where}\n  does not parse (exit {exit_.code}): {capsys.readouterr().err.strip()}")
    assert callable(parsed.run)


def test_command_parser_finds_chained_and_launched_commands():
    """The parser of README lines itself: a wrong split would make the test above pass on nothing."""
    command = 'pip install -e . && sdlora convert a.safetensors "b c.safetensors" --to kohya; python -m sdlora inspect b.safetensors'
    assert sdlora_invocations(command) == [["convert", "a.safetensors", "b c.safetensors", "--to", "kohya"], ["inspect", "b.safetensors"]]
    launched = "accelerate launch --num_processes 2 -m sdlora train data --steps 3"
    assert sdlora_invocations(launched) == [["train", "data", "--steps", "3"]]
    assert shell_commands("sdlora generate \\\n  --prompt x \\\n  --out o\n# comment\n") == ["sdlora generate --prompt x --out o"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "a", "b", "--to", "a1111"])


# ---------------------------------------------------------------- set-up lines, links


def test_setup_commands_come_first():
    text = README.read_text(encoding="utf-8")
    blocks = bash_blocks(text)
    assert len(blocks) >= 2
    main_job, tests = shell_commands(blocks[0][1]), shell_commands(blocks[1][1])
    assert main_job[0].startswith("pip install") and "sdlora train datasets_examples/" in main_job[0]
    assert tests == ['pip install -e ".[test]" && python -m pytest -q']
    # .ci/run takes the first line with `python -m pytest` (grep -m 1) as CI's test command
    first = next(line for line in text.splitlines() if re.match(r"^[^#]*python -m pytest", line))
    assert first == tests[0]


def test_relative_links_exist():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "README.md links to no file of the repository"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


# ---------------------------------------------------------------- the main job, the tour and the Python example run


def section_blocks(heading: str, language: str) -> list[str]:
    """The ```language blocks under the README heading that starts with `heading`, up to the next heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return re.findall(rf"^```{language}\n(.*?)^```", match.group(1), re.M | re.S)


def workspace(tmp_path: Path) -> Path:
    """A folder that looks like the repository root to the README's relative paths; outputs land in it."""
    (tmp_path / "datasets_examples").symlink_to(ROOT / "datasets_examples", target_is_directory=True)
    return tmp_path


def run_sdlora(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "sdlora", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"sdlora {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_main_job_and_tour_run(tmp_path):
    """The README's first command (without its pip install), then every command of the 5-minute tour, as written."""
    from PIL import Image

    work = workspace(tmp_path)
    main_job = shell_commands(bash_blocks(README.read_text(encoding="utf-8"))[0][1])[0]
    (train_args,) = [args for args in sdlora_invocations(main_job) if args[0] == "train"]
    run_sdlora(train_args, work)
    out = work / train_args[train_args.index("--output") + 1]
    lora_files = sorted(path.name for path in out.glob("*.safetensors"))
    assert "pytorch_lora_weights.safetensors" in lora_files and len(lora_files) == 2, lora_files
    assert (out / "metrics.jsonl").read_text().count('"loss"') >= 1

    (tour,) = section_blocks("A 5-minute tour", "bash")
    printed = {}
    for command in shell_commands(tour):
        for args in sdlora_invocations(command):
            if args != train_args:
                printed[args[0]] = run_sdlora(args, work)
    assert "kohya" in printed["inspect"]
    # the merged model draws what the model with the LoRA loaded draws (same seed, same weight)
    with_lora = np.asarray(Image.open(work / "out/images/00000-1.png"), dtype=np.int16)
    merged = np.asarray(Image.open(work / "out/images-merged/00000-1.png"), dtype=np.int16)
    assert np.abs(with_lora - merged).max() <= 1
    assert len(list((work / "out/images").glob("0000*-*.png"))) == 4 and (work / "out/images/grid.png").is_file()
    # the grid: four weights by the run's three checkpoints, each cell also alone with its parameters
    assert "(4 weight x 3 checkpoint)" in printed["grid"]
    assert len(list((work / "out/grid").glob("000*-1.png"))) == 12
    tagged = Image.open(work / "out/images-tags/00000-1.png").text["parameters"]
    assert tagged.startswith("flatposter, a red house with a blue roof <lora:flat_poster:0.8>") and "Sampler: Euler a" in tagged


@pytest.mark.slow
def test_python_example_runs(tmp_path):
    (example,) = section_blocks("Python API", "python")
    work = workspace(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", example], cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "modules; rank/alpha (4, 8.0)" in result.stdout, result.stdout
    assert (work / "out/api-merged/model_index.json").is_file() and (work / "out/api-diffusers.safetensors").is_file()
