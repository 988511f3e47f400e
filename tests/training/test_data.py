"""data.py and buckets.py: finding images and captions, hostile folders, buckets, transforms, the batch sampler."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdlora.training.buckets import BucketBatchSampler, assign_bucket, bucket_sizes
from sdlora.training.data import ImageRecord, crop_box, drop_captions, find_images, load_image, split_validation

GREY, RED, BLUE, GREEN, YELLOW = (128, 128, 128), (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)


def save_image(path: Path, size: tuple[int, int] = (32, 24), colour=(200, 30, 30), caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def striped(path: Path, size: tuple[int, int]) -> Path:
    """Grey with a red left, blue right, green top and yellow bottom border, each 1/20 of the side."""
    width, height = size
    image = Image.new("RGB", size, GREY)
    image.paste(RED, (0, 0, width // 20, height))
    image.paste(BLUE, (width - width // 20, 0, width, height))
    image.paste(GREEN, (width // 20, 0, width - width // 20, height // 20))
    image.paste(YELLOW, (width // 20, height - height // 20, width - width // 20, height))
    image.save(path)
    return path


def colour_at(pixels: torch.Tensor, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(round(v)) for v in ((pixels[:, y, x] + 1) * 127.5).tolist())


def near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


# ---------------------------------------------------------------- finding images and captions


def test_sidecar_captions_nested_folders_sorted_with_sizes(tmp_path):
    save_image(tmp_path / "b.png", (40, 30), caption="  a red square \n")
    save_image(tmp_path / "a" / "deep" / "c.jpg", (20, 50), caption="a tall thing")
    save_image(tmp_path / "a" / "d.jpeg", (16, 16), caption="small")
    save_image(tmp_path / ".ipynb_checkpoints" / "e.png", caption="hidden copy")
    (tmp_path / "notes.txt").write_text("not a caption")
    records = find_images(tmp_path)
    assert [r.path.relative_to(tmp_path).as_posix() for r in records] == ["a/d.jpeg", "a/deep/c.jpg", "b.png"]
    assert [r.caption for r in records] == ["small", "a tall thing", "a red square"]
    assert [(r.width, r.height) for r in records] == [(16, 16), (20, 50), (40, 30)]


def test_webp_images_are_found_and_loaded(tmp_path):
    save_image(tmp_path / "x.webp", (48, 32), colour=(10, 200, 10), caption="green")
    (record,) = find_images(tmp_path)
    assert (record.width, record.height, record.caption) == (48, 32, "green")
    assert near(colour_at(load_image(record, (32, 32)), 16, 16), (10, 200, 10))


def test_metadata_jsonl_takes_precedence_and_sidecars_fill_the_rest(tmp_path):
    save_image(tmp_path / "one.png", caption="sidecar loses")
    save_image(tmp_path / "sub" / "two.png")
    save_image(tmp_path / "three.png", caption="sidecar used")
    lines = [{"file_name": "one.png", "text": " from metadata "}, {"file_name": "./sub/two.png", "text": "nested entry", "extra": 1}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    captions = {r.path.relative_to(tmp_path).as_posix(): r.caption for r in find_images(tmp_path)}
    assert captions == {"one.png": "from metadata", "sub/two.png": "nested entry", "three.png": "sidecar used"}


def test_fixed_caption_for_all_without_warning_and_trigger_in_front(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = find_images(tmp_path, caption=" a photo of a cat ", trigger="sks")
    assert [r.caption for r in records] == ["sks, a photo of a cat"] * 2


def test_trigger_is_prepended_once(tmp_path):
    save_image(tmp_path / "a.png", caption="red car")
    save_image(tmp_path / "b.png", caption="sks, already tagged")
    save_image(tmp_path / "c.png", caption="sks")
    records = find_images(tmp_path, trigger="sks")
    assert [r.caption for r in records] == ["sks, red car", "sks, already tagged", "sks"]


def test_some_images_without_caption_use_the_fallback_with_a_warning_naming_how_many(tmp_path):
    save_image(tmp_path / "a.png", caption="captioned")
    save_image(tmp_path / "b.png")
    save_image(tmp_path / "c.png", caption="   ")  # blank counts as missing
    with pytest.warns(UserWarning, match=r"2 images have no caption .*b\.png, c\.png"):
        records = find_images(tmp_path, caption="a cat", trigger="sks")
    assert [r.caption for r in records] == ["sks, captioned", "sks, a cat", "sks, a cat"]
    with pytest.warns(UserWarning, match="2 images have no caption and use the trigger alone"):
        records = find_images(tmp_path, trigger="sks")
    assert [r.caption for r in records] == ["sks, captioned", "sks", "sks"]


def test_missing_captions_without_fallback_is_a_one_line_error_naming_the_files(tmp_path):
    for index in range(7):
        save_image(tmp_path / f"img{index}.png", caption="ok" if index == 0 else None)
    with pytest.raises(ValueError) as err:
        find_images(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("6 images have no caption (img1.png, img2.png")
    assert "and 1 more" in message and message.endswith("pass --caption or --trigger or add .txt files")


def test_corrupt_and_truncated_images_are_skipped_with_a_warning_naming_them(tmp_path):
    save_image(tmp_path / "good.jpg", (64, 64), caption="good")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    (tmp_path / "garbage.txt").write_text("bad")
    noise = Image.effect_noise((256, 256), 64).convert("RGB")
    noise.save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "full.jpg").unlink()
    noise.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "full.png").unlink()
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable images .*garbage\.jpg.*half\.jpg.*half\.png"):
        records = find_images(tmp_path, caption="x")
    assert [r.path.name for r in records] == ["good.jpg"]


def test_only_corrupt_images_is_an_error(tmp_path):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"\x89PNG broken")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error names the files: no warning repeating them
        with pytest.raises(ValueError, match=r"no readable images in .*all 2 failed.*a\.png.*b\.jpg"):
            find_images(tmp_path, caption="x")


def test_empty_and_missing_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images \(png, jpg, jpeg, webp\) found in .*empty"):
        find_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is not a folder"):
        find_images(tmp_path / "empty" / "readme.txt")


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"file_name": "a.png", "text": "x"', r"metadata\.jsonl line 2: not valid JSON"),
        ('["a.png", "x"]', r"metadata\.jsonl line 2: expected an object"),
        ('{"file_name": "a.png", "text": 3}', r"line 2: \"text\" must be a string"),
        ('{"file_name": "../x.png", "text": "x"}', r"line 2: file_name '\.\./x\.png' points outside the data folder"),
        ('{"file_name": "sub/../../x.png", "text": "x"}', r"line 2: file_name 'sub/\.\./\.\./x\.png' points outside"),
        ('{"file_name": "/etc/x.png", "text": "x"}', r"line 2: file_name '/etc/x\.png' is an absolute path"),
        ('{"file_name": "C:\\\\x.png", "text": "x"}', r"line 2: file_name 'C:\\\\x\.png' is an absolute path"),
        ('{"file_name": "b.png", "text": "x"}', r"line 2: b\.png not found in"),
        ('{"file_name": "a.png", "text": "again"}', r"line 2: a\.png is listed twice"),
        ('{"file_name": "a.txt", "text": "x"}', r"line 2: a\.txt is not a png/jpg/jpeg/webp image"),
    ],
)
def test_bad_metadata_lines_are_errors_naming_file_and_line(tmp_path, line, match):
    save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sidecar")
    (tmp_path.parent / "x.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n' + line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        find_images(tmp_path)


def test_exif_rotation_and_transparency(tmp_path):
    image = Image.new("RGB", (60, 20), RED)
    exif = image.getexif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees: portrait
    image.save(tmp_path / "rotated.jpg", exif=exif)
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    rotated, transparent = sorted(find_images(tmp_path, caption="x"), key=lambda r: r.path.name, reverse=True)
    assert (rotated.width, rotated.height) == (20, 60)
    assert load_image(rotated, (16, 48)).shape == (3, 48, 16)
    assert near(colour_at(load_image(transparent, (16, 16)), 8, 8), (255, 255, 255), 0)  # laid on white, not black


# ---------------------------------------------------------------- buckets and transforms


def test_bucket_sizes_at_512_have_bounded_area_multiples_of_64_and_mirror():
    buckets = bucket_sizes(512)
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) for w, h in buckets)
    assert {(512, 512), (384, 640), (640, 384), (256, 1024), (1024, 256)} <= set(buckets)
    assert set(buckets) == {(h, w) for w, h in buckets}
    # no bucket could grow on both sides and stay within the area: none wastes pixels
    assert not any((w + 64) * (h + 64) <= 512 * 512 for w, h in buckets)


def test_small_resolutions_still_get_several_buckets():
    buckets = bucket_sizes(64)
    assert len(buckets) > 3 and (64, 64) in buckets
    assert all(w * h <= 64 * 64 and w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert bucket_sizes(256) == sorted(bucket_sizes(256)) and all(w % 64 == 0 for w, _ in bucket_sizes(256))


def test_assign_bucket_by_closest_aspect_independent_of_list_order():
    buckets = bucket_sizes(512)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(3000, 1000, buckets) == assign_bucket(3000, 1000, list(reversed(buckets)))
    assert assign_bucket(100, 10_000, buckets) == (256, 1024)  # beyond the widest ratio: the extreme bucket


def test_portrait_landscape_square_get_own_buckets_without_square_crop(tmp_path):
    for name, size in (("portrait", (384, 640)), ("landscape", (640, 384)), ("square", (500, 500))):
        striped(tmp_path / f"{name}.png", size)
    records = find_images(tmp_path, caption="x")
    buckets = bucket_sizes(512)
    assigned = [assign_bucket(r.width, r.height, buckets) for r in records]
    assert len(set(assigned)) == 3
    for record, (width, height) in zip(records, assigned):
        assert width * height <= 512 * 512 and width % 64 == 0 and height % 64 == 0
        assert abs(math.log((width / height) / (record.width / record.height))) < math.log(1.15)
        scale, left, top = crop_box((record.width, record.height), (width, height))
        assert 2 * left < 0.1 * record.width * scale and 2 * top < 0.1 * record.height * scale
        pixels = load_image(record, (width, height))
        assert pixels.shape == (3, height, width) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        # all four borders survive: nothing was cropped to a square
        assert near(colour_at(pixels, width // 80, height // 2), RED)
        assert near(colour_at(pixels, width - 1 - width // 80, height // 2), BLUE)
        assert near(colour_at(pixels, width // 2, height // 80), GREEN)
        assert near(colour_at(pixels, width // 2, height - 1 - height // 80), YELLOW)


def test_every_aspect_from_1_4_to_4_1_finds_a_bucket_within_17_percent_at_512():
    buckets = bucket_sizes(512)
    ratios = [math.exp(math.log(0.25) + i / 400 * math.log(16)) for i in range(401)]
    worst = 0.0
    for ratio in ratios:
        width, height = assign_bucket(round(ratio * 1000), 1000, buckets)
        worst = max(worst, abs(math.log(width / height / ratio)))
    assert math.exp(worst) - 1 < 0.17


def test_without_buckets_everything_is_square_and_portrait_loses_its_top(tmp_path):
    striped(tmp_path / "portrait.png", (384, 640))
    striped(tmp_path / "landscape.png", (640, 384))
    for record in find_images(tmp_path, caption="x"):
        pixels = load_image(record, (512, 512))
        assert pixels.shape == (3, 512, 512)
        assert near(colour_at(pixels, 256, 256), GREY)
    portrait = next(r for r in find_images(tmp_path, caption="x") if r.path.name == "portrait.png")
    assert near(colour_at(load_image(portrait, (512, 512)), 256, 2), GREY)  # the green top band was cropped away


def test_flip_mirrors_and_random_crop_is_seeded(tmp_path):
    striped(tmp_path / "wide.png", (300, 100))
    (record,) = find_images(tmp_path, caption="x")
    plain = load_image(record, (96, 32))
    flipped = load_image(record, (96, 32), flip=True)
    assert torch.equal(flipped, plain.flip(2)) and not torch.equal(flipped, plain)
    scale, left, top = crop_box((300, 100), (64, 64))
    assert (top, left) == (0, (round(300 * scale) - 64) // 2)
    assert near(colour_at(load_image(record, (64, 64), crop="random", rng=random.Random(0)), 32, 1), GREEN)
    gradient = Image.linear_gradient("L").rotate(90).resize((768, 256)).convert("RGB")  # brightness varies along x
    gradient.save(tmp_path / "gradient.png")
    record = ImageRecord(tmp_path / "gradient.png", "x", 768, 256)
    crops = [load_image(record, (64, 64), crop="random", rng=random.Random(seed)) for seed in (1, 1, 2, 3)]
    assert torch.equal(crops[0], crops[1])
    assert len({round(crop.mean().item(), 4) for crop in crops}) == 3
    with pytest.raises(ValueError, match="crop must be"):
        load_image(record, (64, 64), crop="top")


def test_load_image_of_a_file_gone_bad_names_it(tmp_path):
    record = ImageRecord(tmp_path / "gone.png", "x", 10, 10)
    with pytest.raises(ValueError, match="cannot read image .*gone.png"):
        load_image(record, (16, 16))


def test_bucketed_images_load_at_their_bucket_and_batch_by_bucket(tmp_path):
    striped(tmp_path / "a.png", (384, 640))
    striped(tmp_path / "b.png", (390, 650))
    striped(tmp_path / "c.png", (640, 384))
    records = find_images(tmp_path, caption="x", trigger="sks")
    sizes = [assign_bucket(r.width, r.height, bucket_sizes(256)) for r in records]
    assert records[2].caption == "sks, x"
    batches = list(BucketBatchSampler(sizes, 2, seed=0))
    shapes = sorted((len(batch), tuple(load_image(records[batch[0]], sizes[batch[0]]).shape)) for batch in batches)
    assert shapes == [(1, (3, 192, 320)), (2, (3, 320, 192))]  # the two portraits share a batch, the landscape is alone


# ---------------------------------------------------------------- batch sampler and validation split


def mixed_buckets(count: int = 23) -> list[tuple[int, int]]:
    shapes = [(512, 512), (384, 640), (640, 384), (320, 768)]
    rng = random.Random(0)
    return [rng.choice(shapes) for _ in range(count)]


def test_sampler_batches_never_mix_buckets_and_cover_every_index_once():
    buckets = mixed_buckets()
    sampler = BucketBatchSampler(buckets, 4, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len({buckets[i] for i in batch}) == 1 and 1 <= len(batch) <= 4 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(buckets)))


def test_sampler_is_deterministic_per_seed_and_epoch_and_changes_between_epochs():
    buckets = mixed_buckets()
    first, again, other_seed = (
        BucketBatchSampler(buckets, 3, seed=1),
        BucketBatchSampler(buckets, 3, seed=1),
        BucketBatchSampler(buckets, 3, seed=2),
    )
    assert list(first) == list(again)
    assert list(first) != list(other_seed)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    first.set_epoch(0)
    assert list(first) == epoch0


def test_sampler_drop_last_keeps_only_full_batches():
    buckets = [(64, 64)] * 5 + [(32, 128)] * 3
    assert sorted(len(b) for b in BucketBatchSampler(buckets, 2)) == [1, 1, 2, 2, 2]
    dropped = list(BucketBatchSampler(buckets, 2, drop_last=True))
    assert len(dropped) == 3 and all(len(b) == 2 for b in dropped)
    with pytest.raises(ValueError, match="at least one image"):
        BucketBatchSampler([], 2)
    with pytest.raises(ValueError, match="no batch of 8 fits"):
        BucketBatchSampler(buckets, 8, drop_last=True)


def test_two_ranks_get_disjoint_equal_slices_of_each_epoch():
    buckets = [(64, 64)] * 8 + [(32, 128)] * 4  # 6 batches of 2: divides between 2 ranks
    for epoch in range(3):
        ranks = [BucketBatchSampler(buckets, 2, seed=4, num_replicas=2, rank=r) for r in range(2)]
        for sampler in ranks:
            sampler.set_epoch(epoch)
        slices = [list(sampler) for sampler in ranks]
        assert len(slices[0]) == len(slices[1]) == len(ranks[0]) == 3
        seen = [{i for batch in part for i in batch} for part in slices]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))
        assert sorted(slices[0] + slices[1]) == sorted(BucketBatchSampler(buckets, 2, seed=4).epoch_batches(epoch))


def test_uneven_batch_counts_are_topped_up_so_ranks_step_equally():
    buckets = [(64, 64)] * 5  # 3 batches of 2 over 2 ranks; and 1 batch over 4 ranks
    slices = [list(BucketBatchSampler(buckets, 2, num_replicas=2, rank=r)) for r in range(2)]
    assert len(slices[0]) == len(slices[1]) == 2
    assert {i for part in slices for batch in part for i in batch} == set(range(5))
    tiny = [list(BucketBatchSampler([(64, 64)] * 2, 4, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(part) == 1 and sorted(part[0]) == [0, 1] for part in tiny)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        BucketBatchSampler(buckets, 2, num_replicas=2, rank=2)


def test_split_validation_is_seeded_disjoint_and_keeps_some_training_images():
    records = [ImageRecord(Path(f"{i}.png"), str(i), 8, 8) for i in range(10)]
    train, val = split_validation(records, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and not {r.path for r in train} & {r.path for r in val}
    assert split_validation(records, 0.2, seed=3) == (train, val)
    assert split_validation(records, 0.2, seed=4) != (train, val)
    assert train == sorted(train, key=lambda r: int(r.caption))
    assert split_validation(records, 0.0, seed=3) == (records, [])
    assert len(split_validation(records[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_validation(records[:1], 0.5, seed=0)


def test_caption_dropout_rate_and_reproducibility():
    captions = ["a photo of sks"] * 20_000
    dropped = drop_captions(captions, 0.3, random.Random(11))
    rate = dropped.count("") / len(captions)
    assert rate == pytest.approx(0.3, abs=0.015)
    assert set(dropped) == {"", "a photo of sks"}
    assert drop_captions(captions, 0.3, random.Random(11)) == dropped
    rng = random.Random(3)
    state = rng.getstate()
    assert drop_captions(["x", "y"], 0.0, rng) == ["x", "y"] and rng.getstate() == state  # p = 0 draws nothing
    assert drop_captions(["x", "y"], 1.0, rng) == ["", ""]
    with pytest.raises(ValueError, match="caption_dropout"):
        drop_captions(["x"], 1.5, rng)
