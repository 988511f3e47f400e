"""README.md stays true: it is small, its `sdlora` commands parse, its links exist, its set-up lines are the ones CI
and newcomers run, and its main job and 5-minute tour run as written. (The CLI reference is the site's, generated
at build time: tests/docs/test_reference.py.)"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest

from sdlora.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_BYTES = 15_000  # the front door; the rest is in the site (docs/, mkdocs.yml)


def _subcommands() -> set[str]:
    (action,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return set(action.choices)


def _readme_invocations(bash_blocks, shell_commands, sdlora_invocations) -> list[tuple[str, list[str]]]:
    found = []
    for line_number, block in bash_blocks(README.read_text(encoding="utf-8")):
        for command in shell_commands(block):
            for args in sdlora_invocations(command):
                found.append((f"README.md block at line {line_number}: {command}", args))
    return found


def test_readme_is_the_front_door():
    size = len(README.read_bytes())
    assert size < MAX_README_BYTES, f"README.md is {size} bytes; keep it under {MAX_README_BYTES} and move the rest into docs/"


def test_readme_shows_every_subcommand_in_a_command(bash_blocks, shell_commands, sdlora_invocations):
    shown = {args[0] for _, args in _readme_invocations(bash_blocks, shell_commands, sdlora_invocations) if args}
    missing = _subcommands() - shown
    assert not missing, f"no example command in README.md for: {', '.join(sorted(missing))}"


def test_readme_commands_parse(bash_blocks, shell_commands, sdlora_invocations, capsys):
    invocations = _readme_invocations(bash_blocks, shell_commands, sdlora_invocations)
    assert invocations
    failures = []
    for where, args in invocations:
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit as exit_:
            failures.append(f"{where}\n  does not parse (exit {exit_.code}): {capsys.readouterr().err.strip()}")
            continue
        assert callable(parsed.run)
    assert not failures, "\n".join(failures)


def test_command_parser_finds_chained_and_launched_commands(sdlora_invocations, shell_commands):
    """The parser of README lines itself: a wrong split would make the test above pass on nothing."""
    command = 'pip install -e . && sdlora convert a.safetensors "b c.safetensors" --to kohya; python -m sdlora inspect b.safetensors'
    assert sdlora_invocations(command) == [["convert", "a.safetensors", "b c.safetensors", "--to", "kohya"], ["inspect", "b.safetensors"]]
    launched = "accelerate launch --num_processes 2 -m sdlora train data --steps 3"
    assert sdlora_invocations(launched) == [["train", "data", "--steps", "3"]]
    assert shell_commands("sdlora generate \\\n  --prompt x \\\n  --out o\n# comment\n") == ["sdlora generate --prompt x --out o"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "a", "b", "--to", "a1111"])


# ---------------------------------------------------------------- set-up lines, links


def test_setup_commands_come_first(bash_blocks, shell_commands):
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


def test_readme_links_into_the_site():
    """The pages the README sends readers to are the site's (GitHub shows docs/*.md as they are)."""
    text = README.read_text(encoding="utf-8")
    for page in ("docs/getting-started.md", "docs/reference/cli.md", "docs/reference/training-options.md", "docs/troubleshooting.md"):
        assert f"]({page})" in text, page


# ---------------------------------------------------------------- the main job and the tour run


def section_blocks(heading: str, language: str) -> list[str]:
    """The ```language blocks under the README heading that starts with `heading`, up to the next heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return re.findall(rf"^```{language}\n(.*?)^```", match.group(1), re.M | re.S)


@pytest.mark.slow
def test_main_job_and_tour_run(tmp_path, bash_blocks, shell_commands, sdlora_invocations, repo_workspace, run_sdlora, train_once):
    """The README's first command (without its pip install), then every command of the 5-minute tour, as written."""
    from PIL import Image

    work = repo_workspace(tmp_path)
    main_job = shell_commands(bash_blocks(README.read_text(encoding="utf-8"))[0][1])[0]
    (train_args,) = [args for args in sdlora_invocations(main_job) if args[0] == "train"]
    train_once(train_args, work)
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
