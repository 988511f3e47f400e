"""The LoRAs page's image jobs through the API: an X/Y comparison (weights x checkpoints) run as `sdlora grid` in a
job, and a generate box whose `<lora:name:weight>` tag draws what the comparison's cell of that LoRA and weight
draws; both refused in one line, with nothing queued, before anything loads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlora.core.files import write_lora
from sdlora.inference.generation import read_parameters
from sdlora.inference.prompts import LoraTag, find_lora_file


@pytest.fixture
def loras(ui_root, tiny_pipe, random_lora_state):
    """loras/one.safetensors and loras/two.safetensors: two different rank-4, alpha-8 LoRAs of the tiny model (kohya files)."""
    folder = ui_root / "loras"
    folder.mkdir()
    for seed, name in ((1, "one"), (2, "two")):
        write_lora(random_lora_state(tiny_pipe, rank=4, alpha=8.0, seed=seed, std=0.3), folder / f"{name}.safetensors", "kohya")
    return folder


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_an_xy_comparison_and_a_generated_image_run_as_jobs(ui_root, loras, start_ui, client_for, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    server = start_ui(ui_root, parallel=2)  # both jobs at once: most of each is its process starting
    client = client_for(f"http://127.0.0.1:{server.port}")
    grid = {"model": "tiny", "lora_steps": ["loras/one.safetensors", "loras/two.safetensors"], "weights": [0, 0.8],
            "prompts": ["a red circle, flat poster"], "steps": [2], "seeds": [5], "width": 64, "height": 64}  # fmt: skip
    status, answer = client.post("/api/grid", grid)
    assert status == 201
    grid_id = answer["id"]
    tag = {"model": "tiny", "prompt": "a red circle, flat poster <lora:two:0.8>", "lora_dir": "loras", "steps": 2, "seed": 5,
           "width": 64, "height": 64}  # fmt: skip
    status, answer = client.post("/api/generate", tag)
    assert status == 201
    generated_id = answer["id"]
    job = client.wait_for(grid_id, ("done", "failed"), timeout=240)
    assert (job["status"], job["command"], job["error"]) == ("done", "grid", None), client.get(f"/api/jobs/{grid_id}/log")
    assert job["images"][0] == "grid.png" and len(job["images"]) == 5  # the labelled grid and its 4 cells
    status, body, kind = client.raw(f"/api/jobs/{grid_id}/images/grid.png")
    out = server.runner.job_dir(grid_id) / "images"
    assert status == 200 and kind == "image/png" and body == (out / "grid.png").read_bytes()
    cells = {}  # (weight, checkpoint) of each cell, from the parameters `sdlora grid` writes into it
    for name in job["images"][1:]:
        parameters = read_parameters(out / name)
        weight = "0.8" if ":0.8>" in parameters else "0"
        cells[(weight, "one" if "<lora:one:" in parameters else "two")] = _pixels(out / name)
    # weight 0: both checkpoints draw the base model; at 0.8 each its own picture
    assert np.array_equal(cells[("0", "one")], cells[("0", "two")])
    assert np.abs(cells[("0.8", "one")] - cells[("0.8", "two")]).max() > 10
    assert np.abs(cells[("0.8", "two")] - cells[("0", "two")]).max() > 10
    # the generate box's <lora:two:0.8>: the comparison's cell of that LoRA at that weight, pixel for pixel
    job = client.wait_for(generated_id, ("done", "failed"), timeout=240)
    assert (job["status"], job["command"]) == ("done", "generate"), job
    single = [name for name in job["images"] if name != "grid.png"]
    assert len(single) == 1 and job["can_resume"] is False
    generated = server.runner.job_dir(generated_id) / "images" / single[0]
    assert np.array_equal(_pixels(generated), cells[("0.8", "two")])
    assert read_parameters(generated).startswith("a red circle, flat poster <lora:two:0.8>")
    assert client.raw(f"/api/jobs/{generated_id}/images/{single[0]}")[1] == generated.read_bytes()
    assert client.raw(f"/api/jobs/{generated_id}/images/..%2F..%2Fjobs.sqlite")[0] == 404
    assert client.post(f"/api/jobs/{generated_id}/resume")[0] == 400


def test_image_jobs_are_refused_in_one_line_before_anything_is_queued(ui, ui_root, loras, tmp_path):
    _, client = ui
    grid = {"model": "tiny", "lora_steps": ["loras/one.safetensors"], "weights": [0, 1], "prompts": ["a red circle"]}
    with pytest.raises(Exception) as expected:
        find_lora_file(LoraTag("<lora:three:1>", "three", 1.0), loras)
    refused = [
        ("/api/generate", {"prompt": "a circle <lora:three:1>", "lora_dir": "loras"}, 400, str(expected.value)),
        ("/api/generate", {"prompt": "a circle <lora:one:1>"}, 400, "pass --lora-dir DIR"),
        ("/api/generate", {"prompt": "a circle", "lora_dir": "../"}, 403, "outside the UI's folders"),
        ("/api/generate", {"prompt": "a circle", "steps": 2.5}, 400, "steps must be an integer"),
        ("/api/generate", {"prompt": "a circle", "width": 65}, 400, "width"),
        ("/api/generate", {"prompt": ""}, 400, "prompt is required"),
        ("/api/grid", grid | {"lora_steps": [str(tmp_path)]}, 403, "outside the UI's folders"),
        ("/api/grid", grid | {"seeds": [1, 2], "guidance": [3, 5]}, 400, "a grid has two axes"),
        ("/api/grid", grid | {"x": "colour"}, 400, "unknown grid axis 'colour'"),
        ("/api/grid", grid | {"prompts": ["<lora:one:1> x"]}, 400, "pass --lora-dir DIR"),
        ("/api/grid", grid | {"model": "../elsewhere"}, 403, "outside the UI's folders"),
        ("/api/grid", grid | {"weights": list(range(21)), "seeds": list(range(20))}, 400, "at most 400"),
    ]
    for path, body, status, message in refused:
        code, answer = client.post(path, body)
        assert code == status and message in answer["error"] and "\n" not in answer["error"], (body, answer)
    for path in ("/api/grid", "/api/generate"):  # the CSRF token, as on every POST
        assert client.request("POST", path, grid | {"prompt": "a circle"}, {"Content-Type": "application/json"})[0] == 403
    assert client.get("/api/jobs")[1]["jobs"] == []
