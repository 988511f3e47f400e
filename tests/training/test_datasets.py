"""Regularization images and kohya dataset TOMLs (#15): reg repeats as kohya's DreamBoothDataset sets them, the loss
weighted by prior_loss_weight, a TOML in kohya's documented form, per-subset caption rules, per-dataset sizes and
batches, the caches with static and changing captions side by side."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdlora.training import recipe
from sdlora.training.buckets import BucketBatchSampler, no_upscale_bucket
from sdlora.training.cache import encode_captions
from sdlora.training.data import CaptionRules, expand_wildcards, step_caption
from sdlora.training.datasets import batch_sizes, load_training_data, record_buckets, reg_repeats
from sdlora.training.objective import ObjectiveConfig, diffusion_loss


def _load(config):
    """The run's images as the recipe loads them: from the data section, split by the run's seed."""
    return load_training_data(config.data, config.run.seed, config.run.output_dir)


def _kohya_reg_loop(train_samples: int, repeats: list[int]) -> list[int]:
    """kohya's loop as sd-scripts writes it (registering ImageInfo objects and raising their num_repeats), kept
    apart from sdlora's function."""

    class Info:
        def __init__(self, num_repeats):
            self.num_repeats, self.registered = num_repeats, False

    infos = [Info(r) for r in repeats]
    n, first_loop = 0, True
    while n < train_samples:
        for info in infos:
            if first_loop:
                info.registered = True
                n += info.num_repeats
            else:
                info.num_repeats += 1
                n += 1
            if n >= train_samples:
                break
        first_loop = False
    return [info.num_repeats if info.registered else 0 for info in infos]


@pytest.mark.parametrize(
    ("train", "repeats", "expected"),
    [(40, [1, 1, 1, 1], [10, 10, 10, 10]), (40, [1, 1, 1], [14, 13, 13]), (7, [5, 5], [5, 5]), (4, [1] * 6, [1, 1, 1, 1, 0, 0]),
     (9, [2, 1], [5, 4]), (0, [1, 1], [0, 0])],
)  # fmt: skip
def test_reg_repeats_are_kohyas(train, repeats, expected):
    assert reg_repeats(train, repeats) == expected == _kohya_reg_loop(train, repeats)


def _kohya_folder(root: Path, make_dataset, folders: dict[str, int]) -> Path:
    for name, count in folders.items():
        make_dataset(root / name, count=count)
    return root


def _config(tiny_config, data, out, **overrides):
    return tiny_config(data, out, **overrides)


def test_reg_images_appear_as_often_as_kohya_puts_them(tmp_path, make_dataset, tiny_config):
    data = _kohya_folder(tmp_path / "data", make_dataset, {"10_alpha": 3, "5_beta": 2})
    reg = _kohya_folder(tmp_path / "reg", make_dataset, {"1_circle": 3})
    for caption in reg.rglob("*.txt"):
        caption.unlink()  # the class tokens are their captions
    config = tiny_config(data, tmp_path / "out", reg_data=str(reg), batch_size=4)
    loaded = _load(config)
    train = [r for r in loaded.records if not r.is_reg]
    regs = [r for r in loaded.records if r.is_reg]
    assert sum(r.repeats for r in train) == 40
    assert [r.repeats for r in regs] == [14, 13, 13] and sum(r.repeats for r in regs) == 40
    assert {r.caption for r in regs} == {"circle"}  # no trigger word on regularization images
    assert all(r.caption.startswith("sks, ") for r in train)
    sampler = BucketBatchSampler(
        [(64, 64)] * len(loaded.records), 4, repeats=[r.repeats for r in loaded.records], datasets=[0] * len(loaded.records)
    )
    seen = Counter(index for batch in sampler.epoch_batches(0) for index in batch)
    assert [seen[i] for i in range(len(loaded.records))] == [r.repeats for r in loaded.records]
    assert "of them 1 subset, 3 images, 40 samples regularization" in recipe.dataset_summary(loaded.records)


def test_reg_images_are_never_held_out(tmp_path, make_dataset, tiny_config):
    data = make_dataset(tmp_path / "data", count=6)
    reg = make_dataset(tmp_path / "reg", count=4)
    loaded = _load(tiny_config(data, tmp_path / "out", reg_data=str(reg), val_split=0.5))
    assert len(loaded.val_records) == 3 and not any(r.is_reg for r in loaded.val_records)
    assert [r.repeats for r in loaded.records if r.is_reg] == [1, 1, 1, 0][:3]  # 3 training samples: 3 reg images, 1 left out
    assert loaded.unused_reg == 1


def test_weighted_loss_equals_the_formula(tiny_pipe):
    """mean_i(w_i * loss_i), each loss_i the image's own mean squared error, as kohya's loss_weights."""
    unet, scheduler = tiny_pipe.unet, tiny_pipe.scheduler
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    hidden = torch.randn(3, 77, unet.config.cross_attention_dim, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([10, 500, 900])
    objective = ObjectiveConfig()
    weights = torch.tensor([1.0, 0.3, 1.0])
    got = diffusion_loss(unet, scheduler, latents, hidden, objective, timesteps=timesteps, noise=noise, weights=weights)
    each = [
        diffusion_loss(unet, scheduler, latents[i : i + 1], hidden[i : i + 1], objective, timesteps=timesteps[i : i + 1], noise=noise[i : i + 1])
        for i in range(3)
    ]  # fmt: skip
    expected = (each[0] * 1.0 + each[1] * 0.3 + each[2] * 1.0) / 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, sum(each) / 3)  # the weight changed it


@pytest.mark.slow
def test_training_weighs_each_reg_image_by_prior_loss_weight(tmp_path, make_dataset, tiny_config, monkeypatch):
    data = make_dataset(tmp_path / "data", count=2)
    reg = make_dataset(tmp_path / "reg", count=2)
    seen = []
    real = recipe.diffusion_loss

    def recording(*args, weights=None, **kwargs):
        seen.append(None if weights is None else weights.tolist())
        return real(*args, weights=weights, **kwargs)

    monkeypatch.setattr(recipe, "diffusion_loss", recording)
    run = recipe.setup(tiny_config(data, tmp_path / "out", reg_data=str(reg), prior_loss_weight=0.25, batch_size=4, steps=2))
    batches = recipe._Batches(run)
    expected = [[0.25 if run.records[i].is_reg else 1.0 for i in batch] for batch in (next(batches), next(batches))]
    run.state.epoch = run.state.batch_in_epoch = 0
    recipe.run_steps(run)
    assert seen == expected and all(0.25 in w and 1.0 in w for w in seen)


# ---------------------------------------------------------------- the dataset TOML


KOHYA_DOC_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 64
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{root}/hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{root}/fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [96, 64]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{root}/piyo'
  metadata_file = '{root}/piyo/piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""


@pytest.fixture
def kohya_doc_dataset(tmp_path, make_dataset) -> Path:
    """The first example of kohya's docs/config_README-en.md, its folders made here (paths made absolute)."""
    make_dataset(tmp_path / "hoge", count=3)
    for caption in list((tmp_path / "hoge").glob("*.txt"))[:1]:
        caption.unlink()  # this image is captioned by the class tokens
    make_dataset(tmp_path / "fuga", count=2)
    for caption in (tmp_path / "fuga").glob("*.txt"):
        caption.write_text("a boy, flat poster, bold, outline")
    make_dataset(tmp_path / "reg", count=4)
    for caption in (tmp_path / "reg").glob("*.txt"):
        caption.unlink()
    make_dataset(tmp_path / "piyo", count=2)
    for caption in (tmp_path / "piyo").glob("*.txt"):
        caption.unlink()
    metadata = {
        "img00": {"caption": "a red circle", "tags": "flat, poster"},
        str(tmp_path / "piyo" / "img01.png"): {"tags": "blue, circle"},
    }
    (tmp_path / "piyo" / "piyo_md.json").write_text(json.dumps(metadata))
    path = tmp_path / "dataset.toml"
    path.write_text(KOHYA_DOC_EXAMPLE.format(root=tmp_path.as_posix()))
    return path


def test_kohyas_documented_toml_reads_with_its_meanings(kohya_doc_dataset, tiny_config, tmp_path):
    config = tiny_config(None, tmp_path / "out", data_dir="", dataset_config=str(kohya_doc_dataset), trigger=None, batch_size=1)
    with pytest.warns(UserWarning, match="1 images have no caption and use the caption 'hoge girl'"):
        loaded = _load(config)
    by_subset = {}
    for record in loaded.records:
        by_subset.setdefault(record.subset, []).append(record)
    assert set(by_subset) == {"hoge", "fuga", "reg", "piyo_md.json"}
    assert [r.rules.keep_tokens for r in by_subset["hoge"]] == [2] * 3  # the dataset's
    assert by_subset["fuga"][0].rules.keep_tokens == 3 and by_subset["reg"][0].rules.keep_tokens == 1
    assert by_subset["piyo_md.json"][0].rules.keep_tokens == 1  # [general]'s
    assert all(r.rules.shuffle for r in loaded.records)
    # class tokens caption only the image without a caption file, as kohya's docs say
    assert sorted(r.caption for r in by_subset["hoge"])[0] == "a blue circle, flat poster" and "hoge girl" in [
        r.caption for r in by_subset["hoge"]
    ]
    assert {r.caption for r in by_subset["reg"]} == {"human"} and all(r.is_reg for r in by_subset["reg"])
    assert sorted(r.caption for r in by_subset["piyo_md.json"]) == ["a red circle, flat, poster", "blue, circle"]
    assert [r.dataset for r in by_subset["piyo_md.json"]] == [1, 1] and by_subset["hoge"][0].dataset == 0
    # 5 training samples in the first dataset: the 4 reg images give 5 (2, 1, 1, 1)
    assert [r.repeats for r in by_subset["reg"]] == [2, 1, 1, 1]
    assert batch_sizes(loaded, config.data) == [4, 2]
    buckets = record_buckets(loaded, dataclasses.replace(config.data, resolution=64, buckets=False))
    assert {b for b, r in zip(buckets, loaded.records) if r.dataset == 0} == {(64, 64)}
    assert {b for b, r in zip(buckets, loaded.records) if r.dataset == 1} == {(96, 64)}


@pytest.mark.slow
def test_kohyas_documented_toml_trains_from_the_cli(kohya_doc_dataset, tmp_path):
    out = tmp_path / "out"
    result = _run_cli("train", "--dataset-config", str(kohya_doc_dataset), "--model", "tiny", "--output", str(out), "--steps", "3",
                     "--rank", "4", "--alpha", "8", "--checkpoint-every", "0", "--validate-every", "0", "--sample-steps", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "2 datasets, 4 subsets, 11 images, 12 samples per epoch, of them 1 subset, 4 images, 5 samples regularization"
        in result.stdout + result.stderr
    )
    metadata = safe_open(str(out / "lora.safetensors"), "pt").metadata()
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "hoge": {"n_repeats": 1, "img_count": 3}, "fuga": {"n_repeats": 1, "img_count": 2}, "piyo_md.json": {"n_repeats": 1, "img_count": 2},
    }  # fmt: skip
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 1, "img_count": 4}}
    assert json.loads(metadata["ss_tag_frequency"])["reg"] == {"human": 4}
    assert metadata["ss_num_train_images"] == "7" and metadata["ss_num_reg_images"] == "5"
    first, second = json.loads(metadata["ss_datasets"])  # kohya's per-dataset record of a dataset-config run
    assert (first["batch_size_per_device"], first["resolution"], first["num_train_images"], first["num_reg_images"]) == (4, [64, 64], 5, 5)
    assert [(s["image_dir"], s["keep_tokens"], s["is_reg"], s["shuffle_caption"]) for s in first["subsets"]] == [
        ("hoge", 2, False, True), ("fuga", 3, False, True), ("reg", 1, True, True),
    ]  # fmt: skip
    assert first["is_dreambooth"] and not second["is_dreambooth"]
    assert (second["batch_size_per_device"], second["resolution"], second["num_train_images"]) == (2, [96, 64], 2)
    assert second["subsets"][0]["metadata_file"] == "piyo_md.json" and second["tag_frequency"]["piyo_md.json"]["poster"] == 1


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sdlora", *args], capture_output=True, text=True, env=env, timeout=600)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\nnum_repeat = 2\n", r"datasets\[0\]\.subsets\[0\]: unknown key 'num_repeat' \(did you mean 'num_repeats'\?\)"),
        ("[general]\nimage_dir = '{data}'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\n", r"\[general\]: image_dir belongs in \[\[datasets.subsets\]\], not \[general\]"),
        ("[[datasets]]\nbatch_size = '4'\n[[datasets.subsets]]\nimage_dir = '{data}'\n", r"datasets\[0\]: batch_size must be an integer, got '4'"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\ncolor_aug = true\n", r"color_aug = True is a kohya option sdlora does not carry out"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\nnum_repeats = 0\n", r"num_repeats must be at least 1"),
        ("[[datasets]]\nresolution = [100, 64]\n[[datasets.subsets]]\nimage_dir = '{data}'\n", r"resolution must be sides that are multiples of 8"),
        ("[[datasets]]\n", r"datasets\[0\]: no \[\[datasets.subsets\]\]"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\n[[datasets.subsets]]\nimage_dir = '{data}'\n", r"already a subset of this dataset"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}/nowhere'\n", r"image_dir .*nowhere is not a folder"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\nis_reg = true\n", r"only regularization images"),
        ("[dataset]\n", r"unknown top-level key 'dataset'"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}/../empty'\n", r"subsets\[0\]: no images .* found"),
    ],
)  # fmt: skip
def test_a_bad_dataset_toml_is_refused_naming_the_key(tmp_path, make_dataset, tiny_config, body, message):
    data = make_dataset(tmp_path / "data", count=2)
    (tmp_path / "empty").mkdir()
    path = _toml(tmp_path, body.format(data=data.as_posix()))
    config = tiny_config(None, tmp_path / "out", data_dir="", dataset_config=str(path))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _load(config)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[general]\nsubsets = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\n", r"bad.toml: \[general\]: subsets belongs under \[\[datasets\]\], as an array of \[\[datasets.subsets\]\] tables"),
        ("[[datasets]]\nsubsets = 1\n", r"bad.toml: datasets\[0\]: subsets must be an array of \[\[datasets.subsets\]\] tables"),
        ("[[datasets]]\nmin_bucket_reso = 512\nmax_bucket_reso = 256\n[[datasets.subsets]]\nimage_dir = '{data}'\n", r"bad.toml: datasets\[0\]: min_bucket_reso 512 is above max_bucket_reso 256"),
        ("[[datasets]]\nenable_bucket = true\nmin_bucket_reso = 1024\n[[datasets.subsets]]\nimage_dir = '{data}'\n", r"bad.toml: datasets\[0\]: min_bucket_reso, max_bucket_reso and bucket_reso_steps leave no buckets"),
        ("[general]\nresolution = 100000\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\n", r"\[general\]: resolution must be sides that are multiples of 8 from 64 to 8192"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\nnum_repeats = 1000000000000\n", r"subsets\[0\]: num_repeats 1000000000000 is above 10000"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\nmetadata_file = '{number}'\n", r"number.json entry 'img00.png': caption must be a string, got 5"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\nmetadata_file = '{listed}'\n", r"listed.json entry 'img00.png': tags must be a string, got \['a', 'cat'\]"),
    ],
)  # fmt: skip
def test_hostile_dataset_toml_values_are_one_line_naming_file_and_key(tmp_path, make_dataset, tiny_config, body, message):
    data = make_dataset(tmp_path / "data", count=2)
    number, listed = tmp_path / "number.json", tmp_path / "listed.json"
    number.write_text(json.dumps({"img00.png": {"caption": 5}, "img01.png": {"caption": "a cat"}}))
    listed.write_text(json.dumps({"img00.png": {"caption": "a cat", "tags": ["a", "cat"]}}))
    path = _toml(tmp_path, body.format(data=data.as_posix(), number=number.as_posix(), listed=listed.as_posix()))
    config = tiny_config(None, tmp_path / "out", data_dir="", dataset_config=str(path))
    with pytest.raises(ValueError, match=message) as caught:
        _load(config)
    assert "\n" not in str(caught.value)


def test_data_dir_and_dataset_config_are_one_or_the_other(tmp_path, make_dataset, tiny_config):
    data = make_dataset(tmp_path / "data", count=2)
    with pytest.raises(ValueError, match="not both"):
        tiny_config(data, tmp_path / "out", dataset_config=str(tmp_path / "x.toml"))
    with pytest.raises(ValueError, match="is_reg = true"):
        tiny_config(None, tmp_path / "out", data_dir="", dataset_config=str(tmp_path / "x.toml"), reg_data=str(data))
    with pytest.raises(ValueError, match="inside --reg-data"):
        tiny_config(data, data.parent / "reg" / "out", reg_data=str(data.parent / "reg"))


def test_subset_rules_and_dataset_sizes_from_the_toml(tmp_path, make_dataset, tiny_config):
    plain = make_dataset(tmp_path / "plain", count=2)
    tagged = make_dataset(tmp_path / "tagged", count=2)
    big = tmp_path / "big"
    big.mkdir()
    Image.new("RGB", (200, 100), "red").save(big / "wide.png")
    Image.new("RGB", (60, 40), "blue").save(big / "small.png")
    for image in big.glob("*.png"):
        image.with_suffix(".txt").write_text("a thing")
    path = _toml(
        tmp_path,
        f"""
[general]
flip_aug = true
[[datasets]]
enable_bucket = true
resolution = 64
bucket_no_upscale = true
bucket_reso_steps = 16
batch_size = 3
  [[datasets.subsets]]
  image_dir = '{big.as_posix()}'
  caption_prefix = 'masterpiece,'
  caption_suffix = ', from side'
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{plain.as_posix()}'
  num_repeats = 3
  flip_aug = false
  random_crop = true
  [[datasets.subsets]]
  image_dir = '{tagged.as_posix()}'
  shuffle_caption = true
  keep_tokens_separator = '|||'
  secondary_separator = ';;;'
  enable_wildcard = true
  caption_tag_dropout_rate = 0.2
  caption_dropout_rate = 0.1
""",
    )
    config = tiny_config(None, tmp_path / "out", data_dir="", dataset_config=str(path), trigger=None, batch_size=2, flip=False)
    loaded = _load(config)
    big_records = [r for r in loaded.records if r.subset == "big"]
    assert {r.caption for r in big_records} == {"masterpiece, a thing , from side"}
    assert all(r.rules.flip for r in big_records)  # [general]'s flip_aug over the run's --no-flip
    plain_records = [r for r in loaded.records if r.subset == "plain"]
    assert all(r.repeats == 3 and not r.rules.flip and r.rules.crop == "random" for r in plain_records)
    rules = next(r.rules for r in loaded.records if r.subset == "tagged")
    assert (rules.shuffle, rules.keep_separator, rules.secondary_separator, rules.wildcards) == (True, "|||", ";;;", True)
    assert (rules.tag_dropout, rules.caption_dropout, rules.static) == (0.2, 0.1, False)
    assert batch_sizes(loaded, config.data) == [3, 2]
    buckets = dict(
        zip(
            [r.path.name for r in loaded.records if r.dataset == 0],
            record_buckets(loaded, dataclasses.replace(config.data, resolution=64, buckets=False)),
        )
    )
    assert buckets == {"small.png": (48, 32), "wide.png": (64, 32)}  # no upscaling: the small one keeps its size


def test_no_upscale_buckets_are_kohyas():
    # worked by hand from kohya's BucketManager.select_bucket (bucket_no_upscale): area 512^2, steps 64
    assert no_upscale_bucket(1000, 500, 512 * 512, 64) == (640, 320)
    assert no_upscale_bucket(300, 200, 512 * 512, 64) == (256, 192)  # within the area: its own size, cut to steps
    assert no_upscale_bucket(2048, 2048, 512 * 512, 64) == (512, 512)


def test_batches_never_mix_datasets_and_take_each_datasets_size():
    sampler = BucketBatchSampler([(64, 64)] * 7, [3, 2], seed=1, datasets=[0, 0, 0, 0, 1, 1, 1])
    batches = sampler.epoch_batches(0)
    assert sorted(len(b) for b in batches) == [1, 1, 2, 3]
    assert all(len({0 if i < 4 else 1 for i in batch}) == 1 for batch in batches)
    assert len(sampler) == 4


# ---------------------------------------------------------------- captions per subset


def test_keep_tokens_separator_moves_only_the_middle():
    rules = CaptionRules(shuffle=True, keep_separator="|||", tag_dropout=0.3)
    caption = "1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt, smile ||| best quality, rating: general"
    rng = random.Random(0)
    middles = set()
    for _ in range(300):
        tags = step_caption(caption, rules, rng).split(", ")
        assert tags[:3] == ["1girl", "hatsune miku", "vocaloid"] and tags[-2:] == ["best quality", "rating: general"]
        middle = tags[3:-2]
        assert set(middle) <= {"stage", "microphone", "white shirt", "smile"} and "|||" not in ", ".join(tags)
        middles.add(tuple(middle))
    assert len(middles) > 20  # shuffled and dropped
    assert step_caption(caption, CaptionRules(keep_separator="|||"), None) == caption.replace(" ||| ", ", ")


def test_secondary_separator_moves_as_one_tag_then_becomes_a_comma():
    rules = CaptionRules(shuffle=True, secondary_separator=";;;")
    rng = random.Random(1)
    for _ in range(50):
        caption = step_caption("a, b, sky;;;cloud;;;day, c", rules, rng)
        assert "sky,cloud,day" in caption and ";;;" not in caption


def test_wildcards_choose_a_line_and_an_option():
    rng = random.Random(2)
    seen = Counter(expand_wildcards("one {red|blue} thing\nsecond {{literal}} line", rng) for _ in range(400))
    assert set(seen) == {"one red thing", "one blue thing", "second {literal} line"}
    assert min(seen.values()) > 60


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_mixed_static_and_changing_captions_encode_as_if_none_were_cached(tmp_path, make_dataset, tiny_config, model):
    """A subset that shuffles beside one that does not: the static captions come from the cache, the others are
    encoded each step, and the batch's conditioning (SDXL: the pooled embedding too) is what encoding all of them
    now gives, in order."""
    plain = make_dataset(tmp_path / "plain", count=2)
    shuffled = make_dataset(tmp_path / "shuffled", count=2)
    path = _toml(
        tmp_path,
        f"""
[[datasets]]
batch_size = 4
  [[datasets.subsets]]
  image_dir = '{plain.as_posix()}'
  [[datasets.subsets]]
  image_dir = '{shuffled.as_posix()}'
  shuffle_caption = true
""",
    )
    run = recipe.setup(tiny_config(None, tmp_path / "out", data_dir="", dataset_config=str(path), batch_size=4, model=model, buckets=False))
    encoder = run.encoder
    assert encoder.embedding_cache is not None
    # the text encoder stays on the accelerator: the shuffled captions need it at every step
    assert not any(part in run.model.offloaded for part in run.model.text_encoders.values())
    cached_before = set(encoder.embedding_cache.memory)
    assert cached_before == {r.caption for r in run.records if r.subset == "plain"}
    indices = [2, 0, 3, 1]  # shuffled, plain, shuffled, plain
    rng, generator = random.Random(5), torch.Generator().manual_seed(5)
    _, conditioning, _ = encoder(indices, rng, generator)
    rng = random.Random(5)
    captions = []
    for index in indices:  # the same draws: flip, crop window (none: centre), caption
        record = run.records[index]
        rng.random() if record.rules.flip else None
        captions.append(step_caption(record.caption, record.rules, rng, run.config.data.trigger))
    expected, pooled = encode_captions(run.model.pipe, run.model.text_encoders, run.model.family, captions, "cpu")
    torch.testing.assert_close(conditioning.hidden, expected.to(conditioning.hidden.dtype))
    if model == "tiny-sdxl":
        torch.testing.assert_close(conditioning.pooled, pooled.to(conditioning.pooled.dtype))
    else:
        assert pooled is None and conditioning.pooled is None
    assert set(encoder.embedding_cache.memory) == cached_before  # the changing captions were not stored
