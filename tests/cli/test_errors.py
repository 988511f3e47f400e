"""How the command line ends on an error: a UserError or an OSError is one line and exit 2; any other exception is
unexpected, one line that says so with the --debug hint, exit 1; `--debug` (before or after the command) and
SDLORA_DEBUG=1 let it through with its traceback; Ctrl-C is exit 130."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sdlora import cli
from sdlora.errors import UserError


@pytest.fixture
def fails_with(monkeypatch):
    """Make `tiny-model` raise `error` (the command is a one-call stand-in for any command's run)."""

    def make(error: BaseException) -> None:
        def raise_it(*args, **kwargs):
            raise error

        monkeypatch.setattr(cli, "write_tiny_model", raise_it)

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    return make


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_a_user_error_is_one_line_and_exit_2(fails_with, capsys, tmp_path):
    fails_with(UserError("--thing 3: must be at most 2"))
    assert cli.main(["tiny-model", str(tmp_path / "model")]) == cli.EXIT_USER_ERROR == 2
    assert stderr_lines(capsys) == ["sdlora tiny-model: error: --thing 3: must be at most 2"]


def test_a_real_user_error_from_sdloras_own_check(capsys, tmp_path):
    assert cli.main(["resize", str(tmp_path / "lora.safetensors"), "--rank", "0", "--out", str(tmp_path / "out.safetensors")]) == 2
    assert stderr_lines(capsys) == ["sdlora resize: error: --rank and --conv-rank must be at least 1"]


def test_an_os_error_is_the_users_environment_one_line_and_exit_2(fails_with, capsys, tmp_path):
    fails_with(PermissionError(13, "Permission denied", str(tmp_path / "model")))
    assert cli.main(["tiny-model", str(tmp_path / "model")]) == 2
    assert stderr_lines(capsys) == [f"sdlora tiny-model: error: Permission denied: {tmp_path / 'model'}"]


@pytest.mark.parametrize(
    "error, shown",
    [
        (RuntimeError("boom"), "RuntimeError: boom"),
        (ValueError("a library's own ValueError"), "ValueError: a library's own ValueError"),  # not a UserError
        (KeyError("unet"), "KeyError: 'unet'"),
        (RuntimeError("first line\n  second line\n"), "RuntimeError: first line"),
        (RuntimeError(), "RuntimeError"),
    ],
)
def test_an_unexpected_error_is_one_line_with_the_debug_hint_and_exit_1(fails_with, capsys, tmp_path, error, shown):
    fails_with(error)
    assert cli.main(["tiny-model", str(tmp_path / "model")]) == cli.EXIT_UNEXPECTED == 1
    lines = stderr_lines(capsys)
    assert lines == [f"sdlora tiny-model: unexpected error: {shown}; run with --debug (or SDLORA_DEBUG=1) for the traceback"]


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_debug_lets_the_error_through(fails_with, tmp_path, where):
    fails_with(RuntimeError("boom"))
    argv = (
        ["--debug", "tiny-model", str(tmp_path / "model")]
        if where == "before the command"
        else ["tiny-model", str(tmp_path / "model"), "--debug"]
    )
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(argv)


def test_debug_lets_a_user_error_through_too(fails_with, tmp_path):
    fails_with(UserError("bad input"))
    with pytest.raises(UserError, match="bad input"):
        cli.main(["--debug", "tiny-model", str(tmp_path / "model")])


@pytest.mark.parametrize("value, debug", [("1", True), ("yes", True), ("0", False), ("", False), ("false", False)])
def test_sdlora_debug_in_the_environment(fails_with, monkeypatch, capsys, tmp_path, value, debug):
    fails_with(RuntimeError("boom"))
    monkeypatch.setenv(cli.DEBUG_ENV, value)
    if debug:
        with pytest.raises(RuntimeError, match="boom"):
            cli.main(["tiny-model", str(tmp_path / "model")])
    else:
        assert cli.main(["tiny-model", str(tmp_path / "model")]) == 1
        assert len(stderr_lines(capsys)) == 1


def test_debug_is_off_unless_asked():
    assert cli.build_parser().parse_args(["tiny-model", "x"]).debug is False
    assert cli.build_parser().parse_args(["--debug", "tiny-model", "x"]).debug is True
    assert cli.build_parser().parse_args(["tiny-model", "x", "--debug"]).debug is True


@pytest.mark.parametrize("debug", [False, True])
def test_ctrl_c_is_exit_130(fails_with, capsys, tmp_path, debug):
    fails_with(KeyboardInterrupt())
    assert cli.main([*(["--debug"] if debug else []), "tiny-model", str(tmp_path / "model")]) == cli.EXIT_INTERRUPTED == 130
    assert stderr_lines(capsys) == ["sdlora: interrupted"]


# what a user sees: the console script's process, with the library failing where sdlora did not foresee it
FAILING_RUN = """
import sys
from sdlora import cli
def fail(*args, **kwargs):
    raise RuntimeError("boom")
cli.write_tiny_model = fail
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("debug", ["none", "--debug", "SDLORA_DEBUG=1"])
def test_the_process_prints_the_traceback_only_when_debugging(tmp_path, debug):
    env = {key: value for key, value in os.environ.items() if key != cli.DEBUG_ENV}
    argv = ["tiny-model", str(tmp_path / "model")] + (["--debug"] if debug == "--debug" else [])
    if debug == "SDLORA_DEBUG=1":
        env[cli.DEBUG_ENV] = "1"
    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN)
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    if debug == "none":
        assert result.stderr.strip().splitlines() == [
            "sdlora tiny-model: unexpected error: RuntimeError: boom; run with --debug (or SDLORA_DEBUG=1) for the traceback"
        ]
    else:
        assert "Traceback (most recent call last)" in result.stderr
        assert 'raise RuntimeError("boom")' in result.stderr and result.stderr.strip().endswith("RuntimeError: boom")
