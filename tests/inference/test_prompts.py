"""A1111's `<lora:NAME:WEIGHT>` prompt syntax: tags leave the prompt, find their files by stem, and give exactly
the image of the same LoRAs passed with --lora; malformed tags and missing files are one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlora.cli import main
from sdlora.core.files import write_kohya
from sdlora.inference.generation import read_parameters
from sdlora.inference.prompts import LoraTag, find_lora_file, lora_files, split_lora_tags


@pytest.mark.parametrize(
    "prompt, text, tags",
    [
        ("a cat, <lora:ink:0.8>, dusk", "a cat, dusk", [("ink", 0.8)]),
        ("<lora:ink:0.5> a cat", "a cat", [("ink", 0.5)]),
        ("a cat <lora:ink>", "a cat", [("ink", 1.0)]),  # A1111's default weight
        ("a <lora:ink:1><LORA:Poster:-0.25> cat", "a cat", [("ink", 1.0), ("Poster", -0.25)]),
        ("a cat,<lora:ink:1> at dusk", "a cat, at dusk", [("ink", 1.0)]),
        ("no tags, here", "no tags, here", []),
    ],
)
def test_tags_leave_the_prompt_with_their_separators(prompt, text, tags):
    cleaned, found = split_lora_tags(prompt)
    assert cleaned == text
    assert [(tag.name, tag.weight) for tag in found] == tags
    assert "<" not in cleaned


@pytest.mark.parametrize(
    "prompt, says",
    [
        ("a <lora:>", "names no LoRA"),
        ("a <lora:ink:>", "not a number"),
        ("a <lora:ink:strong>", "not a number"),
        ("a <lora:ink:inf>", "finite"),
        ("a <lora:ink:1e30>", "a LoRA weight must be a finite number between -100 and 100, got 1e+30"),
        ("a <lora:ink:1:0.5>", "only <lora:NAME:WEIGHT>"),
        ("a <lora:ink:te=1>", "only <lora:NAME:WEIGHT>"),
    ],
)
def test_malformed_tags_are_one_line_naming_the_tag(prompt, says):
    with pytest.raises(ValueError) as caught:
        split_lora_tags(prompt)
    message = str(caught.value)
    assert says in message and "\n" not in message and message.startswith("<lora:")


def test_files_are_found_by_stem_in_subfolders_exactly_then_ignoring_case(tmp_path):
    (tmp_path / "styles").mkdir()
    ink = tmp_path / "styles" / "Ink.safetensors"
    ink.write_bytes(b"x")
    (tmp_path / "poster.ckpt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    assert set(lora_files(tmp_path)) == {"Ink", "poster"}
    assert find_lora_file(LoraTag("<lora:Ink:1>", "Ink", 1.0), tmp_path) == ink
    assert find_lora_file(LoraTag("<lora:ink:1>", "ink", 1.0), tmp_path) == ink
    with pytest.raises(ValueError, match="close matches: poster"):
        find_lora_file(LoraTag("<lora:postr:1>", "postr", 1.0), tmp_path)
    (tmp_path / "styles" / "deeper").mkdir()
    (tmp_path / "styles" / "deeper" / "Ink.safetensors").write_bytes(b"x")  # a checkpoint's copy, further down
    assert find_lora_file(LoraTag("<lora:Ink:1>", "Ink", 1.0), tmp_path) == ink
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "Ink.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="several files"):
        find_lora_file(LoraTag("<lora:Ink:1>", "Ink", 1.0), tmp_path)
    with pytest.raises(ValueError, match="--lora-dir"):
        find_lora_file(LoraTag("<lora:Ink:1>", "Ink", 1.0), None)


@pytest.fixture
def lora_dir(tmp_path, tiny_pipe, random_lora_state):
    folder = tmp_path / "loras"
    write_kohya(random_lora_state(tiny_pipe, rank=4, alpha=8.0, seed=1), folder / "ink.safetensors")
    write_kohya(random_lora_state(tiny_pipe, rank=2, alpha=3.0, seed=2, text_encoder=False), folder / "sub" / "poster.safetensors")
    return folder


def _generate(out, prompt, *extra):
    assert main(["generate", "--model", "tiny", "--prompt", prompt, "--steps", "2", "--seed", "4", "--out", str(out), *extra]) == 0
    path = out / "00000-4.png"
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), read_parameters(path)


@pytest.mark.slow
def test_tags_give_the_image_of_the_same_loras_passed_with_lora(tmp_path, lora_dir, monkeypatch):
    from transformers import CLIPTokenizer  # the tiny model's tokenizer class: what reaches the text encoder

    seen: list[str] = []
    original = CLIPTokenizer.__call__

    def recording(self, text=None, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else list(text or []))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(CLIPTokenizer, "__call__", recording)
    tagged, tagged_text = _generate(tmp_path / "a", "a cat, <lora:ink:0.7>, <lora:poster:-0.4> at dusk", "--lora-dir", str(lora_dir))
    assert seen and all("<lora" not in text and "ink" not in text for text in seen), seen
    assert "a cat, at dusk" in seen
    flags, flags_text = _generate(tmp_path / "b", "a cat, at dusk", "--lora", f"{lora_dir / 'ink.safetensors'}:0.7",
                                  "--lora", f"{lora_dir / 'sub' / 'poster.safetensors'}:-0.4")  # fmt: skip
    np.testing.assert_array_equal(tagged, flags)
    assert tagged_text == flags_text
    assert tagged_text.splitlines()[0] == "a cat, at dusk <lora:ink:0.7> <lora:poster:-0.4>"
    # a tag beside --lora: the --lora files first, then the tags, as if all were --lora
    mixed, _ = _generate(tmp_path / "c", "a cat, at dusk <lora:poster:-0.4>", "--lora", f"{lora_dir / 'ink.safetensors'}:0.7",
                         "--lora-dir", str(lora_dir))  # fmt: skip
    np.testing.assert_array_equal(mixed, flags)
    base, _ = _generate(tmp_path / "d", "a cat, at dusk")
    assert not np.array_equal(base, flags)
