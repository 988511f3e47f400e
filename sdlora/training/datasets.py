"""What a run trains on: the data folder (with `--reg-data`), or a kohya dataset TOML of datasets and subsets;
regularization images repeated to match the training images, as kohya's sd-scripts repeat them.

A dataset TOML is read with the keys and meanings of kohya's `--dataset_config` (its docs/config_README):
`[general]` options apply to every dataset, `[[datasets]]` options to its subsets, `[[datasets.subsets]]` options
to one image folder; a value given lower wins, then the run's own flags, then the defaults. Unknown keys, keys at a
level kohya does not take them, wrong types, and kohya options sdlora does not carry out are one-line errors naming
the key. Relative paths are from the current folder, as kohya reads them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..inference.generation import MAX_IMAGE_SIDE
from .buckets import Size, assign_bucket, bucket_sizes, no_upscale_bucket
from .config import DataConfig
from .data import (
    IMAGE_EXTENSIONS,
    MAX_REPEATS,
    CaptionRules,
    ImageRecord,
    caption_tags,
    displayed_size,
    find_images,
    read_text,
    split_validation,
    with_masks,
    with_trigger,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# ---------------------------------------------------------------- the key table

# where a key may stand: g = [general], d = [[datasets]], s = [[datasets.subsets]] (kohya's schema)
_SUBSET_ALL = "gds"
_INT, _FLOAT, _BOOL, _STR = int, float, bool, str


@dataclass(frozen=True)
class Key:
    levels: str  # where it may stand
    kind: Any  # int, float (int accepted), bool, str, "resolution" (int or [w, h]), "pair" ([a, b] of floats), dict
    default: Any = None  # kohya's default; a key that sdlora does not carry out is accepted only at it
    does: bool = True  # False: kohya's option, not carried out by sdlora (refused unless at its default)
    why: str = ""  # for those: what to do instead


KOHYA_KEYS: dict[str, Key] = {
    # dataset options ([general] or [[datasets]])
    "batch_size": Key("gd", _INT),
    "resolution": Key("gd", "resolution"),
    "enable_bucket": Key("gd", _BOOL),
    "min_bucket_reso": Key("gd", _INT),
    "max_bucket_reso": Key("gd", _INT),
    "bucket_reso_steps": Key("gd", _INT),
    "bucket_no_upscale": Key("gd", _BOOL, False),
    "network_multiplier": Key("gd", _FLOAT, 1.0, False, "train at weight 1"),
    "validation_split": Key("gd", _FLOAT, 0.0, False, "use --val-split"),
    "validation_seed": Key("gd", _INT, None, False, "use --val-split (held out by --seed)"),
    # subset options (anywhere)
    "image_dir": Key("s", _STR),
    "metadata_file": Key("s", _STR),
    "is_reg": Key("s", _BOOL, False),
    "num_repeats": Key(_SUBSET_ALL, _INT, 1),
    "class_tokens": Key(_SUBSET_ALL, _STR),
    "caption_extension": Key(_SUBSET_ALL, _STR),
    "caption_prefix": Key(_SUBSET_ALL, _STR),
    "caption_suffix": Key(_SUBSET_ALL, _STR),
    "shuffle_caption": Key(_SUBSET_ALL, _BOOL),
    "keep_tokens": Key(_SUBSET_ALL, _INT),
    "keep_tokens_separator": Key(_SUBSET_ALL, _STR),
    "secondary_separator": Key(_SUBSET_ALL, _STR),
    "enable_wildcard": Key(_SUBSET_ALL, _BOOL, False),
    "caption_dropout_rate": Key(_SUBSET_ALL, _FLOAT),
    "caption_tag_dropout_rate": Key(_SUBSET_ALL, _FLOAT),
    "flip_aug": Key(_SUBSET_ALL, _BOOL),
    "random_crop": Key(_SUBSET_ALL, _BOOL),
    "cache_info": Key(_SUBSET_ALL, _BOOL, False),  # kohya's image-size cache; sdlora reads sizes fast anyway
    "caption_separator": Key(_SUBSET_ALL, _STR, ",", False, "separate tags with commas"),
    "caption_dropout_every_n_epochs": Key(_SUBSET_ALL, _INT, 0, False, "use caption_dropout_rate"),
    "color_aug": Key(_SUBSET_ALL, _BOOL, False, False, "leave colours as they are (a style's colours are what it learns)"),
    "face_crop_aug_range": Key(_SUBSET_ALL, "pair", None, False, "crop faces beforehand"),
    "token_warmup_min": Key(_SUBSET_ALL, _INT, 1, False, "leave the token warm-up out"),
    "token_warmup_step": Key(_SUBSET_ALL, _FLOAT, 0, False, "leave the token warm-up out"),
    "alpha_mask": Key("s", _BOOL, False),  # the images' alpha channels are their loss masks (with --masked-loss)
    "resize_interpolation": Key(_SUBSET_ALL, _STR, None, False, "images are resized with Lanczos"),
    "custom_attributes": Key(_SUBSET_ALL, dict, None, False, "leave it out (it is for custom training scripts)"),
    "conditioning_data_dir": Key("s", _STR),  # the subset's loss masks (with --masked-loss), paired by file stem
}
_DATASET_KEYS = {name for name, key in KOHYA_KEYS.items() if key.levels == "gd"}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's sizes and batch: what its subsets share (unset: the run's own)."""

    resolution: Size | None = None  # (width, height)
    buckets: bool | None = None
    batch_size: int | None = None
    min_bucket: int | None = None
    max_bucket: int | None = None
    bucket_step: int | None = None
    no_upscale: bool = False  # kohya's bucket_no_upscale: an image smaller than the area gets a bucket of its own size


@dataclass
class TrainingData:
    """The datasets and their images: training (with repeats, regularization ones after the others) and held out."""

    datasets: list[DatasetSpec]
    records: list[ImageRecord]
    val_records: list[ImageRecord]
    unused_reg: int = 0  # regularization images left out because the training images needed fewer

    @property
    def structured(self) -> bool:
        """Whether there is more than one plain folder to say something about when the run starts."""
        return len(self.datasets) > 1 or any(record.subset or record.is_reg for record in self.records)


def rules_of(data: DataConfig) -> CaptionRules:
    """The run's flags as the caption rules of a plain data folder."""
    return CaptionRules(
        shuffle=data.shuffle_captions, keep_tokens=data.keep_tokens, tag_dropout=data.tag_dropout,
        caption_dropout=data.caption_dropout, flip=data.flip, crop=data.crop,
    )  # fmt: skip


def load_training_data(data: DataConfig, seed: int, output_dir: str) -> TrainingData:
    """The run's images: DATA_DIR (and --reg-data), or --dataset-config; the held-out ones taken from the training
    images only (regularization images are never held out, split by `seed`); no subset folder may hold `output_dir`."""
    if data.dataset_config:
        datasets, subsets = read_dataset_config(data.dataset_config, data, output_dir)
    else:
        records = find_images(
            data.data_dir, caption=data.caption, trigger=data.trigger, caption_extension=data.caption_extension,
            keep_tokens=data.keep_tokens,
        )  # fmt: skip
        flag = "--alpha-mask" if data.alpha_mask else "--mask-dir"
        records = with_masks(records, Path(data.data_dir), data.mask_dir, data.alpha_mask, f"{flag} (data folder {data.data_dir})")
        rules = rules_of(data)
        subsets = [[dataclasses.replace(record, rules=rules) for record in records]]
        if data.reg_data:
            subsets.append(_reg_folder(data, rules))
        datasets = [DatasetSpec()]
    records = [record for subset in subsets for record in subset]
    train = [record for record in records if not record.is_reg]
    train, val = split_validation(train, data.val_split, seed)
    records, unused = _with_reg_repeats(train, [record for record in records if record.is_reg], len(datasets))
    return TrainingData(datasets, records, val, unused)


def _reg_folder(data: DataConfig, rules: CaptionRules) -> list[ImageRecord]:
    """--reg-data: a plain folder or kohya's `N_class` subfolders, no trigger word (they are the class without it)."""
    try:
        records = find_images(
            data.reg_data, caption_extension=data.caption_extension,
            no_caption_hint="name the regularization folder's subfolders N_class (e.g. 1_person) or add caption files",
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"--reg-data: {err}") from None
    return [dataclasses.replace(record, rules=rules, is_reg=True) for record in records]


def reg_repeats(train_samples: int, repeats: Sequence[int]) -> list[int]:
    """Each regularization image's repeats per epoch, as kohya's DreamBoothDataset sets them: images are taken in
    order with their subset's repeats until they give as many samples as the training images (`train_samples`,
    repeats counted), then each in turn gets one more; images not reached get 0 (left out)."""
    counts = [0] * len(repeats)
    total, first = 0, True
    while total < train_samples and repeats:
        for index, repeat in enumerate(repeats):
            counts[index] += repeat if first else 1
            total += repeat if first else 1
            if total >= train_samples:
                break
        first = False
    return counts


def _with_reg_repeats(train: list[ImageRecord], reg: list[ImageRecord], datasets: int) -> tuple[list[ImageRecord], int]:
    """The training records, then each dataset's regularization records at `reg_repeats` (those at 0 left out)."""
    if reg and not train:
        raise UserError("only regularization images (is_reg) were found: add a subset of training images")
    kept: list[ImageRecord] = []
    for dataset in range(datasets):
        own = [record for record in reg if record.dataset == dataset]
        samples = sum(record.repeats for record in train if record.dataset == dataset)
        counts = reg_repeats(samples, [record.repeats for record in own])
        kept += [dataclasses.replace(record, repeats=count, subset_repeats=record.repeats) for record, count in zip(own, counts) if count]
    return train + kept, len(reg) - len(kept)


# ---------------------------------------------------------------- sizes and batches of each dataset


def dataset_sizes(spec: DatasetSpec, data: DataConfig) -> tuple[Size, bool]:
    """A dataset's (width, height) and whether it buckets: its own, else the run's."""
    size = spec.resolution or (data.resolution, data.resolution)
    return size, data.buckets if spec.buckets is None else spec.buckets


def record_buckets(training: TrainingData, data: DataConfig) -> list[Size]:
    """Each record's bucket, from its dataset's resolution and bucket options (kohya's min/max_bucket_reso,
    bucket_reso_steps, bucket_no_upscale)."""
    choices: dict[int, list[Size]] = {}
    buckets = []
    for record in training.records:
        spec = _with_run_buckets(training.datasets[record.dataset], data)
        (width, height), bucketing = dataset_sizes(spec, data)
        if not bucketing:
            buckets.append((width, height))
            continue
        if spec.no_upscale:
            buckets.append(no_upscale_bucket(record.width, record.height, width * height, spec.bucket_step or 64))
            continue
        if record.dataset not in choices:
            side = math.isqrt(width * height)
            choices[record.dataset] = bucket_sizes(side, spec.min_bucket, spec.max_bucket, spec.bucket_step, area=width * height)
        buckets.append(assign_bucket(record.width, record.height, choices[record.dataset]))
    return buckets


def _with_run_buckets(spec: DatasetSpec, data: DataConfig) -> DatasetSpec:
    """A dataset's bucket options, each from the run's options where the dataset leaves it out (as kohya falls back
    on its command line's)."""
    return dataclasses.replace(
        spec,
        min_bucket=spec.min_bucket if spec.min_bucket is not None else data.min_bucket_reso,
        max_bucket=spec.max_bucket if spec.max_bucket is not None else data.max_bucket_reso,
        bucket_step=spec.bucket_step if spec.bucket_step is not None else data.bucket_reso_steps,
        no_upscale=spec.no_upscale or data.bucket_no_upscale,
    )


def batch_sizes(training: TrainingData, data: DataConfig) -> list[int]:
    """Each dataset's batch size (kohya's batch_size; else --batch-size)."""
    return [spec.batch_size or data.batch_size for spec in training.datasets]


# ---------------------------------------------------------------- reading a dataset TOML


def read_dataset_config(path: str | Path, data: DataConfig, output_dir: str) -> tuple[list[DatasetSpec], list[list[ImageRecord]]]:
    """The datasets of a kohya dataset TOML (or JSON) and each subset's images with their rules, dataset index,
    repeats and regularization flag; raises a one-line ValueError naming the file and key for anything wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"--dataset-config {path}: no such file") from None
    try:
        document = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {err}") from None
    if not isinstance(document, dict):
        raise UserError(f"{path}: expected a table with [general] and [[datasets]]")
    unknown = sorted(set(document) - {"general", "datasets"})
    if unknown:
        raise UserError(f"{path}: unknown top-level key {unknown[0]!r}; a dataset config has [general] and [[datasets]]")
    general = _section(document.get("general", {}), "g", f"{path}: [general]")
    datasets = document.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"{path}: no [[datasets]]; add one with at least one [[datasets.subsets]] image_dir")
    specs: list[DatasetSpec] = []
    subsets: list[list[ImageRecord]] = []
    for number, dataset in enumerate(datasets):
        where = f"{path}: datasets[{number}]"
        if not isinstance(dataset, dict):
            raise UserError(f"{where}: expected a table")
        own = _section({k: v for k, v in dataset.items() if k != "subsets"}, "d", where)
        parts = dataset.get("subsets")
        if parts is not None and not (isinstance(parts, list) and all(isinstance(part, dict) for part in parts)):
            raise UserError(f"{where}: subsets must be an array of [[datasets.subsets]] tables, each with an image_dir, got {parts!r:.60}")
        if not parts:
            raise UserError(f"{where}: no [[datasets.subsets]]; give each dataset at least one with an image_dir")
        merged = {**general, **own}
        specs.append(_checked_buckets(_dataset_spec(merged, where), data, where))
        seen: set[str] = set()
        for index, subset in enumerate(parts):
            at = f"{where}.subsets[{index}]"
            if not isinstance(subset, dict):
                raise UserError(f"{at}: expected a table")
            options = {**merged, **_section(subset, "s", at)}
            source = str(options.get("metadata_file") or options.get("image_dir") or "")
            if source in seen:  # kohya ignores a repeated subset of one dataset; a repeat is almost always a slip
                raise UserError(f"{at}: {source} is already a subset of this dataset; remove one, or use num_repeats")
            seen.add(source)
            subsets.append(_subset_records(options, number, data, output_dir, at))
    return specs, subsets


def _section(table: Any, level: str, where: str) -> dict[str, Any]:
    """The table's options, each checked: known, allowed at this level, of its type, carried out by sdlora."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table")
    names = {"g": "[general]", "d": "[[datasets]]", "s": "[[datasets.subsets]]"}
    options = {}
    for name, value in table.items():
        key = KOHYA_KEYS.get(name)
        if name == "subsets":  # a dataset's subsets, as an array of tables; not an option
            raise UserError(
                f"{where}: subsets belongs under [[datasets]], as an array of [[datasets.subsets]] tables each with an image_dir"
            )
        if key is None:
            close = difflib.get_close_matches(name, [*KOHYA_KEYS, "subsets"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown key {name!r}{hint}")
        if level not in key.levels:
            allowed = " or ".join(names[level] for level in key.levels)
            raise UserError(f"{where}: {name} belongs in {allowed}, not {names[level]}")
        value = _typed(name, value, key.kind, where)
        if not key.does and value != key.default:
            raise UserError(f"{where}: {name} = {value!r} is a kohya option sdlora does not carry out; {key.why}, or remove it")
        options[name] = value
    return options


def _typed(name: str, value: Any, kind: Any, where: str) -> Any:
    expected = {_INT: "an integer", _FLOAT: "a number", _BOOL: "true or false", _STR: "a string", dict: "a table",
                "resolution": "a size such as 512 or [768, 512]", "pair": "a pair of numbers such as [1.0, 3.0]"}[kind]  # fmt: skip
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "resolution":
        sides = [value, value] if number else value
        ok = isinstance(sides, list) and len(sides) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in sides)
        if ok and all(64 <= s <= MAX_IMAGE_SIDE and s % 8 == 0 for s in sides):
            return (sides[0], sides[1])
        if ok:
            expected = f"sides that are multiples of 8 from 64 to {MAX_IMAGE_SIDE}"
        ok = False
    elif kind == "pair":
        ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    elif kind is _FLOAT:
        ok = number
        value = float(value) if ok else value
    elif kind is _INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise UserError(f"{where}: {name} must be {expected}, got {value!r}")
    return value


def _dataset_spec(options: dict[str, Any], where: str) -> DatasetSpec:
    for name in ("batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if name in options and options[name] < 1:
            raise UserError(f"{where}: {name} must be at least 1, got {options[name]}")
    low, high = options.get("min_bucket_reso"), options.get("max_bucket_reso")
    if low is not None and high is not None and low > high:
        raise UserError(f"{where}: min_bucket_reso {low} is above max_bucket_reso {high}; swap them or lower min_bucket_reso")
    step = options.get("bucket_reso_steps")
    for name in ("min_bucket_reso", "max_bucket_reso"):
        if step and name in options and options[name] % step:
            raise UserError(f"{where}: {name} {options[name]} is not a multiple of bucket_reso_steps {step}")
    return DatasetSpec(
        resolution=options.get("resolution"), buckets=options.get("enable_bucket"), batch_size=options.get("batch_size"),
        min_bucket=options.get("min_bucket_reso"), max_bucket=options.get("max_bucket_reso"), bucket_step=step,
        no_upscale=options.get("bucket_no_upscale", False),
    )  # fmt: skip


def _checked_buckets(spec: DatasetSpec, data: DataConfig, where: str) -> DatasetSpec:
    """`spec`, once its bucket options are known to leave buckets at its resolution (else an error naming them);
    unchecked while the resolution is the model's, not yet known."""
    (width, height), bucketing = dataset_sizes(spec, data)
    if width is None or bucketing is False or spec.no_upscale or not (spec.min_bucket or spec.max_bucket or spec.bucket_step):
        return spec
    try:
        bucket_sizes(math.isqrt(width * height), spec.min_bucket, spec.max_bucket, spec.bucket_step, area=width * height)
    except ValueError as err:
        raise UserError(f"{where}: min_bucket_reso, max_bucket_reso and bucket_reso_steps leave {err}") from None
    return spec


def _subset_records(options: dict[str, Any], dataset: int, data: DataConfig, output_dir: str, where: str) -> list[ImageRecord]:
    """One subset's images with its options, falling back to the run's flags."""
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= options.get(name, 0.0) < 1.0:
            raise UserError(f"{where}: {name} must be in [0, 1), got {options[name]}")
    repeats, keep_tokens = options.get("num_repeats", 1), options.get("keep_tokens", data.keep_tokens)
    if repeats < 1:  # kohya skips such a subset with a warning; a subset that trains nothing is a mistake
        raise UserError(f"{where}: num_repeats must be at least 1, got {repeats}")
    if repeats > MAX_REPEATS:  # each repeat is an entry of the epoch's sample list
        raise UserError(f"{where}: num_repeats {repeats} is above {MAX_REPEATS}; lower it and train for more steps instead")
    if keep_tokens < 0:
        raise UserError(f"{where}: keep_tokens must be zero or more, got {keep_tokens}")
    is_reg = options.get("is_reg", False)
    rules = CaptionRules(
        shuffle=options.get("shuffle_caption", data.shuffle_captions), keep_tokens=keep_tokens,
        keep_separator=options.get("keep_tokens_separator", ""), secondary_separator=options.get("secondary_separator", ""),
        wildcards=options.get("enable_wildcard", False), tag_dropout=options.get("caption_tag_dropout_rate", data.tag_dropout),
        caption_dropout=options.get("caption_dropout_rate", data.caption_dropout), flip=options.get("flip_aug", data.flip),
        crop="random" if options.get("random_crop", data.crop == "random") else "center",
    )  # fmt: skip
    trigger = None if is_reg else data.trigger  # regularization images show the class without the trigger
    # the run's --alpha-mask stands in for a training subset that does not say (kohya's fallback to its command line)
    alpha_mask, mask_dir = options.get("alpha_mask", data.alpha_mask and not is_reg), options.get("conditioning_data_dir")
    if alpha_mask and mask_dir:
        raise UserError(f"{where}: alpha_mask and conditioning_data_dir are two mask sources for one subset: keep one")
    if mask_dir and "metadata_file" in options:
        raise UserError(f"{where}: conditioning_data_dir goes with an image_dir subset (kohya pairs masks with its files by name)")
    if "metadata_file" in options:
        records = _metadata_file_records(Path(options["metadata_file"]), options.get("image_dir"), where)
        records = with_masks(records, Path(options.get("image_dir") or "."), None, alpha_mask, where)
        name = Path(options["metadata_file"]).name
    elif "image_dir" in options:
        folder = Path(options["image_dir"])
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{where}: image_dir {folder} is not a folder (relative paths are from the current folder, as kohya reads them)"
            )
        _check_outside(folder, output_dir, where)
        try:
            records = find_images(
                folder, caption=options.get("class_tokens"), caption_extension=options.get("caption_extension", data.caption_extension),
                flat=True, no_caption_hint="give the subset class_tokens or add caption files",
            )  # fmt: skip
        except ValueError as err:  # no images, none readable, no captions: said with where the subset is
            raise UserError(f"{where}: {err}") from None
        if mask_dir:
            _check_outside(Path(mask_dir), output_dir, where)
        records = with_masks(records, folder, mask_dir, alpha_mask, where)
        name = folder.resolve().name
    else:
        raise UserError(f"{where}: no image_dir; each [[datasets.subsets]] names its folder of images")
    prefix, suffix = options.get("caption_prefix"), options.get("caption_suffix")
    # captions from files must hold the tags keep_tokens keeps; class tokens standing in for one are kept whole
    short = [r.path.name for r in records if r.caption != options.get("class_tokens") and len(caption_tags(r.caption)) < keep_tokens]
    if short and not rules.keep_separator:
        raise UserError(f"{where}: keep_tokens {keep_tokens} is more than the captions of {', '.join(short[:5])} hold; lower it")
    out = []
    for record in records:
        caption = record.caption
        caption = f"{prefix} {caption}" if prefix else caption  # joined with a space, as kohya joins them
        caption = f"{caption} {suffix}" if suffix else caption
        caption = with_trigger(caption, trigger)
        out.append(dataclasses.replace(record, caption=caption, subset=name, repeats=repeats, rules=rules, is_reg=is_reg, dataset=dataset))
    return out


def _check_outside(folder: Path, output_dir: str, where: str) -> None:
    output, folder = Path(output_dir).resolve(), folder.resolve()
    if output == folder or folder in output.parents:
        raise UserError(f"{where}: --output {output_dir} is inside {folder}: its samples would become training data")


def _metadata_file_records(metadata: Path, image_dir: str | None, where: str) -> list[ImageRecord]:
    """kohya's fine-tuning metadata JSON, {image: {"caption": ..., "tags": ...}}: each image (a path, or a name in
    image_dir with or without its extension) with its caption and then its tags."""
    try:
        entries = json.loads(read_text(metadata))
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: metadata_file {metadata} not found (relative paths are from the current folder)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: metadata_file {metadata} is not valid JSON ({err.msg})") from None
    if not isinstance(entries, dict) or not entries:
        raise UserError(f"{where}: metadata_file {metadata} holds no images (expected {{image: {{caption, tags}}}})")
    records = []
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise UserError(f"{where}: {metadata} entry {key!r} is not an object with caption/tags")
        image = _metadata_image(key, image_dir)
        if image is None:
            raise FileNotFoundError(
                f"{where}: {metadata} names {key!r}, which is not an image file{f' in {image_dir}' if image_dir else ''}"
            )
        size = displayed_size(image)
        if isinstance(size, str):
            raise UserError(f"{where}: cannot read {image} ({size})")
        for name in ("caption", "tags"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise UserError(f"{where}: {metadata} entry {key!r}: {name} must be a string, got {entry[name]!r:.60}")
        caption, tags = (entry.get(name) or "" for name in ("caption", "tags"))
        text = ", ".join(part.strip() for part in (caption.split("\n")[0], tags) if part and part.strip())
        if not text:
            raise UserError(f"{where}: {metadata} gives {key!r} neither caption nor tags")
        records.append(ImageRecord(image, text, *size))
    return sorted(records, key=lambda record: str(record.path))


def _metadata_image(key: str, image_dir: str | None) -> Path | None:
    candidates = [Path(key)] + ([Path(image_dir) / key] if image_dir else [])
    candidates += [Path(str(c) + extension) for c in candidates[:] for extension in IMAGE_EXTENSIONS]
    return next((c for c in candidates if c.is_file() and c.suffix.lower() in IMAGE_EXTENSIONS), None)
