"""The one output rule (storage/output_rules.py), the header checks of safetensors_stream.read_header, and what the
next write puts back or cleans after a killed one (atomic.recover_output)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlora.storage import output_rules
from sdlora.storage.atomic import TMP_PREFIX, atomic_dir, atomic_file, recover_output, remove_leftover_temporaries
from sdlora.storage.safetensors_stream import read_header


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A user's folder: their own files, a LoRA, and a model folder."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "wedding.txt").write_text("the day")
    save_file({"w": torch.ones(2)}, str(tmp_path / "my_lora.safetensors"))
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    return tmp_path


def test_an_output_equal_to_inside_or_holding_an_input_is_refused(home):
    lora, model = home / "my_lora.safetensors", home / "model"
    with pytest.raises(ValueError, match="is the input"):
        output_rules.check_output_file(lora, [lora])
    with pytest.raises(ValueError, match="is inside the input"):
        output_rules.check_output_file(model / "unet" / "x.safetensors", [model])
    with pytest.raises(ValueError, match="holds the input"):
        output_rules.check_output_folder(home, [lora])
    with pytest.raises(ValueError, match="holds the input"):
        output_rules.check_output_folder(home, [model])  # the folder that holds --model
    with pytest.raises(ValueError, match="is the input"):
        output_rules.check_output_folder(model, [model])
    with pytest.raises(ValueError, match="is the input"):
        output_rules.check_run_folder(model, [model])
    with pytest.raises(ValueError, match="is inside the input"):
        output_rules.check_image_folder(model / "unet", ["tiny", None, model])
    # a relative spelling of the same path is the same path
    os.chdir(home)
    with pytest.raises(ValueError, match="is the input"):
        output_rules.check_output_file("./photos/../my_lora.safetensors", ["my_lora.safetensors"])


def test_only_what_sdlora_wrote_is_replaced(home):
    with pytest.raises(FileExistsError, match="other files"):
        output_rules.check_output_folder(home / "photos")
    with pytest.raises(FileExistsError, match="not written by sdlora"):
        output_rules.check_output_file(home / "photos" / "wedding.txt")
    with pytest.raises(FileExistsError, match="not written by sdlora"):
        output_rules.check_output_file(home / "my_lora.safetensors")  # someone else's LoRA
    with pytest.raises(FileExistsError, match="other files"):
        output_rules.check_run_folder(home / "photos")
    # a marked folder, a bare model folder (sdlora's layout before markers), an old run, an empty or new folder
    marked = home / "marked"
    marked.mkdir()
    (marked / "anything.bin").write_text("x")
    output_rules.write_marker(marked, "merge", "0.1.0")
    assert json.loads((marked / output_rules.MARKER_FILE).read_text())["command"] == "merge"
    output_rules.check_output_folder(marked)
    output_rules.check_output_folder(home / "model")
    (home / "model" / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError):
        output_rules.check_output_folder(home / "model")  # a model folder with a file of the user's in it
    run = home / "old-run"
    run.mkdir()
    for name in ("config.toml", "metrics.jsonl", "README.md"):
        (run / name).write_text("")
    output_rules.check_run_folder(run)
    (home / "empty").mkdir()
    output_rules.check_output_folder(home / "empty")
    output_rules.check_run_folder(home / "new" / "run")
    # a .safetensors file with the mark may be replaced
    save_file({"w": torch.ones(2)}, str(home / "ours.safetensors"), metadata={output_rules.WRITTEN_BY_KEY: "0.1.0"})
    output_rules.check_output_file(home / "ours.safetensors")
    # an image folder may hold anything: images are only added to it
    output_rules.check_image_folder(home / "photos")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_replace_killed_between_its_renames_is_put_back_by_the_next_write(tmp_path):
    target = tmp_path / "merged"
    # what a SIGKILL between `os.replace(path, old / "x")` and `os.replace(tmp, path)` leaves
    moved_aside = tmp_path / f"{TMP_PREFIX}old-{_dead_pid()}-merged-abc123"
    (moved_aside / "x" / "unet").mkdir(parents=True)
    (moved_aside / "x" / "unet" / "w.safetensors").write_text("old merge")
    half_written = tmp_path / f"{TMP_PREFIX}{_dead_pid()}-merged-def456"
    half_written.mkdir()
    (half_written / "partial").write_text("half")
    other_output = tmp_path / f"{TMP_PREFIX}{_dead_pid()}-other-ghi789"
    other_output.mkdir()
    live = tmp_path / f"{TMP_PREFIX}{os.getppid()}-merged-jkl012.safetensors"  # a live process's write: left alone
    live.write_text("in progress")
    recover_output(target)
    assert (target / "unet" / "w.safetensors").read_text() == "old merge"
    assert not moved_aside.exists() and not half_written.exists()
    assert other_output.exists() and live.exists()  # another output's leftovers wait for a write to that output


def test_atomic_writes_name_their_temporaries_after_process_and_output(tmp_path):
    with atomic_file(tmp_path / "a.safetensors") as tmp:
        assert tmp.name.startswith(f"{TMP_PREFIX}{os.getpid()}-a.safetensors-")
        tmp.write_text("x")
    with atomic_dir(tmp_path / "folder") as tmp:
        assert tmp.name.startswith(f"{TMP_PREFIX}{os.getpid()}-folder-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "folder"]


def test_a_run_folder_cleanup_also_puts_back_a_moved_aside_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    aside = checkpoints / f"{TMP_PREFIX}old-{_dead_pid()}-step-00000010-x1"
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "COMPLETE").write_text("")
    (checkpoints / f"{TMP_PREFIX}delete-zz").mkdir()
    remove_leftover_temporaries(tmp_path)
    assert (checkpoints / "step-00000010" / "COMPLETE").is_file()
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000010"]


def _header_file(path: Path, entries: dict, data: bytes) -> Path:
    text = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize(
    "entries, message",
    [
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12 bytes"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [2]}}, "lacks dtype, shape or data_offsets"),
        ({"a": [1, 2]}, "lacks dtype, shape or data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "invalid data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}, "invalid data_offsets"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, "ends past the end"),
        ({"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
    ],
)
def test_a_lying_header_is_one_line_before_any_tensor_is_read(tmp_path, entries, message):
    path = _header_file(tmp_path / "lying.safetensors", entries, bytes(16))
    with pytest.raises(ValueError, match=message) as caught:
        read_header(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_header_that_is_not_an_object_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a JSON object"):
        read_header(_header_file(tmp_path / "list.safetensors", [1, 2], b""))  # type: ignore[arg-type]


def test_an_honest_header_with_empty_tensors_reads(tmp_path):
    save_file({"empty": torch.zeros(0), "a": torch.ones(3), "b": torch.zeros(2, dtype=torch.float16)}, str(tmp_path / "ok.safetensors"))
    header = read_header(tmp_path / "ok.safetensors")
    assert {name: info.shape for name, info in header.tensors.items()} == {"empty": (0,), "a": (3,), "b": (2,)}
