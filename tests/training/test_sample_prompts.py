"""kohya sample-prompt files: every option read as sd-scripts reads it, bad lines refused naming the line, and a
run's samples drawn at each line's size, steps, seed, guidance, sampler and negative prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdlora.inference.adapters import load_lora
from sdlora.inference.generation import generate, parse_parameters
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.training.recipe import train
from sdlora.training.sample_prompts import SamplePrompt, parse_line, read_sample_prompts

EVERY_OPTION = "masterpiece, a red circle --n blurry, low quality --w 64 --h 48 --d 1234 --l 5.5 --s 3 --ss euler_a"


def test_a_line_with_every_option():
    assert parse_line(EVERY_OPTION) == SamplePrompt(
        "masterpiece, a red circle", negative_prompt="blurry, low quality", width=64, height=48, seed=1234, guidance=5.5, steps=3,
        sampler="euler_a",
    )  # fmt: skip
    assert parse_line("just a prompt") == SamplePrompt("just a prompt")
    assert parse_line("a cat --W 128 --S 2").width == 128  # sd-scripts matches the letters in any case


def test_text_and_json_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text(f"# comment\n\n{EVERY_OPTION}\na blue square --d 5\n")
    samples = read_sample_prompts(text)
    assert [s.prompt for s in samples] == ["masterpiece, a red circle", "a blue square"] and samples[1].seed == 5
    as_json = tmp_path / "prompts.json"
    as_json.write_text(json.dumps([{"prompt": "a cat", "negative_prompt": "dog", "width": 64, "height": 48, "seed": 3, "scale": 4.0,
                                    "sample_steps": 2, "sample_sampler": "DDIM"}, "a dog --s 2"]))  # fmt: skip
    first, second = read_sample_prompts(as_json)
    assert first == SamplePrompt("a cat", "dog", 64, 48, 3, 4.0, 2, "DDIM") and second.steps == 2


@pytest.mark.parametrize(
    "content, says",
    [
        ("a cat --q 3", "prompts.txt:1: unknown option --q"),
        ("ok\na cat --w 500", "prompts.txt:2: --w 500 must be a positive multiple of 8"),
        ("a cat --s two", "--s 'two' is not an integer"),
        ("a cat --l", "--l needs a value"),
        ("a cat --w 100000 --h 100000", "prompts.txt:1: --w 100000 is larger than 8192"),
        ("a cat --l 1e30", "prompts.txt:1: --l 1e+30: the guidance scale must be a number from 0 to 100"),
        ("a cat --ss Eulr", "unknown sampler 'Eulr'"),
        (" --w 64", "no prompt"),
        ("# only a comment\n", "holds no prompts"),
    ],
)
def test_bad_lines_are_one_line_naming_the_line(tmp_path, content, says):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    with pytest.raises(ValueError) as caught:
        read_sample_prompts(path)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_json_object_without_a_prompt_is_one_line_naming_it(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"negative_prompt": "blurry", "width": 64}]))
    with pytest.raises(ValueError, match=r"p.json\[1\]: the object has no 'prompt'"):
        read_sample_prompts(path)


def test_json_with_an_unknown_key_or_a_wrong_type(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a", "cfg": 3}]))
    with pytest.raises(ValueError, match="unknown keys cfg"):
        read_sample_prompts(path)
    path.write_text(json.dumps([{"prompt": "a", "width": "64"}]))
    with pytest.raises(ValueError, match="width must be an integer"):
        read_sample_prompts(path)


@pytest.mark.slow
def test_a_run_samples_each_line_at_its_own_settings(tmp_path, dataset, tiny_config):
    prompts = tmp_path / "samples.txt"
    prompts.write_text(f"{EVERY_OPTION}\nsks, a blue circle --w 48 --h 64 --s 2 --d 9 --n green\n")
    out = tmp_path / "out"
    train(tiny_config(dataset, out, steps=2, checkpoint_every=0, sample_prompts=str(prompts), sampler="DPM++ 2M Karras"))
    lines = read_sample_prompts(prompts)
    pipe = build_tiny_pipeline()
    load_lora(pipe, str(out / "pytorch_lora_weights.safetensors"))
    for index, (line, size, sampler) in enumerate(zip(lines, [(64, 48), (48, 64)], ["Euler a", "DPM++ 2M Karras"])):
        path = out / "samples" / f"step-00000002-{index:02d}.png"
        with Image.open(path) as image:
            assert image.size == size
            fields = parse_parameters(image.text["parameters"])
            pixels = np.asarray(image.convert("RGB"))
        assert fields["Prompt"].startswith(line.prompt) and fields["Negative prompt"] == line.negative_prompt
        assert (fields["Steps"], fields["Seed"], fields["Sampler"]) == (str(line.steps), str(line.seed), sampler)
        assert fields["CFG scale"] == f"{line.guidance if line.guidance is not None else 7.5:g}"
        # the image generate makes with the trained LoRA and the line's settings
        pipe.scheduler = build_tiny_pipeline().scheduler
        (alone,) = generate(pipe, line.prompt, line.negative_prompt, steps=line.steps, guidance=line.guidance or 7.5, seed=line.seed,
                            height=line.height, width=line.width, sampler=line.sampler or "DPM++ 2M Karras", progress=False)  # fmt: skip
        assert np.abs(pixels.astype(int) - np.asarray(alone).astype(int)).max() <= 1
    with Image.open(out / "samples" / "step-00000002.png") as grid:
        assert grid.size == (128, 64)  # the two lines' images side by side in cells of the largest size
