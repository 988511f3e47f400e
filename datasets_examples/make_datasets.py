"""Build the example style datasets: flat_poster/ (flat colours, bold outlines) and ink_hatch/ (ink and cross-hatching).

    python datasets_examples/make_datasets.py            # (re)write both folders beside this script
    python datasets_examples/make_datasets.py --out DIR  # write DIR/flat_poster and DIR/ink_hatch instead
    python datasets_examples/make_datasets.py --check    # exit 1 if the committed images or captions differ

Needs only Python, numpy and Pillow. Every image comes from a seed and integer-exact drawing (raster.py), so a
rebuild gives the same pixels everywhere. A PNG whose pixels have not changed is left untouched: other zlib builds
compress the same pixels to other bytes, and a rebuild should not churn git. The train.toml files are hand-written.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sdlora/drawing from the checkout, installed or not

from sdlora.drawing.raster import Canvas  # noqa: E402
from sdlora.drawing.scenes import LANDSCAPE, PORTRAIT, SQUARE, scene  # noqa: E402
from sdlora.drawing.styles import STYLES as ALL_STYLES  # noqa: E402
from sdlora.drawing.styles import Style, caption  # noqa: E402

HERE = Path(__file__).resolve().parent
IMAGES_PER_SET = 28
# (width, height) by index modulo 7: 20 squares (12 of 512, 8 of 384), 4 portraits, 4 landscapes over 28 images
SIZE_PATTERN = ((512, 512), (384, 384), (512, 512), (320, 512), (384, 384), (512, 320), (512, 512))
STYLES = (ALL_STYLES["flat_poster"], ALL_STYLES["ink_hatch"])


def build(style: Style) -> dict[str, Image.Image | str]:
    """{file name: image or caption} of every file of one dataset, in memory."""
    files: dict[str, Image.Image | str] = {}
    counts = {"square": 0, "portrait": 0, "landscape": 0}
    for index in range(IMAGES_PER_SET):
        width, height = SIZE_PATTERN[index % len(SIZE_PATTERN)]
        shape = "square" if width == height else "portrait" if height > width else "landscape"
        kinds = {"square": SQUARE, "portrait": PORTRAIT, "landscape": LANDSCAPE}[shape]
        kind = kinds[(counts[shape] + style.seed) % len(kinds)]  # the seed offsets the cycle so the sets differ
        counts[shape] += 1
        canvas = Canvas(width, height, list(style.palette))
        parts, phrase = scene(canvas, random.Random(style.seed * 1000 + index), style.words, kind)
        style.render(canvas, parts)
        image = Image.fromarray(canvas.pixels, mode="P")
        image.putpalette([value for rgb in canvas.palette for value in rgb])
        stem = f"{style.name}_{index:03d}"
        files[stem + ".png"] = image
        files[stem + ".txt"] = caption(style, phrase) + "\n"
    return files


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)  # fixed settings, no timestamps or text chunks
    return buffer.getvalue()


def same_content(path: Path, content: Image.Image | str) -> bool:
    """Whether the file at `path` holds these pixels (any PNG encoding) or exactly this caption text."""
    if not path.is_file():
        return False
    if isinstance(content, str):
        return path.read_bytes() == content.encode("utf-8")
    with Image.open(path) as existing:
        return existing.size == content.size and np.array_equal(np.asarray(existing.convert("RGB")), np.asarray(content.convert("RGB")))


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write(style: Style, folder: Path) -> tuple[int, int]:
    """Write one dataset into `folder`, leaving unchanged files alone and removing stale ones; (written, removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = build(style)
    written = 0
    for name, content in files.items():
        if not same_content(folder / name, content):
            _write_atomic(folder / name, content.encode("utf-8") if isinstance(content, str) else _encode(content))
            written += 1
    stale = [path for path in folder.glob(f"{style.name}_*") if path.suffix in (".png", ".txt") and path.name not in files]
    for path in stale:
        path.unlink()
    return written, len(stale)


def check(style: Style, folder: Path) -> list[str]:
    """Differences between a fresh build and the files in `folder`, one line each (empty when identical)."""
    files = build(style)
    problems = [
        f"{folder / name}: {'missing' if not (folder / name).exists() else 'differs'}"
        for name, content in files.items()
        if not same_content(folder / name, content)
    ]
    extra = sorted(path.name for path in folder.glob(f"{style.name}_*") if path.suffix in (".png", ".txt") and path.name not in files)
    return problems + [f"{folder / name}: not made by the generator" for name in extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to hold flat_poster/ and ink_hatch/ (default: beside this script)")
    parser.add_argument("--check", action="store_true", help="compare a fresh build with the files in --out; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = [line for style in STYLES for line in check(style, args.out / style.name)]
        print("\n".join(problems) if problems else f"datasets in {args.out} match the generator")
        return 1 if problems else 0
    for style in STYLES:
        written, removed = write(style, args.out / style.name)
        print(f"{args.out / style.name}: {IMAGES_PER_SET} images, {written} files written, {removed} stale files removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
