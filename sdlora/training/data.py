"""Find training images and their captions, turn an image into a bucket-sized tensor, hold some out.

Captions come from `metadata.jsonl` (`file_name`, `text`) at the top of the data folder, else a sidecar caption
file beside the image (`.txt`, or `--caption-extension`), else the fixed `--caption`; `--trigger` is put in front
of every caption.

A data folder laid out for kohya's sd-scripts is told by its subfolders named `N_words`: each is a subset whose
images are seen N times per epoch, and `words` are its class tokens, put in front of a caption that does not start
with them and used as the caption of an image that has none (as kohya's DreamBooth-style datasets do). Once one
subfolder is named so, every subfolder with images must be, and no image may lie beside them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import UserError
from .buckets import Size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees: width and height trade places
_LISTED = 5  # file names shown in one warning or error line before "and N more"
SUBSET_DIR = re.compile(r"(\d+)_(.*)", re.DOTALL)  # kohya's `N_words`: N repeats per epoch, words the class tokens
# a subset's repeats per epoch at most: each repeat is an entry of the epoch's sample list (kohya's folders use 1..100)
MAX_REPEATS = 10_000


@dataclass(frozen=True)
class CaptionRules:
    """How one subset's images and captions vary from step to step (the run's flags, or a dataset TOML's subset).

    A caption is the same at every step (`static`, encoded once) unless its tags are shuffled or dropped or it
    holds wildcards; caption dropout only chooses between it and "", both encoded once.
    """

    shuffle: bool = False  # shuffle the comma-separated tags (kohya's shuffle_caption)
    keep_tokens: int = 0  # the first N tags stay in place and are never dropped
    keep_separator: str = ""  # kohya's keep_tokens_separator: `fixed ||| shuffled ||| fixed suffix`
    secondary_separator: str = ""  # tags joined by it move and drop as one, then it becomes ", "
    wildcards: bool = False  # kohya's enable_wildcard: one line of a multi-line caption, `{a|b}` choices
    tag_dropout: float = 0.0  # each tag after the kept ones left out with this probability
    caption_dropout: float = 0.0  # the whole caption replaced by "" with this probability
    flip: bool = False  # random horizontal flips
    crop: str = "center"  # center or random

    @property
    def static(self) -> bool:
        return not (self.shuffle or self.tag_dropout or self.wildcards)


@dataclass
class ImageRecord:
    """One training image: its path, final caption, and its size as displayed (EXIF rotation applied)."""

    path: Path
    caption: str
    width: int
    height: int
    subset: str = ""  # the kohya `N_words` folder (or a dataset TOML's image_dir) it is in ("" in a plain data folder)
    repeats: int = 1  # times per epoch
    rules: CaptionRules = CaptionRules()
    is_reg: bool = False  # a regularization (prior-preservation) image: its loss is weighted by --prior-loss-weight
    dataset: int = 0  # which dataset of a dataset TOML: its resolution, buckets and batch size
    subset_repeats: int | None = None  # a regularization image's subset's own repeats, before matching the training images
    mask: Path | None = None  # its loss mask: a mask image's red channel, or with `alpha_mask` this image's alpha
    alpha_mask: bool = False  # the mask is the image's own alpha channel (kohya's alpha_mask)

    @property
    def mask_source(self) -> Path | None:
        """The file the mask is read from (None: no mask, the whole image trains)."""
        return self.path if self.alpha_mask else self.mask


def find_images(
    data_dir: str | os.PathLike,
    caption: str | None = None,
    trigger: str | None = None,
    caption_extension: str = ".txt",
    keep_tokens: int = 0,
    flat: bool = False,
    no_caption_hint: str = "pass --caption or --trigger or add .txt files",
    size_of: Callable[[Path], tuple[int, int] | str] | None = None,
) -> list[ImageRecord]:
    """Every readable image under `data_dir` (nested folders too; only those directly in it when `flat`, as a
    dataset TOML's image_dir is read) with its caption, sorted by relative path; in a kohya-style folder (not
    `flat`) each with its subset and repeats.

    Unreadable images are skipped with a warning; no images at all, an image left without any caption, a bad
    `metadata.jsonl` line, a badly named subset folder or a caption with fewer tags than `keep_tokens` raise a
    one-line ValueError naming the file. `size_of` stands in for `displayed_size` (the UI's remembers its answers).
    """
    root = Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data folder {root} is not a folder")
    extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    listed = _read_metadata(root)
    found = {path.relative_to(root).as_posix(): path for path in _walk_images(root, flat)}
    if flat:
        listed = {relative: text for relative, text in listed.items() if "/" not in relative}
    if not found and not listed:
        raise UserError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found in {root}")
    subsets = {} if flat else _subsets(root, found.keys() | listed.keys())
    fixed = caption.strip() if caption and caption.strip() else None
    trigger = trigger.strip() if trigger and trigger.strip() else None
    records: list[ImageRecord] = []
    unreadable: list[str] = []
    uncaptioned: list[str] = []
    for relative in sorted(found.keys() | listed.keys()):
        path = found.get(relative, root / relative)
        size = (size_of or displayed_size)(path)
        if isinstance(size, str):
            unreadable.append(f"{relative} ({size})")
            continue
        folder, repeats, class_tokens = subsets.get(relative.split("/")[0], ("", 1, "")) if subsets else ("", 1, "")
        text = listed[relative] if relative in listed else _sidecar_caption(path, extension)
        text = with_trigger(text or "", class_tokens) or None if class_tokens else text
        if not text:
            uncaptioned.append(relative)
            text = fixed or ""
        records.append(ImageRecord(path, with_trigger(text, trigger), *size, subset=folder, repeats=repeats))
    if unreadable and records:
        warnings.warn(f"skipped {len(unreadable)} unreadable images in {root}: {_names(unreadable)}", stacklevel=2)
    if not records:
        raise UserError(f"no readable images in {root}: all {len(unreadable)} failed to open ({_names(unreadable)})")
    if uncaptioned and not (fixed or trigger):
        raise UserError(f"{len(uncaptioned)} images have no caption ({_names(uncaptioned)}): {no_caption_hint}")
    # every image uncaptioned with a fixed caption is the intended "one caption for all" mode: nothing to warn about
    if uncaptioned and (not fixed or len(uncaptioned) < len(records)):
        using = f"the caption {fixed!r}" if fixed else "the trigger alone"
        using += f" after {trigger!r}" if fixed and trigger else ""
        warnings.warn(f"{len(uncaptioned)} images have no caption and use {using}: {_names(uncaptioned)}", stacklevel=2)
    if keep_tokens:
        short = [f"{r.path.relative_to(root).as_posix()} has {len(caption_tags(r.caption))} tag{'s' * (len(caption_tags(r.caption)) != 1)}"
                 for r in records if len(caption_tags(r.caption)) < keep_tokens]  # fmt: skip
        if short:
            raise UserError(f"--keep-tokens {keep_tokens}: more than some captions hold ({_names(short)}); lower it")
    return records


def _subsets(root: Path, relatives) -> dict[str, tuple[str, int, str]]:
    """{folder: (folder, repeats, class tokens)} of a kohya-style data folder's `N_words` subsets; {} for a plain one."""
    tops = {relative.split("/")[0] for relative in relatives if "/" in relative}
    named = {top: SUBSET_DIR.fullmatch(top) for top in tops}
    if not any(named.values()):
        return {}
    for top, match in sorted(named.items()):
        if not match:
            raise UserError(
                f"{root / top}: not named N_words like the other subfolders (N repeats per epoch, words its class tokens); rename or move it"
            )
        if int(match.group(1)) < 1:
            raise UserError(f"{root / top}: N in N_words is the repeats per epoch and must be at least 1")
        if int(match.group(1)) > MAX_REPEATS:
            raise UserError(f"{root / top}: N in N_words is the repeats per epoch and must be at most {MAX_REPEATS}; train longer instead")
    loose = sorted(relative for relative in relatives if "/" not in relative)
    if loose:
        raise UserError(
            f"{root}: {_names(loose)} not in any N_words subfolder; move them into one (kohya-style folders train only subsets)"
        )
    return {top: (top, int(match.group(1)), match.group(2).strip()) for top, match in named.items()}


def dataset_summary(records: Sequence[ImageRecord]) -> str:
    """The one line a run starts with on a kohya-style folder, a dataset TOML or with regularization images:
    `3 subsets, 74 images, 520 samples per epoch` (`2 datasets, ` before it when several; `, of them 1 subset, 10
    images, 260 samples regularization` after it when there are such)."""
    subsets = {(record.dataset, record.subset, record.is_reg) for record in records}
    samples = sum(record.repeats for record in records)
    datasets = len({record.dataset for record in records})
    line = f"{datasets} datasets, " if datasets > 1 else ""
    line += f"{_count(len(subsets), 'subset')}, {len(records)} images, {samples} samples per epoch"
    reg = [record for record in records if record.is_reg]
    if reg:
        reg_subsets = len({(record.dataset, record.subset) for record in reg})
        line += f", of them {_count(reg_subsets, 'subset')}, {len(reg)} images, {sum(r.repeats for r in reg)} samples regularization"
    return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _walk_images(root: Path, flat: bool = False) -> list[Path]:
    """Image files under `root` (directly in it when `flat`), skipping hidden files and folders (.git,
    .ipynb_checkpoints, temp files)."""
    images = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [] if flat else [name for name in subfolders if not name.startswith(".")]
        images += [Path(folder, name) for name in files if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return images


def _read_metadata(root: Path) -> dict[str, str | None]:
    """`metadata.jsonl` as {relative posix path: caption or None}; a bad line raises naming its number."""
    path = root / METADATA_FILE
    if not path.is_file():
        return {}
    entries: dict[str, str | None] = {}
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise UserError(f'{where}: expected an object with a "file_name" string')
        text = entry.get("text")
        if text is not None and not isinstance(text, str):
            raise UserError(f'{where}: "text" must be a string, got {type(text).__name__}')
        relative = _relative_inside(entry["file_name"], where)
        if relative in entries:
            raise UserError(f"{where}: {relative} is listed twice")
        if not relative.lower().endswith(IMAGE_EXTENSIONS):
            raise UserError(f"{where}: {relative} is not a {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} image")
        if not (root / relative).is_file():
            raise FileNotFoundError(f"{where}: {relative} not found in {root}")
        entries[relative] = text.strip() if text else None
    return entries


def _relative_inside(file_name: str, where: str) -> str:
    """`file_name` as a normalised path inside the data folder; absolute or escaping paths are refused."""
    # refused lexically, before touching the disk: a caption file must never make us read outside the folder
    if PurePosixPath(file_name).is_absolute() or PureWindowsPath(file_name).anchor:
        raise UserError(f"{where}: file_name {file_name!r} is an absolute path; give it relative to the data folder")
    normal = os.path.normpath(file_name).replace(os.sep, "/")
    if normal == "." or normal == ".." or normal.startswith("../"):
        raise UserError(f"{where}: file_name {file_name!r} points outside the data folder")
    return normal


def _sidecar_caption(image: Path, extension: str = ".txt") -> str | None:
    sidecar = image.with_suffix(extension)
    return read_text(sidecar).strip() or None if sidecar.is_file() else None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: Windows editors start UTF-8 files with a BOM
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def with_trigger(text: str, trigger: str | None) -> str:
    if not trigger:
        return text
    if not text or text == trigger:
        return trigger
    # captions already written with the trigger in front are not given it twice
    return text if text.startswith(trigger + ",") else f"{trigger}, {text}"


def displayed_size(path: Path) -> tuple[int, int] | str:
    """(width, height) after EXIF rotation, or the reason the file cannot be read."""
    try:
        with Image.open(path) as image:
            image.verify()  # walks PNG chunks with their CRCs and starts the WebP decoder: catches truncation
        with Image.open(path) as image:  # verify() leaves the image unusable: open it again for size and EXIF
            width, height = image.size
            swapped = image.getexif().get(0x0112) in _SWAPPED_ORIENTATIONS
            if image.format == "JPEG":
                # verify() does nothing for JPEG; a 1/8-scale DCT decode still reaches the end of the data, cheaply
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return (height, width) if swapped else (width, height)


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def crop_box(image_size: Size, size: Size, crop: str = "center", rng: random.Random | None = None) -> tuple[float, float, float]:
    """(scale, left, top): resize by `scale` to cover `size`, then cut at (left, top) in the resized image."""
    (width, height), (target_width, target_height) = image_size, size
    scale = max(target_width / width, target_height / height)
    spare_x = max(0, round(width * scale) - target_width)
    spare_y = max(0, round(height * scale) - target_height)
    if crop == "center":
        return scale, spare_x // 2, spare_y // 2
    if crop == "random":
        rng = rng or random.Random()
        return scale, rng.randint(0, spare_x), rng.randint(0, spare_y)
    raise UserError(f"crop must be 'center' or 'random', got {crop!r}")


Window = tuple[float, float, float]  # (scale, left, top): resize by scale, cut at (left, top) in the resized image


def crop_window(record: ImageRecord, size: Size, crop: str = "center", rng: random.Random | None = None) -> Window:
    """Where `record` is cut to fit `size`: `crop_box` over its displayed size (a random crop draws from `rng`)."""
    return crop_box((record.width, record.height), size, crop, rng)


def load_image(
    record: ImageRecord,
    size: Size,
    crop: str = "center",
    flip: bool = False,
    rng: random.Random | None = None,
    window: Window | None = None,
) -> torch.Tensor:
    """The image resized to cover `size` = (width, height), cut at `window` (default: `crop_window(record, size,
    crop, rng)`), optionally mirrored: float32 [3, H, W] in [-1, 1]."""
    window = window if window is not None else crop_window(record, size, crop, rng)
    image = _fitted(record.path, record, size, window, _to_rgb, flip)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_mask(record: ImageRecord, size: Size, window: Window, flip: bool = False) -> torch.Tensor:
    """The image's loss mask cut and resized exactly as `load_image` cuts and resizes the image (same window, same
    resampling, same mirror): float32 [1, H, W] in [0, 1]. As kohya reads it: a mask image's red channel (its
    `conditioning_images[:, 0]` mapped back to [0, 1], so value / 255), or the image's alpha / 255 (`alpha_mask`)."""
    if record.mask_source is None:
        raise ValueError(f"{record.path} has no mask")
    channel = _alpha_channel if record.alpha_mask else _red_channel
    image = _fitted(record.mask_source, record, size, window, channel, flip)
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).div_(255.0).unsqueeze(0)


def _fitted(path: Path, record: ImageRecord, size: Size, window: Window, convert, flip: bool) -> Image.Image:
    """`path` (the image, or its mask of the same displayed size) EXIF-rotated, converted by `convert`, resized from
    `window` to `size` with Lanczos, optionally mirrored."""
    target_width, target_height = size
    scale, left, top = window
    try:
        with Image.open(path) as image:
            cover = max(target_width / record.width, target_height / record.height)
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale when that still covers the target (much faster, same look)
            image.draft("RGB", (max(1, int(image.width * cover)), max(1, int(image.height * cover))))
            image = convert(ImageOps.exif_transpose(image))
            # the window is in the displayed image's pixels; a draft decode is smaller by this factor
            shrink_x, shrink_y = image.width / record.width, image.height / record.height
            # resize straight from the crop window in source pixels: one resample, exact aspect, no big intermediate
            box = (
                left / scale * shrink_x,
                top / scale * shrink_y,
                min(image.width, (left + target_width) / scale * shrink_x),
                min(image.height, (top + target_height) / scale * shrink_y),
            )
            image = image.resize(size, Image.Resampling.LANCZOS, box=box)
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def _red_channel(image: Image.Image) -> Image.Image:
    """A mask image's red channel, as kohya's load_image (RGB) then `[:, 0]`; 16-bit greyscale scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).astype(np.uint8))
    return image.convert("RGB").getchannel("R")


def _alpha_channel(image: Image.Image) -> Image.Image:
    """The image's alpha channel (kohya's load_image(alpha=True): RGBA, then `[:, :, 3]`)."""
    return image.convert("RGBA").getchannel("A")


def _shown(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def has_alpha(path: Path) -> bool:
    """Whether the image file carries transparency (an alpha channel, or a palette or colour key marked transparent)."""
    with Image.open(path) as image:
        return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def with_masks(records: list[ImageRecord], root: Path, mask_dir: str | None, alpha_mask: bool, where: str) -> list[ImageRecord]:
    """`records` (images under `root`) with their loss masks: from `mask_dir`, the mask image at the same relative
    path and stem (any image extension, as kohya's conditioning_data_dir pairs them by stem), or each image's own
    alpha channel. Refused in one line, naming the files: a missing mask, two masks for one image, a mask for no
    image (kohya refuses those too), a mask of another size than its image (kohya asserts they are equal), an image
    without transparency under alpha_mask (kohya would train all of it)."""
    if alpha_mask:
        opaque = [_shown(record.path, root) for record in records if not has_alpha(record.path)]
        if opaque:
            raise UserError(
                f"{where}: alpha_mask, but {len(opaque)} images have no alpha channel ({_names(opaque)}): save them as PNG/WebP with "
                "transparency, or give masks as a mask folder"
            )
        return [dataclasses.replace(record, alpha_mask=True) for record in records]
    if mask_dir is None:
        return records
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: mask folder {folder} is not a folder")
    masks: dict[str, list[Path]] = {}
    for path in _walk_images(folder):
        masks.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    out, missing, twice, resized = [], [], [], []
    for record in records:
        stem = record.path.relative_to(root).with_suffix("").as_posix()
        found = sorted(masks.pop(stem, []))
        if not found:
            missing.append(record.path.relative_to(root).as_posix())
            continue
        if len(found) > 1:
            twice.append(" and ".join(path.name for path in found))
            continue
        size = displayed_size(found[0])
        if isinstance(size, str):
            raise UserError(f"{where}: cannot read mask {found[0]} ({size})")
        if size != (record.width, record.height):
            resized.append(f"{found[0].name} is {size[0]}x{size[1]}, {record.path.name} {record.width}x{record.height}")
        out.append(dataclasses.replace(record, mask=found[0]))
    if missing:
        raise UserError(f"{where}: no mask in {folder} for {len(missing)} images ({_names(missing)}): add a mask of the same name")
    if twice:
        raise UserError(f"{where}: two masks for one image in {folder} ({_names(twice)}): keep one")
    if resized:
        raise UserError(f"{where}: masks must have their image's size ({_names(resized)}): resize the masks")
    if masks:
        extra = sorted(path.relative_to(folder).as_posix() for paths in masks.values() for path in paths)
        raise UserError(f"{where}: {len(extra)} masks in {folder} have no image ({_names(extra)}): rename or remove them")
    return out


def sdxl_time_ids(record: ImageRecord, size: Size, window: Window, flip: bool) -> list[int]:
    """SDXL's added conditioning for one training image, as diffusers' SDXL scripts compute it: original size
    (height, width), the crop's top-left corner (top, left) in the resized image, and the target size (height, width).
    A mirrored image's crop is mirrored too: its left edge is measured from the other side."""
    scale, left, top = window
    width, height = size
    if flip:
        left = max(0, round(record.width * scale) - width - left)
    return [record.height, record.width, int(top), int(left), height, width]


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency is laid on white, 16-bit greyscale scaled down instead of clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # white: transparent cut-outs and drawings are meant on paper; dropping alpha shows whatever RGB hid there
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def caption_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random, trigger: str | None = None) -> str:
    """The caption's comma-separated tags in a random order, the first `keep_tokens` tags (kohya's keep_tokens;
    at least a leading trigger word) kept in place."""
    tags = caption_tags(caption)
    keep = max(keep_tokens, 1 if trigger and tags and tags[0] == trigger else 0)
    head, rest = tags[:keep], tags[keep:]
    rng.shuffle(rest)
    return ", ".join(head + rest)


def drop_tags(caption: str, keep_tokens: int, rate: float, rng: random.Random) -> str:
    """Each tag after the first `keep_tokens` left out with probability `rate` (kohya's caption_tag_dropout_rate);
    one draw per such tag, none when the rate is 0."""
    if rate == 0.0:
        return caption
    tags = caption_tags(caption)
    return ", ".join(tags[:keep_tokens] + [tag for tag in tags[keep_tokens:] if rng.random() >= rate])


_WILDCARD = re.compile(r"\{([^{}]*)\}")


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """kohya's enable_wildcard: one line of a multi-line caption, each `{a|b|c}` one of its choices (`{{` and `}}`
    are literal braces); drawn from `rng`."""
    lines = [line for line in caption.split("\n") if line.strip()] or [caption]
    line = lines[rng.randrange(len(lines))] if len(lines) > 1 else lines[0]
    left, right = "\x00", "\x01"  # stand-ins for escaped braces while choices are made
    line = line.replace("{{", left).replace("}}", right)
    line = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), line)
    return line.replace(left, "{").replace(right, "}")


def step_caption(caption: str, rules: CaptionRules, rng: random.Random | None, trigger: str | None = None) -> str:
    """The caption an image is trained on at one step: wildcards chosen, tags shuffled and dropped as `rules` say
    (draws from `rng`, which only a static rule may leave None), kohya's keep-tokens and secondary separators
    taken out. Caption dropout is the caller's (`drop_captions`)."""
    if rules.wildcards:
        caption = expand_wildcards(caption, rng)
    elif rules.keep_separator or rules.secondary_separator:
        caption = caption.split("\n")[0]  # as kohya: a caption without wildcards is its first line
    if rules.keep_separator and rules.keep_separator in caption:
        # `fixed ||| shuffled ||| fixed suffix`: only the middle part moves and drops (kohya also takes the
        # separators out when nothing is shuffled; it leaves them in the text then, which no one means)
        head, _, rest = caption.partition(rules.keep_separator)
        middle, _, tail = rest.partition(rules.keep_separator)
        middle = shuffle_tags(middle, 0, rng) if rules.shuffle else ", ".join(caption_tags(middle))
        middle = drop_tags(middle, 0, rules.tag_dropout, rng)
        caption = ", ".join(part for part in (", ".join(caption_tags(head)), middle, ", ".join(caption_tags(tail))) if part)
    else:
        caption = shuffle_tags(caption, rules.keep_tokens, rng, trigger) if rules.shuffle else caption
        caption = drop_tags(caption, rules.keep_tokens, rules.tag_dropout, rng)
    if rules.secondary_separator:
        caption = caption.replace(rules.secondary_separator, ",")
    return caption


def drop_captions(captions: list[str], p: float | Sequence[float], rng: random.Random) -> list[str]:
    """Each caption replaced by "" with probability `p` (or its own of a list: the subsets' rates); one draw from
    `rng` per caption whose probability is not 0."""
    rates = [p] * len(captions) if isinstance(p, (int, float)) else list(p)
    if not all(0.0 <= rate <= 1.0 for rate in rates):
        raise UserError(f"caption_dropout must be in [0, 1], got {p}")
    return ["" if rate and rng.random() < rate else caption for caption, rate in zip(captions, rates)]


def split_validation(records: Sequence[ImageRecord], fraction: float, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out round(fraction * N) images (at least 1 when fraction > 0), chosen by seed; both lists keep their order."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"val_split must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(records), []
    count = max(1, round(fraction * len(records)))
    if count >= len(records):
        raise UserError(f"val_split {fraction} holds out {count} of {len(records)} images and leaves none to train on")
    held_out = set(random.Random(seed).sample(range(len(records)), count))
    train = [r for i, r in enumerate(records) if i not in held_out]
    return train, [r for i, r in enumerate(records) if i in held_out]
