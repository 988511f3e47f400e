"""The dataset page's thumbnails: each image shrunk once to at most `THUMB_SIDE` pixels a side and kept in the UI's
state folder, under a name made of the image's real path, modification time and size (an edited image gets a new
one), so a page of thousands of images costs its full-size files once, and a visit after that costs small files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, ImageOps

from ..errors import UserError
from ..storage.atomic import atomic_file
from ..training.data import IMAGE_EXTENSIONS
from .roots import Roots

THUMB_SIDE = 256  # pixels of a thumbnail's longer side: the page shows them at up to 220 x 180 CSS pixels
THUMB_QUALITY = 85  # JPEG quality: a 256 px thumbnail of a photo in about 10 KB
THUMBNAILS_DIR = "thumbnails"


def thumbnail(image: str, roots: Roots, cache: Path) -> Path:
    """The thumbnail of `image` (under the roots), made the first time it is asked for and read from `cache` after."""
    real = roots.resolve(image, "image")
    if real.suffix.lower() not in IMAGE_EXTENSIONS or not real.is_file():
        raise FileNotFoundError(f"{image} is not an image ({', '.join(IMAGE_EXTENSIONS)}) under the UI's folders")
    stat = real.stat()
    key = hashlib.sha256(f"{real}\0{stat.st_mtime_ns}\0{stat.st_size}\0{THUMB_SIDE}".encode()).hexdigest()[:40]
    target = cache / key[:2] / f"{key}.jpg"
    if target.is_file():
        return target
    try:
        with Image.open(real) as opened:
            opened.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # a JPEG decodes at a fraction of its size: much faster
            picture = ImageOps.exif_transpose(opened)
            picture.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
            picture = _on_grey(picture)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{image} does not open as an image ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    with atomic_file(target) as tmp:
        picture.save(tmp, format="JPEG", quality=THUMB_QUALITY)
    return target


def _on_grey(picture: Image.Image) -> Image.Image:
    """RGB for JPEG: a transparent image over the page's grey, as it would show there."""
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (243, 243, 243, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return picture.convert("RGB")
