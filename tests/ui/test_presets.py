"""The training form's presets and model defaults through the API: a preset the UI saves is the config.toml
`sdlora train --config` reads to the TrainConfig the form would start, a config.toml (under a root or uploaded) fills
the form to the TrainConfig the CLI reads from it, and the defaults the form shows follow the model's family."""

from __future__ import annotations

import json
import shutil
import urllib.parse

import pytest

from sdlora.cli import build_parser
from sdlora.config import config_from_args, load_toml
from sdlora.errors import UserError
from sdlora.models.loading import load_pipeline
from sdlora.ui.options import check_options
from sdlora.ui.presets import PRESET_HEADER
from sdlora.ui.roots import Roots

FORM = {
    "data_dir": "data",
    "output_dir": "runs/a",
    "model": "tiny",
    "rank": 4,
    "alpha": 2.5,
    "lr": 3e-4,
    "steps": 7,
    "validation_prompts": ["a red circle", "a blue square"],
    "buckets": False,
    "caption_dropout": 0.1,
    "crop": "random",
}


def _cli(path) -> object:
    """The TrainConfig `sdlora train --config PATH` runs."""
    return config_from_args(build_parser().parse_args(["train", "--config", str(path)]))


def test_a_preset_saved_by_the_ui_runs_as_the_form_would(ui, ui_root):
    _, client = ui
    status, saved = client.post("/api/presets", {"path": "presets/a.toml", "options": FORM})
    assert status == 200 and saved["path"] == str(ui_root / "presets" / "a.toml"), saved
    text = (ui_root / "presets" / "a.toml").read_text()
    assert text == saved["toml"] and text.startswith(PRESET_HEADER)
    submitted = check_options(FORM, Roots([ui_root]))  # what POST /api/jobs starts with this form
    assert _cli(ui_root / "presets" / "a.toml") == submitted
    assert submitted.network.alpha != submitted.network.rank and submitted.data.crop == "random"
    # the downloaded preset is the same text; saved again over its own file
    assert client.post("/api/toml", FORM) == (200, {"toml": text})
    assert client.post("/api/presets", {"path": "presets/a.toml", "options": FORM | {"rank": 8}})[0] == 200
    assert _cli(ui_root / "presets" / "a.toml").network.rank == 8
    # refused, nothing written: a file the UI did not write, a bad form, a path outside the roots, another suffix
    (ui_root / "mine.toml").write_text("# my notes\n")
    status, answer = client.post("/api/presets", {"path": "mine.toml", "options": FORM})
    assert status == 400 and "not a preset this UI wrote" in answer["error"] and (ui_root / "mine.toml").read_text() == "# my notes\n"
    status, answer = client.post("/api/presets", {"path": "presets/b.toml", "options": FORM | {"rank": 0}})
    assert (status, answer["option"]) == (400, "rank") and not (ui_root / "presets" / "b.toml").exists()
    assert client.post("/api/presets", {"path": "../b.toml", "options": FORM})[0] == 403
    assert client.post("/api/presets", {"path": "presets/b.txt", "options": FORM})[0] == 400
    assert not (ui_root.parent / "b.toml").exists() and sorted(p.name for p in (ui_root / "presets").iterdir()) == ["a.toml"]


def test_a_config_toml_fills_the_form_as_the_cli_reads_it(ui, ui_root):
    _, client = ui
    (ui_root / "presets").mkdir()
    # relative paths relative to the file, a [section] table and top-level keys, as `--config` takes them
    written = ui_root / "presets" / "mine.toml"
    written.write_text(
        'data_dir = "../data"\noutput_dir = "../runs/b"\nresume = "latest"\n\n'
        "[network]\nrank = 6\nalpha = 3.0\n\n[optimization]\nsteps = 5\nlr = 2e-4\n"
    )
    status, preset = client.get("/api/presets?path=presets/mine.toml")
    assert status == 200 and preset["left_out"] == ["resume"]  # the page's own Resume button
    options = preset["options"]
    assert options["data_dir"] == str(ui_root / "data") and options["rank"] == 6 and "resume" not in options
    assert client.post("/api/check", options) == (200, {"ok": True})
    assert check_options(options, Roots([ui_root])) == _cli(written).replace(resume=None)
    # uploaded: read as if it lay in the first root, where the form's relative paths start
    uploaded = 'data_dir = "data"\noutput_dir = "runs/c"\n[network]\nrank = 6\nalpha = 3.0\n'
    status, parsed = client.post("/api/presets/parse", {"toml": uploaded, "name": "up.toml"})
    assert status == 200 and parsed["left_out"] == []
    (ui_root / "up.toml").write_text(uploaded)
    assert check_options(parsed["options"], Roots([ui_root])) == _cli(ui_root / "up.toml")
    # what the CLI refuses is refused with its line
    (ui_root / "bad.toml").write_text('[network]\nrank = "four"\n')
    with pytest.raises(UserError) as expected:
        load_toml(ui_root / "bad.toml")
    assert client.get("/api/presets?path=bad.toml") == (400, {"error": str(expected.value)})
    status, answer = client.post("/api/presets/parse", {"toml": "colour = 1\n", "name": "x.toml"})
    assert status == 400 and answer["error"] == f"{ui_root / 'x.toml'}: unknown option 'colour' (see sdlora train --help)"
    assert client.get("/api/presets?path=../elsewhere.toml")[0] == 403
    # the files the page offers to pick: .toml files under the root, none from the UI's state or outside
    (ui_root.parent / "outside.toml").write_text("rank = 4\n")
    (ui_root / "link.toml").symlink_to(ui_root.parent / "outside.toml")
    (ui_root / ".sdlora-ui" / "jobs" / "1").mkdir(parents=True, exist_ok=True)
    (ui_root / ".sdlora-ui" / "jobs" / "1" / "train.toml").write_text("rank = 4\n")
    listed = client.get("/api/presets")[1]["presets"]
    assert listed == ["bad.toml", "up.toml", "presets/mine.toml"]
    assert client.get("/api/presets?path=presets/none.toml")[0] == 404


@pytest.fixture
def model_folders(ui_root, tiny_sdxl_dir, tiny_sd3_dir):
    """models/xl: the tiny SDXL folder with a 512-latent UNet config (1024 px); models/sd3: the tiny SD3 folder."""
    shutil.copytree(tiny_sdxl_dir, ui_root / "models" / "xl")
    config_path = ui_root / "models" / "xl" / "unet" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"sample_size": 512}))
    shutil.copytree(tiny_sd3_dir, ui_root / "models" / "sd3")
    return ui_root / "models"


def test_the_forms_model_defaults_follow_the_models_family(ui, ui_root, model_folders):
    _, client = ui

    def defaults(model: str) -> tuple:
        status, answer = client.get("/api/model?model=" + urllib.parse.quote(model))
        assert status == 200, answer
        return answer["family"], answer["defaults"]

    off = {"buckets": False, "gradient_checkpointing": False}
    assert defaults("tiny") == ("sd1", {"resolution": 64} | off)
    assert defaults("tiny-sdxl") == ("sdxl", {"resolution": 64, "buckets": True, "gradient_checkpointing": False})
    # a folder: its family from model_index.json, its side from the UNet's and VAE's configs (nothing loaded)
    assert defaults("models/xl") == ("sdxl", {"resolution": 1024, "buckets": True, "gradient_checkpointing": True})
    pipe = load_pipeline(str(model_folders / "xl"))  # the side training takes: the loaded UNet's sample size x the VAE's factor
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 1024
    assert defaults("models/sd3") == ("sd3", {"resolution": 64, "buckets": True, "gradient_checkpointing": False})
    assert defaults("someone/some-model") == (None, {"resolution": None, "buckets": None, "gradient_checkpointing": None})
    assert client.get("/api/model?model=../outside")[0] == 403
