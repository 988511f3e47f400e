"""Data laid out for kohya's sd-scripts: `N_words` subfolders (N repeats per epoch, `words` the class tokens), tag
shuffling with the first tokens kept, tag dropout, caption extensions, epochs counted as kohya counts them, and
the dataset metadata (`ss_tag_frequency`, `ss_dataset_dirs`) in kohya's structure."""

from __future__ import annotations

import collections
import json
import math
import random

import pytest
from PIL import Image

from sdlora.training.buckets import BucketBatchSampler
from sdlora.training.data import dataset_summary, drop_tags, find_images, shuffle_tags
from sdlora.training.outputs import dataset_dirs, tag_frequency
from sdlora.training.recipe import epoch_steps


def _images(folder, count, captions=None, size=(64, 48), extension=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", size, (index * 40, 90, 200)).save(folder / f"img{index}.png")
        if captions is not None:
            (folder / f"img{index}{extension}").write_text(captions[index % len(captions)])
    return folder


@pytest.fixture
def kohya_dir(tmp_path):
    root = tmp_path / "data"
    _images(root / "10_alpha", 3, ["red circle, flat", "alpha, blue circle, flat, bold"])
    _images(root / "5_beta style", 2)  # no captions: the class tokens are the caption, as kohya does
    return root


def test_subfolders_named_n_words_are_subsets_with_repeats_and_class_tokens(kohya_dir):
    records = find_images(kohya_dir)
    assert [(r.subset, r.repeats) for r in records] == [("10_alpha", 10)] * 3 + [("5_beta style", 5)] * 2
    captions = [r.caption for r in records]
    assert captions[0] == "alpha, red circle, flat"  # the class tokens put in front where the caption lacks them
    assert captions[1] == "alpha, blue circle, flat, bold"  # already there: not twice
    assert captions[3] == captions[4] == "beta style"
    assert dataset_summary(records) == "2 subsets, 5 images, 40 samples per epoch"


def test_an_epoch_holds_each_image_its_repeats_times(kohya_dir):
    records = find_images(kohya_dir)
    sampler = BucketBatchSampler([(64, 48)] * len(records), batch_size=3, seed=1, repeats=[r.repeats for r in records])
    seen = collections.Counter(index for batch in sampler.epoch_batches(0) for index in batch)
    assert seen == {0: 10, 1: 10, 2: 10, 3: 5, 4: 5}
    assert len(sampler) == math.ceil(40 / 3)
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)  # reshuffled every epoch


def test_epochs_count_steps_as_kohya(kohya_dir):
    # kohya: max_train_steps = epochs * ceil(len(dataloader) / processes / grad_accum), the dataloader's batches per bucket
    assert epoch_steps(batches_per_epoch=14, grad_accum=1, epochs=3) == 42
    assert epoch_steps(batches_per_epoch=14, grad_accum=4, epochs=3) == 12
    records = find_images(kohya_dir)
    sizes = [(64, 48)] * 3 + [(48, 64)] * 2  # two buckets: 30 and 10 samples
    sampler = BucketBatchSampler(sizes, batch_size=4, repeats=[r.repeats for r in records])
    assert len(sampler) == math.ceil(30 / 4) + math.ceil(10 / 4) == 11


def test_plain_folders_keep_todays_behaviour(tmp_path):
    _images(tmp_path / "data" / "nested", 2, ["a red circle"])
    records = find_images(tmp_path / "data", trigger="sks")
    assert [(r.subset, r.repeats, r.caption) for r in records] == [("", 1, "sks, a red circle")] * 2


@pytest.mark.parametrize(
    "folder, says",
    [
        ("0_alpha", "0_alpha: N in N_words is the repeats per epoch and must be at least 1"),
        ("x_alpha", "x_alpha: not named N_words"),
        ("99999999999999999999_cat", "99999999999999999999_cat: N in N_words is the repeats per epoch and must be at most 10000"),
    ],
)
def test_bad_subset_folders_are_one_line(tmp_path, folder, says):
    root = tmp_path / "data"
    _images(root / "3_good", 1, ["a"])
    _images(root / folder, 1, ["a"])
    with pytest.raises(ValueError) as caught:
        find_images(root)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_images_beside_the_subsets_are_an_error(tmp_path):
    root = tmp_path / "data"
    _images(root / "3_good", 1, ["a"])
    _images(root, 1, ["loose"])
    with pytest.raises(ValueError, match="not in any N_words subfolder"):
        find_images(root)


def test_caption_extension(tmp_path):
    root = _images(tmp_path / "data" / "2_x", 2, ["from the caption file"], extension=".caption")
    (root / "img0.txt").write_text("from the txt file")
    assert [r.caption for r in find_images(tmp_path / "data", caption_extension=".caption")] == ["x, from the caption file"] * 2
    assert [r.caption for r in find_images(tmp_path / "data", caption_extension="caption")] == ["x, from the caption file"] * 2
    assert [r.caption for r in find_images(tmp_path / "data")][0] == "x, from the txt file"


def test_keep_tokens_never_move_over_a_thousand_shuffles():
    caption = "sks, 1girl, solo, red hair, smile, outdoors, sky, tree"
    rng = random.Random(0)
    orders = set()
    for _ in range(1000):
        tags = shuffle_tags(caption, keep_tokens=2, rng=rng).split(", ")
        assert tags[:2] == ["sks", "1girl"]
        assert sorted(tags) == sorted(caption.split(", "))
        orders.add(tuple(tags))
    assert len(orders) > 100  # the rest does move


def test_tag_dropout_drops_only_tags_after_the_kept_ones_at_its_rate():
    caption = ", ".join(["keep", "also kept"] + [f"tag{i}" for i in range(40)])
    rng = random.Random(3)
    kept = []
    for _ in range(500):
        tags = drop_tags(caption, keep_tokens=2, rate=0.25, rng=rng).split(", ")
        assert tags[:2] == ["keep", "also kept"]
        kept.append(len(tags) - 2)
    assert abs(sum(kept) / len(kept) / 40 - 0.75) < 0.02
    assert drop_tags(caption, 2, 0.0, random.Random(1)) == caption


def test_keep_tokens_larger_than_a_caption_is_an_error(kohya_dir):
    with pytest.raises(ValueError, match="--keep-tokens 3: .*img.\\.png.* has 1 tag"):
        find_images(kohya_dir, keep_tokens=3)


def test_metadata_has_kohyas_structure_and_counts(kohya_dir):
    records = find_images(kohya_dir)
    frequency = json.loads(json.dumps(tag_frequency(records)))  # as it is stored: JSON text
    # A1111's build_tags and kohya's tools read {folder: {tag: count}}: objects of objects
    assert all(isinstance(tags, dict) and all(isinstance(n, int) for n in tags.values()) for tags in frequency.values())
    assert frequency["10_alpha"] == {"alpha": 3, "red circle": 2, "flat": 3, "blue circle": 1, "bold": 1}
    assert frequency["5_beta style"] == {"beta style": 2}
    assert dataset_dirs(records) == {"10_alpha": {"n_repeats": 10, "img_count": 3}, "5_beta style": {"n_repeats": 5, "img_count": 2}}


def _a1111_build_tags(metadata: dict[str, str]) -> dict[str, int]:
    """A1111's Lora extension (`ui_edit_user_metadata.build_tags`) after its metadata reader json-loads `{` values."""
    frequency = json.loads(metadata["ss_tag_frequency"]) if metadata["ss_tag_frequency"].startswith("{") else {}
    tags: dict[str, int] = {}
    for _, tags_dict in frequency.items():
        for tag, count in tags_dict.items():
            tags[tag.strip()] = tags.get(tag.strip(), 0) + int(count)
    return tags


def _kohya_hashes(path):
    """kohya's train_util: precalculate_safetensors_hashes -> addnet_hash_safetensors / addnet_hash_legacy."""
    import hashlib
    import io

    from safetensors import safe_open
    from safetensors.torch import load_file, save

    with safe_open(str(path), "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k.startswith("ss_")}
    buffer = io.BytesIO(save(load_file(str(path)), metadata))
    n = int.from_bytes(buffer.read(8), "little")
    buffer.seek(n + 8)
    model = hashlib.sha256(buffer.read()).hexdigest()
    buffer.seek(0x100000)
    legacy = hashlib.sha256(buffer.read(0x10000)).hexdigest()[0:8]
    return model, legacy


@pytest.mark.slow
def test_a_run_on_a_kohya_folder_counts_epochs_and_writes_kohyas_metadata(kohya_dir, tmp_path, tiny_config, capsys):
    from safetensors import safe_open

    from sdlora.training.metrics import read_metrics
    from sdlora.training.recipe import train

    out = tmp_path / "out"
    train(tiny_config(kohya_dir, out, epochs=2, batch_size=4, grad_accum=2, checkpoint_every=0, trigger=None, shuffle_captions=True,
                      keep_tokens=1, tag_dropout=0.2))  # fmt: skip
    assert "2 subsets, 5 images, 40 samples per epoch" in capsys.readouterr().out
    # square crops (SD1's default): one bucket of 40 samples, batches of 4 -> 10 per epoch; accumulated by 2 -> 5 steps
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl") if "loss" in row][-1] == 2 * math.ceil(10 / 2)
    path = out / "lora.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "10_alpha": {"n_repeats": 10, "img_count": 3},
        "5_beta style": {"n_repeats": 5, "img_count": 2},
    }
    assert _a1111_build_tags(metadata) == {"alpha": 3, "red circle": 2, "flat": 3, "blue circle": 1, "bold": 1, "beta style": 2}
    assert metadata["ss_num_train_images"] == "40"
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == _kohya_hashes(path)
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8
