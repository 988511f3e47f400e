"""`sdlora convert` and `sdlora inspect`: the happy path, every format through inspect, and bad input that must
end in one line on stderr, exit code 2, no traceback and no file left behind."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.cli import main
from sdlora.core import formats
from sdlora.core.families import SD1
from sdlora.core.files import write_kohya
from sdlora.storage.atomic import TMP_PREFIX

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _sdlora(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sdlora", *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


class _RunsCode:
    """Unpickling this runs a shell command, as a malicious .ckpt would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- bad input, all cases run side by side


def _bad_inputs(folder: Path, good: Path) -> dict[str, tuple[Path, list[str]]]:
    """{case: (input file, extra arguments)}; the output is always out_<case>/lora.safetensors."""
    cases: dict[str, tuple[Path, list[str]]] = {}
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (truncated, [])
    renamed = folder / "notes.safetensors"
    renamed.write_text("these are my notes, not a LoRA\n")
    cases["text-renamed"] = (renamed, [])
    noise = folder / "noise.safetensors"
    noise.write_bytes(os.urandom(4096))
    cases["random-bytes"] = (noise, [])
    unknown = folder / "unknown.safetensors"
    save_file({"encoder.conv.weight": torch.ones(2, 2)}, str(unknown))
    cases["unknown-keys"] = (unknown, [])
    stray = folder / "stray.safetensors"
    save_file({**_tensors(good), "lora_unet_foo.weird": torch.ones(1)}, str(stray))
    cases["stray-key"] = (stray, [])
    for suffix in (".bin", ".ckpt"):
        pickled = folder / f"lora{suffix}"
        torch.save(_tensors(good), pickled)
        cases[f"pickle{suffix}"] = (pickled, [])
    evil = folder / "evil.ckpt"
    with open(evil, "wb") as handle:
        pickle.dump({"lora_unet_a.lora_down.weight": torch.ones(1, 1), "x": _RunsCode(folder / "MARKER")}, handle)
    cases["code-running-pickle"] = (evil, ["--allow-pickle"])
    cases["missing"] = (folder / "missing.safetensors", [])
    return cases


BAD_CASES = ["truncated", "text-renamed", "random-bytes", "unknown-keys", "stray-key", "pickle.bin", "pickle.ckpt",
             "code-running-pickle", "missing", "output-is-folder", "inspect-text-renamed", "inspect-pickle"]  # fmt: skip
EXPECTED_REASON = {
    "truncated": "truncated", "text-renamed": "not a readable .safetensors", "random-bytes": "not a readable .safetensors",
    "unknown-keys": "unknown LoRA format", "stray-key": "lora_unet_foo.weird", "pickle.bin": "--allow-pickle",
    "pickle.ckpt": "--allow-pickle", "code-running-pickle": "could run code", "missing": "not found",
    "output-is-folder": "is a folder", "inspect-text-renamed": "not a readable", "inspect-pickle": "--allow-pickle",
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory, random_lora_state) -> tuple[Path, dict[str, tuple[list[str], Path]]]:
    """{case: (sdlora arguments, the file the error must name)}; case X may write only into out_X/."""
    from sdlora.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("bad")
    good = write_kohya(random_lora_state(build_tiny_pipeline(), rank=4, alpha=8.0), folder / "good.safetensors")
    cases = {}
    for case, (source, extra) in _bad_inputs(folder, good).items():
        cases[case] = (["convert", str(source), str(folder / f"out_{case}" / "lora.safetensors"), "--to", "kohya", *extra], source)
    in_the_way = folder / "out_output-is-folder" / "lora.safetensors"
    cases["output-is-folder"] = (["convert", str(good), str(in_the_way), "--to", "diffusers"], in_the_way)
    cases["inspect-text-renamed"] = (["inspect", str(folder / "notes.safetensors")], folder / "notes.safetensors")
    cases["inspect-pickle"] = (["inspect", "--json", str(folder / "lora.bin")], folder / "lora.bin")
    _fresh_output_folders(folder)
    return folder, cases


def _fresh_output_folders(folder: Path) -> None:
    for case in BAD_CASES:
        shutil.rmtree(folder / f"out_{case}", ignore_errors=True)
        (folder / f"out_{case}").mkdir()
    (folder / "out_output-is-folder" / "lora.safetensors").mkdir()


@pytest.fixture(scope="module")
def subprocess_runs(bad_cases) -> dict[str, tuple[int, str, str]]:
    """Every case as a real `python -m sdlora` process, all started at once (each start imports torch)."""
    folder, cases = bad_cases
    _fresh_output_folders(folder)
    processes = {case: _sdlora(*argv) for case, (argv, _) in cases.items()}
    return {case: _finish(process) for case, process in processes.items()}


def _check_bad_run(folder: Path, case: str, source: Path, code: int, stdout: str, stderr: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr + stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert str(source) in lines[0] and EXPECTED_REASON[case] in lines[0]
    assert lines[0].startswith(("sdlora convert: error: ", "sdlora inspect: error: "))
    out_dir = folder / f"out_{case}"
    left = sorted(p.name for p in out_dir.iterdir())
    assert left == (["lora.safetensors"] if case == "output-is-folder" else [])  # only the folder that was in the way
    assert not any(p.name.startswith(TMP_PREFIX) for p in folder.rglob("*"))
    assert not (folder / "MARKER").exists()


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_in_process(bad_cases, capsys, case):
    folder, cases = bad_cases
    argv, source = cases[case]
    code = main(argv)
    captured = capsys.readouterr()
    _check_bad_run(folder, case, source, code, captured.out, captured.err)


@pytest.mark.slow  # a dozen interpreter starts, about 20 s of CPU in all
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_as_a_real_process(bad_cases, subprocess_runs, case):
    folder, cases = bad_cases
    _check_bad_run(folder, case, cases[case][1], *subprocess_runs[case])


# ---------------------------------------------------------------- happy paths


@pytest.mark.slow  # three interpreter starts, one importing diffusers to write through save_lora_weights
def test_convert_to_kohya_and_back_keeps_every_tensor(tmp_path, tiny_pipe, random_lora_state):
    from sdlora.core.files import write_diffusers

    state = random_lora_state(tiny_pipe, rank=4, alpha=3.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"))
    source = write_diffusers(state, tmp_path / "a.safetensors")
    code, stdout, stderr = _finish(_sdlora("convert", source, tmp_path / "b.safetensors", "--to", "kohya"))
    assert code == 0, stderr
    assert f"wrote {len(state)} modules as kohya" in stdout
    code, _, stderr = _finish(_sdlora("convert", tmp_path / "b.safetensors", tmp_path / "c.safetensors", "--to", "diffusers"))
    assert code == 0, stderr
    before, after = _tensors(source), _tensors(tmp_path / "c.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    kohya = _tensors(tmp_path / "b.safetensors")
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {3.0}
    code, stdout, _ = _finish(_sdlora("inspect", "--json", tmp_path / "b.safetensors"))
    info = json.loads(stdout)
    assert code == 0 and (info["format"], info["rank"], info["alpha"]) == ("kohya", 4, 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]


def test_convert_pickle_with_the_flag_and_a_dtype(tmp_path, capsys, lora_state):
    from sdlora.core.files import read_lora

    torch.save(formats.to_kohya(lora_state, SD1), tmp_path / "lora.bin")
    assert (
        main(
            ["convert", str(tmp_path / "lora.bin"), str(tmp_path / "out.safetensors"), "--to", "kohya", "--allow-pickle", "--dtype", "fp16"]
        )
        == 0
    )
    back = read_lora(tmp_path / "out.safetensors")
    assert back.dtype() == torch.float16 and sorted(back.modules) == sorted(lora_state.modules)
    assert all(torch.equal(back.modules[p].down, m.down.half()) and back.modules[p].alpha == 8.0 for p, m in lora_state.modules.items())
    assert "wrote" in capsys.readouterr().out


def test_convert_from_overrides_detection(tmp_path, capsys, write_format_file):
    path = write_format_file(tmp_path, formats.KOHYA)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "kohya", "--from", "peft"]) == 2
    assert "maps to no module" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "kohya", "--from", "kohya"]) == 0


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_inspect_each_format(tmp_path, capsys, fmt, write_format_file, format_rank_alpha):
    RANK, EXPECTED_ALPHA = format_rank_alpha
    path = write_format_file(tmp_path, fmt, cross_width=1024, text_width=1024)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"format:        {fmt}\n" in text and "architecture:  SD2.x\n" in text
    assert f"rank:          {RANK}\n" in text and f"alpha:         {EXPECTED_ALPHA[fmt]:g}\n" in text
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["architecture"], info["rank"], info["alpha"]) == (fmt, "SD2.x", RANK, EXPECTED_ALPHA[fmt])
    assert info["file"] == str(path)


def test_inspect_sdxl_kohya(tmp_path, capsys, write_format_file):
    path = write_format_file(tmp_path, formats.KOHYA_LDM, cross_width=2048, text_width=768, text2_width=1280)
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "SDXL" and info["components"] == {"unet": 2, "text_encoder": 1, "text_encoder_2": 1}


def test_inspect_subprocess_prints_to_stdout_only(tmp_path, write_format_file):
    path = write_format_file(tmp_path, formats.KOHYA)
    code, stdout, stderr = _finish(_sdlora("inspect", path))
    assert code == 0 and stderr == ""
    assert "architecture:  SD1.x" in stdout and "ss_network_dim: 4" in stdout
