"""--cache disk (latents and caption embeddings in OUT/cache, read back when a step needs them, none held in RAM)
and --vae-batch-size (several images of one size per VAE call when filling the latent cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdlora.training.cache
from sdlora.cli import main
from sdlora.errors import UserError
from sdlora.training import recipe
from sdlora.training.cache import EmbeddingCache, LatentCache
from sdlora.training.config import TrainConfig

# batched VAE calls round differently from one-by-one ones: measured on the tiny model (means up to 1.8) at 2.2e-6
BATCHED_TOLERANCE = 1e-5


class CountingLatents:
    """A fake VAE: (mean, std) from the pixels, counting calls and images."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, pixels: torch.Tensor, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(len(paths))
        return pixels[:, :2] * 3.0 + 0.25, pixels[:, 2:].exp().repeat(1, 2, 1, 1)


class CountingCaptions:
    """A fake text encoder: hidden states [n, 5, 3] and pooled [n, 2] from the captions' lengths, counting calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(list(captions))
        lengths = torch.tensor([float(len(c)) for c in captions])
        return lengths.view(-1, 1, 1) * torch.linspace(-1, 1, 15).view(1, 5, 3), lengths.view(-1, 1) * torch.tensor([[0.5, -2.0]])


def _images(folder: Path, count: int) -> list[tuple[Path, torch.Tensor]]:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index in range(count):
        path = folder / f"img{index}.png"
        path.write_bytes(f"image {index}".encode())  # the cache keys on the file's bytes, nothing reads it as an image
        images.append((path, torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(index))))
    return images


def test_disk_latents_stay_out_of_ram_read_back_exactly_and_a_damaged_entry_is_encoded_again(tmp_path):
    images = _images(tmp_path / "data", 4)
    in_memory = LatentCache(CountingLatents(), "fp")
    encode = CountingLatents()
    on_disk = LatentCache(encode, "fp", tmp_path / "cache")
    on_disk.fill([(path, (6, 8), "center", False, lambda p=pixels: p) for path, pixels in images])
    assert encode.calls == [4] and on_disk.memory == {}
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 4 and len(on_disk.keys) == 4
    assert on_disk.size_bytes() == sum(f.stat().st_size for f in files) > 0
    for path, pixels in images:
        expected = in_memory.get(path, (6, 8), "center", False, lambda p=pixels: p)
        actual = on_disk.get(path, (6, 8), "center", False, lambda: pytest.fail("a cached entry was encoded again"))
        assert all(torch.equal(a, e) for a, e in zip(actual[:2], expected[:2])) and actual[2] is expected[2] is None
    assert on_disk.memory == {} and encode.calls == [4]

    # a later run's cache reads the files; a truncated one is encoded again and rewritten
    path, pixels = images[2]
    key = on_disk.key(path, (6, 8), "center", False)
    file = tmp_path / "cache" / f"{key}.safetensors"
    file.write_bytes(file.read_bytes()[:-7])
    again = LatentCache(encode, "fp", tmp_path / "cache")
    again.fill([(p, (6, 8), "center", False, lambda x=x: x) for p, x in images])
    assert encode.calls == [4, 1] and again.memory == {}
    assert torch.equal(load_file(file)["mean"], in_memory.get(path, (6, 8), "center", False, lambda: pixels)[0])


def test_fill_encodes_an_image_given_twice_once(tmp_path):
    (path, pixels), *_ = _images(tmp_path / "data", 1)
    encode = CountingLatents()
    cache = LatentCache(encode, "fp")
    cache.fill([(path, (6, 8), "center", False, lambda: pixels)] * 3)
    assert encode.calls == [1] and len(cache.memory) == 1


def test_disk_embeddings_stay_out_of_ram_are_keyed_by_the_encoders_and_a_damaged_one_is_encoded_again(tmp_path):
    captions = ["a red circle", "", "a blue square, flat"]
    in_memory = EmbeddingCache(CountingCaptions())
    expected = in_memory.get(captions)
    encode = CountingCaptions()
    on_disk = EmbeddingCache(encode, "text-fp", tmp_path / "text")
    first = on_disk.get(captions)
    assert on_disk.memory == {} and len(list((tmp_path / "text").glob("*.safetensors"))) == 3
    assert all(torch.equal(a, e) for a, e in zip(first, expected))
    second = on_disk.get(list(reversed(captions)))
    assert all(torch.equal(a, e.flip(0)) for a, e in zip(second, expected))
    assert encode.calls == [sorted(captions)] and on_disk.memory == {} and len(on_disk.keys) == 3
    assert on_disk.size_bytes() == sum(f.stat().st_size for f in (tmp_path / "text").glob("*.safetensors"))

    # another run reads them; a truncated file is encoded again; other encoders never read these files
    file = on_disk._file("a red circle")
    file.write_bytes(file.read_bytes()[:20])
    again = EmbeddingCache(encode, "text-fp", tmp_path / "text")
    assert all(torch.equal(a, e) for a, e in zip(again.get(captions), expected))
    assert encode.calls[1:] == [["a red circle"]]
    other = EmbeddingCache(encode, "other-fp", tmp_path / "text")
    other.get(captions[:1])
    assert encode.calls[2:] == [["a red circle"]]


def test_embeddings_without_pooled_round_trip_through_disk(tmp_path):
    def encode(captions):
        return torch.arange(len(captions) * 6, dtype=torch.float32).view(-1, 2, 3), None

    cache = EmbeddingCache(encode, "fp", tmp_path / "text")
    cache.get(["x", "y"])
    hidden, pooled = EmbeddingCache(lambda c: pytest.fail("encoded again"), "fp", tmp_path / "text").get(["y", "x"])
    assert pooled is None and torch.equal(hidden, torch.arange(12, dtype=torch.float32).view(2, 2, 3).flip(0))


# ---------------------------------------------------------------- training on the tiny model


def _count_encoders(monkeypatch) -> dict[str, int]:
    """Count VAE and text-encoder calls made through the caches from now on."""
    counts = {"vae": 0, "vae_images": 0, "text": 0}
    encode_distribution, encode_captions = sdlora.training.cache.encode_distribution, sdlora.training.cache.encode_captions

    def vae(vae_model, pixels, device):
        counts["vae"] += 1
        counts["vae_images"] += len(pixels)
        return encode_distribution(vae_model, pixels, device)

    def text(*args):
        counts["text"] += 1
        return encode_captions(*args)

    monkeypatch.setattr(sdlora.training.cache, "encode_distribution", vae)
    monkeypatch.setattr(sdlora.training.cache, "encode_captions", text)
    return counts


@pytest.mark.slow  # three short training runs
def test_disk_mode_trains_the_memory_mode_lora_bit_for_bit_with_nothing_in_ram_and_reruns_without_encoding(
    dataset, tmp_path, monkeypatch, capsys, tiny_config
):
    options = dict(steps=2, checkpoint_every=0, buckets=True, flip=True, caption_dropout=0.3)
    memory_lora = load_file(recipe.train(tiny_config(dataset, tmp_path / "memory", **options)))

    out = tmp_path / "disk"
    run = recipe.setup(tiny_config(dataset, out, cache="disk", **options))
    latents, embeddings = run.encoder.latent_cache, run.encoder.embedding_cache
    assert latents.memory == {} and embeddings.memory == {}
    latent_files, caption_files = list((out / "cache").glob("*.safetensors")), list((out / "cache" / "text").glob("*.safetensors"))
    assert len(latent_files) == len(latents.keys) == 2 * len(run.records)  # both flips of every image
    assert len(caption_files) == len(embeddings.keys) == len({r.caption for r in run.records}) + 1  # and the empty caption
    size = sum(f.stat().st_size for f in latent_files + caption_files)
    line = f"cache: {len(latent_files)} latents, {len(caption_files)} captions, {size / 2**20:.1f} MiB (on disk: {out / 'cache'})"
    assert line in capsys.readouterr().out
    recipe.run_steps(run)
    assert latents.memory == {} and embeddings.memory == {}
    disk_lora = load_file(recipe.save_outputs(run))
    assert disk_lora.keys() == memory_lora.keys()
    for key in memory_lora:
        assert torch.equal(disk_lora[key], memory_lora[key]), key

    # the same folder again: every entry comes from disk, only the two truncated files are encoded again
    for file in (latent_files[0], caption_files[0]):
        file.write_bytes(file.read_bytes()[:-9])
    counts = _count_encoders(monkeypatch)
    run = recipe.setup(tiny_config(dataset, out, cache="disk", **options))
    assert counts == {"vae": 1, "vae_images": 1, "text": 1}
    assert all(load_file(file) for file in (latent_files[0], caption_files[0]))  # rewritten whole
    # damaged while training: a step encodes its entries again with the VAE offloaded
    for file in latent_files:
        file.write_bytes(file.read_bytes()[:-9])
    recipe.run_steps(run)
    assert 1 <= counts["vae"] - 1 <= 2 * 2 and counts["text"] == 1  # at most 2 steps of 2 images
    assert run.encoder.latent_cache.memory == {} and run.encoder.embedding_cache.memory == {}


@pytest.mark.slow  # two short training runs
def test_vae_batch_size_encodes_same_size_images_together_within_rounding_of_one_by_one(dataset, tmp_path, monkeypatch, tiny_config):
    counts = _count_encoders(monkeypatch)
    one = recipe.setup(tiny_config(dataset, tmp_path / "one", steps=1, checkpoint_every=0, buckets=True))
    assert counts["vae"] == counts["vae_images"] == len(one.records)
    sizes = {size: list(one.buckets).count(size) for size in set(one.buckets)}
    assert max(sizes.values()) >= 2  # some bucket holds several images, or batching could not show

    counts.update(vae=0, vae_images=0)
    three = recipe.setup(tiny_config(dataset, tmp_path / "three", steps=1, checkpoint_every=0, buckets=True, vae_batch_size=3))
    assert counts["vae_images"] == len(one.records)
    assert counts["vae"] == sum(-(-count // 3) for count in sizes.values()) < len(one.records)
    assert three.encoder.latent_cache.memory.keys() == one.encoder.latent_cache.memory.keys()
    for key, (mean, std, _) in one.encoder.latent_cache.memory.items():
        batched_mean, batched_std, _ = three.encoder.latent_cache.memory[key]
        torch.testing.assert_close(batched_mean, mean, rtol=0, atol=BATCHED_TOLERANCE)
        torch.testing.assert_close(batched_std, std, rtol=0, atol=BATCHED_TOLERANCE)
    recipe.run_steps(three)
    lora = load_file(recipe.save_outputs(three))
    assert all(torch.isfinite(t).all() for t in lora.values())


def test_vae_batch_size_below_one_is_a_one_line_error(dataset, tmp_path, capsys):
    with pytest.raises(UserError, match="--vae-batch-size 0 is invalid: it must be at least 1"):
        TrainConfig.from_options(data_dir=str(dataset), output_dir=str(tmp_path / "out"), vae_batch_size=0)
    assert main(["train", str(dataset), "--output", str(tmp_path / "out"), "--vae-batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vae-batch-size 0 is invalid" in err[0], err
    assert not (tmp_path / "out").exists()
