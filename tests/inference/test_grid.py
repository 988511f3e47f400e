"""`sdlora grid`: an X/Y plot whose every cell is the image made alone with that cell's settings, labelled in the
picture; checkpoints found in a run's folder; axes chosen from what varies; bad axes are one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlora.cli import main
from sdlora.core.files import write_diffusers, write_kohya
from sdlora.inference.adapters import load_lora, unload_loras
from sdlora.inference.generation import generate, parse_parameters
from sdlora.inference.grid import Checkpoint, GridSpec, find_checkpoints, labelled_grid, make_grid

WEIGHTS = [0.0, 0.4, 0.8, 1.2]


@pytest.fixture
def run_dir(tmp_path, tiny_pipe, random_lora_state):
    """A training run's folder as sdlora writes it: checkpoints/step-*/ with the LoRA beside the raw tensors."""
    run = tmp_path / "run"
    for index, step in enumerate((500, 1000, 1500)):
        folder = run / "checkpoints" / f"step-{step:08d}"
        state = random_lora_state(tiny_pipe, rank=4, alpha=6.0, seed=10 + index, std=0.3)
        write_diffusers(state, folder / "pytorch_lora_weights.safetensors")
        write_kohya(state, folder / "lora.safetensors")
        (folder / "trainable.safetensors").write_bytes(b"not a LoRA")
        (folder / "COMPLETE").write_text("{}")
    write_diffusers(random_lora_state(tiny_pipe, seed=99), run / "pytorch_lora_weights.safetensors")
    return run


def test_checkpoints_are_found_in_a_run_folder_in_step_order(run_dir, tmp_path):
    found = find_checkpoints([run_dir])
    assert [c.label for c in found] == ["step 500", "step 1000", "step 1500"]
    assert all(c.path.name == "pytorch_lora_weights.safetensors" for c in found)
    assert find_checkpoints([run_dir / "checkpoints"]) == found
    single = run_dir / "checkpoints" / "step-00001000" / "lora.safetensors"
    assert find_checkpoints([single]) == [Checkpoint("lora", single)]
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("style-10.safetensors", "style-2.safetensors"):
        (loose / name).write_bytes(b"x")
    assert [c.label for c in find_checkpoints([loose])] == ["style-2", "style-10"]  # natural order
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no step-\\* checkpoints"):
        find_checkpoints([tmp_path / "empty"])


def _alone(pipe, path, weight, seed, **settings):
    unload_loras(pipe)
    load_lora(pipe, str(path), scale=weight)
    (image,) = generate(pipe, "a red circle", seed=seed, progress=False, **settings)
    unload_loras(pipe)
    return np.asarray(image)


@pytest.mark.slow
def test_a_grid_of_four_weights_by_three_checkpoints_equals_each_image_made_alone(run_dir, tmp_path, tiny_pipe):
    out = tmp_path / "grid"
    argv = ["grid", "--model", "tiny", "--lora-steps", str(run_dir), "--weights", ",".join(map(str, WEIGHTS)),
            "--prompt", "a red circle", "--seed", "7", "--steps", "3", "--sampler", "Euler a", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    files = sorted(p for p in out.iterdir() if p.name != "grid.png")
    assert len(files) == 12 and (out / "grid.png").is_file()
    checkpoints = find_checkpoints([run_dir])
    spec = GridSpec(prompts=["a red circle"], weights=WEIGHTS, checkpoints=checkpoints, seeds=[7], samplers=["Euler a"], steps=[3])
    grid = make_grid(tiny_pipe, spec, model_name="tiny", progress=False)
    assert (grid.x, grid.y) == ("weight", "checkpoint")
    assert grid.x_labels == ["0", "0.4", "0.8", "1.2"] and grid.y_labels == ["step 500", "step 1000", "step 1500"]
    with Image.open(out / "grid.png") as picture:
        picture = np.asarray(picture.convert("RGB"))
    np.testing.assert_array_equal(picture, np.asarray(grid.image))  # the CLI drew the same picture
    for r, checkpoint in enumerate(checkpoints):
        for c, weight in enumerate(WEIGHTS):
            alone = _alone(tiny_pipe, checkpoint.path, weight, 7, steps=3, sampler="Euler a")
            np.testing.assert_array_equal(np.asarray(grid.cells[r][c]), alone, err_msg=f"{checkpoint.label} at {weight}")
            with Image.open(files[r * len(WEIGHTS) + c]) as single:
                np.testing.assert_array_equal(np.asarray(single.convert("RGB")), alone)
                fields = parse_parameters(single.text["parameters"])
            assert fields["Seed"] == "7" and fields["Steps"] == "3" and fields["Sampler"] == "Euler a"
            assert fields["Prompt"].endswith(f":{weight:g}>")
            x, y = grid.boxes[r][c]
            np.testing.assert_array_equal(picture[y : y + 64, x : x + 64], alone)
    # weights and checkpoints change the picture (a grid of copies would pass the checks above)
    assert not np.array_equal(np.asarray(grid.cells[0][0]), np.asarray(grid.cells[0][3]))
    assert not np.array_equal(np.asarray(grid.cells[0][3]), np.asarray(grid.cells[2][3]))
    # labels are drawn in the picture: dark pixels above every column and left of every row, none over the cells
    top = grid.boxes[0][0][1]
    for c in range(len(WEIGHTS)):
        x = grid.boxes[0][c][0]
        assert (picture[:top, x - 8 : x + 72] < 100).any(), f"no label above column {c}"
    for r in range(3):
        y = grid.boxes[r][0][1]
        assert (picture[y : y + 64, : grid.boxes[0][0][0]] < 100).any(), f"no label left of row {r}"


@pytest.mark.slow
def test_seed_and_sampler_axes_without_a_lora(tiny_pipe):
    spec = GridSpec(prompts=["a blue square"], seeds=[1, 2], samplers=["DDIM", "DPM++ 2M Karras", "UniPC"], steps=[2])
    grid = make_grid(tiny_pipe, spec, progress=False)
    assert (grid.x, grid.y) == ("seed", "sampler")
    for r, sampler in enumerate(spec.samplers):
        for c, seed in enumerate(spec.seeds):
            (alone,) = generate(tiny_pipe, "a blue square", steps=2, seed=seed, sampler=sampler, progress=False)
            np.testing.assert_array_equal(np.asarray(grid.cells[r][c]), np.asarray(alone))
            assert parse_parameters(grid.cells[r][c].info["parameters"])["Sampler"] == sampler


def test_axes_are_chosen_from_what_varies_and_bad_axes_are_refused():
    ckpt = [Checkpoint("a", None), Checkpoint("b", None)]
    assert GridSpec(prompts=["p"], weights=[0, 1], checkpoints=ckpt).check() == ("weight", "checkpoint")
    assert GridSpec(prompts=["p", "q"], steps=[10, 20]).check() == ("prompt", "steps")
    assert GridSpec(prompts=["p"], steps=[10, 20], x="guidance", y="steps").check() == ("guidance", "steps")
    assert GridSpec(prompts=["p"], seeds=[1, 2, 3]).check() == ("seed", None)
    for spec, says in [
        (GridSpec(prompts=["p"], weights=[0, 1], checkpoints=ckpt, seeds=[1, 2]), "two axes"),
        (GridSpec(prompts=["p"], weights=[0, 1]), "--lora-steps"),
        (GridSpec(prompts=[]), "no values"),
        (GridSpec(prompts=["p"], x="colour"), "unknown grid axis"),
        (GridSpec(prompts=["p"], x="seed", y="seed"), "both"),
        (GridSpec(prompts=["p"], samplers=["Eulr"]), "unknown sampler"),
        (GridSpec(prompts=["p"], guidance=[1.0, float("inf")]), "--guidance inf: the guidance scale must be a number from 0 to 100"),
        (GridSpec(prompts=["p"], weights=[1e30]), r"--weights: a LoRA weight must be a finite number between -100 and 100"),
        (GridSpec(prompts=["p"], loras=[("x.safetensors", -200.0)]), r"--lora x.safetensors: a LoRA weight must be"),
    ]:
        with pytest.raises(ValueError, match=says):
            spec.check()


def test_labels_wrap_for_small_cells_and_stay_inside_the_picture():
    cells = [[Image.new("RGB", (32, 24), "red")] * 2]
    picture, boxes = labelled_grid(cells, "Prompt", ["a very long prompt about a red circle on a field", "short"], "Seed", ["1"])
    array = np.asarray(picture)
    (x0, y0), (x1, _) = boxes[0]
    assert x1 - x0 >= 32 and y0 > 12  # columns wide enough to read, a header above
    assert (array[:y0] < 100).any() and (array[y0:, :x0] < 100).any()
    assert (array[y0 : y0 + 24, x0 : x0 + 32] == [255, 0, 0]).all()
