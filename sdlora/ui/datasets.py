"""The dataset page: a data folder as the trainer reads it (`training.data.find_images`: images, captions, kohya
`N_words` subsets with their repeats), the tag frequency, the problems training would refuse or warn about, and one
image's sidecar caption written back atomically."""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import UserError
from ..storage.atomic import atomic_file
from ..training.data import IMAGE_EXTENSIONS, caption_tags, displayed_size, find_images
from .roots import Roots

MAX_CAPTION = 65536  # characters of one caption written from the page
TAGS_SHOWN = 50
# find_images' caption for an image that has none: listed without one here, where training would refuse it
_NO_CAPTION = "\x00"
SIZES_REMEMBERED = 200_000  # images whose checked size the UI keeps (about 200 bytes each)


class SizeCache:
    """`displayed_size` of each image, remembered under its real path, modification time and size: a dataset page
    shown again reads each image's directory entry, not the image (which training's check decodes whole)."""

    def __init__(self, limit: int = SIZES_REMEMBERED) -> None:
        self._sizes: dict[tuple[str, int, int], tuple[int, int] | str] = {}
        self._lock = threading.Lock()
        self.limit = limit

    def __call__(self, path: Path) -> tuple[int, int] | str:
        try:
            stat = path.stat()
        except OSError:
            return displayed_size(path)  # the reason it cannot be read
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._sizes:
                return self._sizes[key]
        size = displayed_size(path)
        with self._lock:
            if len(self._sizes) >= self.limit:
                self._sizes.clear()  # simpler than an LRU, and only a slower next page
            self._sizes[key] = size
        return size


def describe_dataset(folder: str, roots: Roots, caption_extension: str = ".txt", sizes: SizeCache | None = None) -> dict[str, Any]:
    """The images of `folder` with their captions (as training reads them), subsets, tag frequency and problems
    (`sizes`: the server's remembered image sizes)."""
    real = roots.resolve(folder, "folder")
    if not real.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            records = find_images(real, caption=_NO_CAPTION, caption_extension=caption_extension, size_of=sizes)
        except (UserError, OSError) as err:  # what training would refuse: shown, with no images
            records, problems = [], [_line(err)]
    # find_images' own line about uncaptioned images names the stand-in caption: the line below replaces it
    problems += [_line(warning.message) for warning in caught if repr(_NO_CAPTION) not in str(warning.message)]
    uncaptioned = [record for record in records if record.caption == _NO_CAPTION]
    if uncaptioned:
        names = ", ".join(record.path.relative_to(real).as_posix() for record in uncaptioned[:5])
        more = f" and {len(uncaptioned) - 5} more" if len(uncaptioned) > 5 else ""
        problems.append(
            f"{len(uncaptioned)} images have no caption ({names}{more}): training refuses them unless --caption or --trigger is given"
        )
    images, subsets, tags = [], {}, Counter()
    for record in records:
        caption = "" if record.caption == _NO_CAPTION else record.caption
        tags.update(tag.lower() for tag in caption_tags(caption))
        images.append(
            {
                "path": record.path.relative_to(real).as_posix(),
                "url": "/api/file?path=" + quote(str(record.path)),
                "thumb": f"/api/thumb?path={quote(str(record.path))}&v={_version(record.path)}",
                "caption": caption,
                "caption_file": record.path.with_suffix(caption_extension).is_file(),
                "width": record.width,
                "height": record.height,
                "subset": record.subset,
                "repeats": record.repeats,
            }
        )
        if record.subset:
            subsets.setdefault(record.subset, {"name": record.subset, "repeats": record.repeats, "images": 0})["images"] += 1
    return {
        "folder": str(real),
        "images": images,
        "subsets": list(subsets.values()),
        "tags": tags.most_common(TAGS_SHOWN),
        "problems": problems,
    }


def write_caption(image: str, caption: Any, roots: Roots, caption_extension: str = ".txt") -> dict[str, Any]:
    """Write `caption` to the sidecar caption file of `image` (atomically: a reader sees the old text or the new)."""
    real = roots.resolve(image, "image")
    if real.suffix.lower() not in IMAGE_EXTENSIONS or not real.is_file():
        raise UserError(f"{image} is not an image ({', '.join(IMAGE_EXTENSIONS)}) under the UI's folders")
    if not isinstance(caption, str) or "\x00" in caption or len(caption) > MAX_CAPTION:
        raise UserError(f"the caption must be text of at most {MAX_CAPTION} characters")
    if not caption_extension.startswith(".") or "/" in caption_extension or "\\" in caption_extension:
        raise UserError(f"caption_extension {caption_extension!r} must be an extension such as .txt")
    target = real.with_suffix(caption_extension)
    with atomic_file(target) as tmp:
        Path(tmp).write_text(caption.strip() + "\n", encoding="utf-8")
    return {"caption_file": str(target), "caption": caption.strip()}


def _version(path: Path) -> str:
    """The image's modification time and size: a thumbnail URL that changes when the image does (browser caching)."""
    stat = path.stat()
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"


def _line(message: object) -> str:
    text = str(message).strip()
    return text.splitlines()[0] if text else type(message).__name__
