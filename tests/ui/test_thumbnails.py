"""The dataset page at scale: each image's thumbnail made once and cached under the image's path, modification
time and size; each image's checked size remembered the same way, so the page shown again decodes nothing."""

from __future__ import annotations

import io
import os
import urllib.parse

from PIL import Image

import sdlora.ui.datasets as datasets
from sdlora.ui.thumbnails import THUMB_SIDE, THUMBNAILS_DIR


def _thumbs(server) -> list:
    return sorted((server.runner.state_dir / THUMBNAILS_DIR).rglob("*.jpg"))


def test_a_thumbnail_is_made_once_and_again_when_its_image_changes(ui, ui_root):
    server, client = ui
    Image.new("RGBA", (600, 300), (200, 10, 10, 128)).save(ui_root / "data" / "wide.png")
    images = {image["path"]: image for image in client.get("/api/datasets?dir=data")[1]["images"]}
    wide = images["wide.png"]
    status, body, kind = client.raw(wide["thumb"])
    assert status == 200 and kind == "image/jpeg"
    with Image.open(io.BytesIO(body)) as thumb:
        assert thumb.size == (THUMB_SIDE, THUMB_SIDE // 2) and thumb.mode == "RGB"
        red, green, _ = thumb.getpixel((10, 10))
        assert red > 150 and green > 60  # half-transparent red over the page's grey, not over black
    made = _thumbs(server)
    assert len(made) == 1
    os.utime(made[0], ns=(1, 1))  # a second request reads the cached file, which is left as it was
    assert client.raw(wide["thumb"])[1] == body and made[0].stat().st_mtime_ns == 1
    # the image edited: a new URL (the browser may cache the old one) and a new thumbnail
    Image.new("RGB", (100, 400), "blue").save(ui_root / "data" / "wide.png")
    again = {image["path"]: image for image in client.get("/api/datasets?dir=data")[1]["images"]}["wide.png"]
    assert again["thumb"] != wide["thumb"]
    with Image.open(io.BytesIO(client.raw(again["thumb"])[1])) as thumb:
        assert thumb.size == (THUMB_SIDE // 4, THUMB_SIDE)
    assert len(_thumbs(server)) == 2
    # small images too, each its own; nothing outside the roots, no non-image
    assert client.raw(images["img00.png"]["thumb"])[0] == 200 and len(_thumbs(server)) == 3
    assert client.raw("/api/thumb?path=" + urllib.parse.quote(str(ui_root.parent / "x.png")))[0] == 403
    assert client.raw("/api/thumb?path=data/img00.txt")[0] == 404
    (ui_root / "data" / "broken.png").write_bytes(b"not a png")
    status, body, _ = client.raw("/api/thumb?path=data/broken.png")
    assert status == 400 and b"does not open as an image" in body and len(_thumbs(server)) == 3


def test_the_dataset_page_shown_again_reads_no_image(ui, ui_root, monkeypatch):
    _, client = ui
    opened = []
    checked = datasets.displayed_size
    monkeypatch.setattr(datasets, "displayed_size", lambda path: opened.append(path.name) or checked(path))
    first = client.get("/api/datasets?dir=data")[1]
    assert sorted(opened) == ["img00.png", "img01.png", "img02.png", "img03.png"]
    opened.clear()
    assert client.get("/api/datasets?dir=data")[1] == first and opened == []
    Image.new("RGB", (80, 64), "green").save(ui_root / "data" / "img02.png")  # edited: read again, alone
    again = client.get("/api/datasets?dir=data")[1]
    assert opened == ["img02.png"] and [image["width"] for image in again["images"]][2] == 80
