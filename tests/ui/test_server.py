"""The UI's server through its HTTP API on a real port: bound to 127.0.0.1 by default, credentials and the CSRF
token, the training form from TrainConfig, a bad option refused with the CLI's message before anything starts,
and no path outside the roots read or written."""

from __future__ import annotations

import base64
import os
import urllib.parse

import pytest

from sdlora.cli import build_parser, main
from sdlora.config import load_toml
from sdlora.errors import UserError
from sdlora.training.config import SECTIONS, TrainConfig, option_fields
from sdlora.ui.server import make_server


def test_binds_localhost_by_default_and_refuses_another_address_without_auth(tmp_path, capsys):
    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"
    server = make_server(port=0, roots=[str(tmp_path)], state_dir=str(tmp_path / "state"))
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    with pytest.raises(UserError, match="--auth USER:PASS"):
        make_server(host="0.0.0.0", port=0, roots=[str(tmp_path)], state_dir=str(tmp_path / "state"))
    assert main(["ui", "--listen", "0.0.0.0", "--port", "0", "--root", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("sdlora ui: error: --host 0.0.0.0") and "--auth" in error and "\n" not in error


def test_auth_on_every_request_when_listening_beyond_localhost(tmp_path, start_ui, client_for):
    server = start_ui(tmp_path, host="0.0.0.0", auth="ann:s3cret")
    anonymous = client_for(f"http://127.0.0.1:{server.port}", csrf=False)
    assert anonymous.raw("/")[0] == 401
    assert anonymous.raw("/api/jobs")[0] == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ann:guess").decode()}
    assert anonymous.raw("/api/health", wrong)[0] == 401
    right = {"Authorization": "Basic " + base64.b64encode(b"ann:s3cret").decode()}
    status, body, kind = anonymous.raw("/api/health", right)
    assert status == 200 and kind == "application/json" and b'"ok": true' in body


def test_requests_for_another_host_name_are_refused(ui):
    _, client = ui
    # a DNS-rebinding page reaches 127.0.0.1 under its own name
    assert client.raw("/api/csrf", {"Host": "evil.example:80"})[0] == 403
    assert client.raw("/api/csrf", {"Host": f"localhost:{ui[0].port}"})[0] == 200


def test_state_changing_calls_need_the_csrf_token(ui, ui_root):
    _, client = ui
    options = {"data_dir": "data", "output_dir": "out", "steps": 1}
    assert client.request("POST", "/api/jobs", options, {"Content-Type": "application/json"})[0] == 403
    status, answer = client.request("POST", "/api/jobs", options, {"X-CSRF-Token": "not-it"})
    assert status == 403 and "X-CSRF-Token" in answer["error"]
    assert client.get("/api/jobs")[1]["jobs"] == [] and not (ui_root / "out").exists()


def test_the_form_is_every_training_option_with_its_default_help_and_choices(ui):
    _, client = ui
    status, answer = client.get("/api/options")
    assert status == 200
    assert [section["name"] for section in answer["sections"]] == list(SECTIONS)
    shown = {option["name"]: option for section in answer["sections"] for option in section["options"]}
    assert set(shown) == {item.name for _, item in option_fields()} - {"resume"}  # resume: the UI's button
    rank, crop, prompts, buckets = shown["rank"], shown["crop"], shown["validation_prompts"], shown["buckets"]
    assert (rank["type"], rank["default"], rank["optional"]) == ("int", 16, False)
    assert crop["choices"] == ["center", "random"] and crop["default"] == "center"
    assert prompts["type"] == "list" and buckets == buckets | {"type": "bool", "optional": True, "default": None}
    rank_field = SECTIONS["network"].__dataclass_fields__["rank"]
    assert rank["help"] == rank_field.metadata["help"] and rank["flag"] == "--rank"
    assert shown["data_dir"]["flag"] is None and shown["data_dir"]["required"]


@pytest.mark.parametrize(
    "options, option, message",
    [
        ({"steps": "10"}, "steps", 'steps = "10" must be an integer (without quotes)'),
        ({"crop": "middle"}, "crop", 'crop = "middle" must be one of center, random'),
        ({"rank": 0}, "rank", None),  # the section's own check: the CLI's message, compared below
        ({"output_dir": "data/out"}, "output_dir", None),
        ({"name": "a/b"}, "name", None),
        ({"colour": "red"}, None, "unknown option 'colour' (see sdlora train --help)"),
    ],
)
def test_a_bad_option_is_refused_with_the_clis_message_before_anything_starts(ui, ui_root, options, option, message):
    _, client = ui
    submitted = {"data_dir": "data", "output_dir": "out", "steps": 2} | options
    status, answer = client.post("/api/jobs", submitted)
    assert status == 400 and answer["option"] == option
    if message is None:  # the same line TrainConfig gives the CLI
        resolved = submitted | {"data_dir": str(ui_root / "data"), "output_dir": str(ui_root / submitted["output_dir"])}
        with pytest.raises(UserError) as err:
            TrainConfig.from_options(**resolved)
        message = str(err.value)
    assert answer["error"] == message and "\n" not in answer["error"]
    assert client.post("/api/check", submitted)[0] == 400
    assert client.get("/api/jobs")[1]["jobs"] == []
    assert not (ui_root / "out").exists() and not (ui_root / "data" / "out").exists()


def test_a_valid_form_checks_without_starting_and_gives_the_config_toml_of_the_shell(ui, ui_root, tmp_path):
    _, client = ui
    options = {"data_dir": "data", "output_dir": "out", "rank": 4, "alpha": 2.0, "validation_prompts": ["a", "b"], "buckets": False}
    assert client.post("/api/check", options) == (200, {"ok": True})
    status, answer = client.post("/api/toml", options)
    assert status == 200 and '[network]\nkind = "lora"\nrank = 4\nalpha = 2.0\n' in answer["toml"]
    (tmp_path / "config.toml").write_text(answer["toml"])
    resolved = options | {"data_dir": str(ui_root / "data"), "output_dir": str(ui_root / "out")}
    assert TrainConfig.from_options(**load_toml(tmp_path / "config.toml")) == TrainConfig.from_options(**resolved)
    assert client.post("/api/toml", options | {"rank": "4"})[0] == 400
    assert client.get("/api/jobs")[1]["jobs"] == [] and not (ui_root / "out").exists()


@pytest.fixture
def outside(tmp_path, ui_root):
    """A secret image and LoRA-named file outside the root, and symlinks to them from inside it."""
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret.png").write_bytes(b"\x89PNG secret")
    (secret / "secret.safetensors").write_bytes(b"not read")
    (ui_root / "link-out").symlink_to(secret, target_is_directory=True)
    (ui_root / "link.png").symlink_to(secret / "secret.png")
    return secret


@pytest.mark.parametrize(
    "path",
    [
        "/api/file?path=../outside/secret.png",
        "/api/file?path={secret}/secret.png",
        "/api/file?path=link.png",
        "/api/file?path=link-out/secret.png",
        "/api/file?path=%2e%2e%2foutside%2fsecret.png",
        "/api/file?path=data/%2e%2e/%2e%2e/outside/secret.png",
        "/api/inspect?path={secret}/secret.safetensors",
        "/api/inspect?path=link-out/secret.safetensors",
        "/api/loras?dir=..",
        "/api/loras?dir=link-out",
        "/api/loras?dir=/",
        "/api/datasets?dir=link-out",
        "/api/datasets?dir=..%2Foutside",
    ],
)
def test_paths_outside_the_roots_are_refused_and_nothing_is_read(ui, outside, path):
    _, client = ui
    status, body, _ = client.raw(path.format(secret=urllib.parse.quote(str(outside))))
    assert status == 403 and b"secret" not in body.replace(b"secret.", b"") and b"outside the UI's folders" in body


@pytest.mark.parametrize(
    "path",
    ["/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e%2f%2e%2e%2fcli.py", "/static//etc/passwd", "/../../etc/passwd"],
)
def test_the_pages_files_are_served_by_name_only(ui, path):
    _, client = ui
    status, body, _ = client.raw(path)
    assert status in (403, 404) and b"import" not in body and b"root:" not in body
    assert client.raw("/static/app.js")[0] == 200 and client.raw("/")[2].startswith("text/html")


def test_training_paths_outside_the_roots_are_refused(ui, ui_root, outside):
    _, client = ui
    for options, option in [
        ({"data_dir": str(outside)}, "data_dir"),
        ({"data_dir": "link-out"}, "data_dir"),
        ({"output_dir": "../escaped"}, "output_dir"),
        ({"output_dir": "link-out/run"}, "output_dir"),
        ({"model": "../outside"}, "model"),
    ]:
        status, answer = client.post("/api/jobs", {"data_dir": "data", "output_dir": "out"} | options)
        assert (status, answer["option"]) == (403, option), options
    assert not (outside / "run").exists() and not (ui_root.parent / "escaped").exists()
    assert client.get("/api/jobs")[1]["jobs"] == []


@pytest.mark.slow
def test_tools_write_only_under_the_roots(ui, ui_root, outside, write_format_file, format_rank_alpha):
    _, client = ui
    (ui_root / "loras").mkdir()
    write_format_file(ui_root / "loras", "kohya")
    rank, alphas = format_rank_alpha
    status, answer = client.post(
        "/api/convert", {"input": "loras/kohya.safetensors", "output": str(outside / "b.safetensors"), "to": "diffusers"}
    )
    assert status == 403 and not (outside / "b.safetensors").exists()
    status, answer = client.post("/api/convert", {"input": "loras/kohya.safetensors", "output": "loras/b.safetensors", "to": "diffusers"})
    assert status == 200 and answer["output"] == str(ui_root / "loras" / "b.safetensors")
    listed = {entry["name"]: entry for entry in client.get("/api/loras?dir=loras")[1]["loras"]}
    assert {name: (entry["format"], entry["rank"], entry["alpha"]) for name, entry in listed.items()} == {
        "kohya.safetensors": ("kohya", rank, alphas["kohya"]),
        "b.safetensors": ("diffusers", rank, alphas["kohya"]),
    }
    assert alphas["kohya"] != rank
    status, answer = client.post("/api/convert", {"input": "loras/kohya.safetensors", "output": "loras/kohya.safetensors", "to": "kohya"})
    assert status == 400 and "\n" not in answer["error"] and "kohya.safetensors" in answer["error"]
    merge = {"model": "tiny", "loras": [{"path": "loras/kohya.safetensors", "scale": 0.5}], "output": "../m"}
    assert client.post("/api/merge", merge)[0] == 403
    status, answer = client.post("/api/merge", merge | {"output": "merged"})  # an SD1.5-shaped LoRA, the tiny model
    assert status == 400 and "\n" not in answer["error"] and not (ui_root / "merged").exists()
    assert "the LoRA was made for SD1.x" in answer["error"]  # merge_model's own line, naming both architectures
    assert sorted(os.listdir(outside)) == ["secret.png", "secret.safetensors"]


def test_request_bodies_have_a_size_limit(ui):
    _, client = ui
    status, answer = client.post("/api/jobs", {"caption": "x" * (1 << 20)})
    assert status == 413 and "at most" in answer["error"]


def test_the_dataset_page_shows_subsets_captions_tags_and_problems_and_writes_a_caption(ui, ui_root, make_dataset, tmp_path):
    _, client = ui
    make_dataset(ui_root / "kohya" / "10_sks style", count=3)
    make_dataset(ui_root / "kohya" / "2_person", count=1)
    (ui_root / "kohya" / "10_sks style" / "img02.txt").unlink()  # an image without a caption
    (ui_root / "kohya" / "2_person" / "broken.png").write_bytes(b"not a png")  # an image that does not open
    status, dataset = client.get("/api/datasets?dir=kohya")
    assert status == 200
    assert dataset["subsets"] == [{"name": "10_sks style", "repeats": 10, "images": 3}, {"name": "2_person", "repeats": 2, "images": 1}]
    shown = {image["path"]: image for image in dataset["images"]}
    assert sorted(shown) == ["10_sks style/img00.png", "10_sks style/img01.png", "10_sks style/img02.png", "2_person/img00.png"]
    # the caption training reads: the subset's class tokens first
    assert shown["10_sks style/img00.png"]["caption"] == "sks style, a red circle, flat poster"
    assert (shown["10_sks style/img01.png"]["width"], shown["10_sks style/img01.png"]["height"]) == (64, 96)
    assert dict(dataset["tags"])["flat poster"] == 3 and dict(dataset["tags"])["sks style"] == 3
    problems = " | ".join(dataset["problems"])
    assert "broken.png" in problems and "img02.png" not in problems  # class tokens caption it: training takes it
    status, body, kind = client.raw(shown["2_person/img00.png"]["url"])
    assert status == 200 and kind == "image/png" and body == (ui_root / "kohya" / "2_person" / "img00.png").read_bytes()

    make_dataset(ui_root / "plain", count=2)
    (ui_root / "plain" / "img01.txt").unlink()
    status, plain = client.get("/api/datasets?dir=plain")
    assert [image["caption"] for image in plain["images"]] == ["a red circle, flat poster", ""]
    assert plain["problems"] == ["1 images have no caption (img01.png): training refuses them unless --caption or --trigger is given"]
    edit = {"image": "plain/img01.png", "caption": "a blue circle, flat poster "}
    assert client.request("PUT", "/api/datasets/caption", edit)[0] == 403  # no CSRF token
    status, answer = client.request("PUT", "/api/datasets/caption", edit, {"X-CSRF-Token": client.token})
    assert status == 200 and (ui_root / "plain" / "img01.txt").read_text() == "a blue circle, flat poster\n"
    assert client.get("/api/datasets?dir=plain")[1]["problems"] == []
    assert [p.name for p in (ui_root / "plain").iterdir() if p.name.startswith(".")] == []  # no temporary left
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((ui_root / "plain" / "img00.png").read_bytes())
    for image, status in ((str(outside), 403), ("../elsewhere.png", 403), ("plain/img00.txt", 400)):
        edit = {"image": image, "caption": "x"}
        assert client.request("PUT", "/api/datasets/caption", edit, {"X-CSRF-Token": client.token})[0] == status, image
    assert not (tmp_path / "elsewhere.txt").exists() and (ui_root / "plain" / "img00.txt").read_text() == "a red circle, flat poster"
