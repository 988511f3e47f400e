"""Encode images to VAE latent distributions and captions to text embeddings once, reuse them every epoch; and
turn one micro-batch of dataset indices into the UNet's inputs (`BatchEncoder`), from the caches or afresh.

Latents are cached as the distribution (mean, std), not a sample: training still draws a fresh sample each step
from its own generator, exactly as without the cache, so cached and uncached runs train the same model.
Entries are keyed by image content hash, bucket size, crop, flip and the model's fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..core.families import ModelFamily
from ..errors import UserError
from ..storage.atomic import atomic_file
from .base_model import BaseModel
from .buckets import Size
from .config import DataConfig
from .data import ImageRecord, crop_window, drop_captions, load_image, sdxl_time_ids, step_caption
from .objective import Conditioning

CACHE_VERSION = "1"


def model_fingerprint(model_name: str, module: torch.nn.Module) -> str:
    """A short hash of a model's config and first weights, so caches of different models never mix."""
    digest = hashlib.sha256(f"{CACHE_VERSION}|{model_name}|".encode())
    config = getattr(module, "config", None)
    if config is not None:
        digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    first = next(iter(module.state_dict().values()))
    digest.update(first.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


class LatentCache:
    """(mean, std) of the VAE latent distribution per (image, size, crop, flip), in memory and optionally on disk."""

    def __init__(
        self,
        encode: Callable[[torch.Tensor, list[Path]], tuple[torch.Tensor, torch.Tensor]],
        fingerprint: str,
        cache_dir: Path | None = None,
    ):
        self.encode = encode
        self.fingerprint = fingerprint
        self.cache_dir = cache_dir
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._digests: dict[Path, str] = {}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    def key(self, path: Path, size: tuple[int, int], crop: str, flip: bool) -> str:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return f"{self._digests[path]}-{size[0]}x{size[1]}-{crop}-{'flip' if flip else 'noflip'}-{self.fingerprint}"

    def get(
        self, path: Path, size: tuple[int, int], crop: str, flip: bool, load_pixels: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (mean, std) for an image, encoding `load_pixels()` ([3, H, W] in [-1, 1]) on a miss."""
        key = self.key(path, size, crop, flip)
        if key in self.memory:
            return self.memory[key]
        entry = self._read_disk(key)
        if entry is None:
            mean, std = self.encode(load_pixels().unsqueeze(0), [path])
            entry = (mean[0].to(torch.float32).cpu().contiguous(), std[0].to(torch.float32).cpu().contiguous())
            self._write_disk(key, entry)
        self.memory[key] = entry
        return entry

    def _read_disk(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cache_dir is None or not (self.cache_dir / f"{key}.safetensors").is_file():
            return None
        try:
            tensors = load_file(self.cache_dir / f"{key}.safetensors")
            return tensors["mean"], tensors["std"]
        except Exception:  # a damaged entry is re-encoded, never trusted
            return None

    def _write_disk(self, key: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.cache_dir is None:
            return
        with atomic_file(self.cache_dir / f"{key}.safetensors") as tmp:
            save_file({"mean": entry[0], "std": entry[1]}, str(tmp))

    def size_bytes(self) -> int:
        """The cache's size: the bytes held in memory, or on disk when its folder holds more (entries of earlier runs)."""
        in_memory = sum(m.numel() * m.element_size() + s.numel() * s.element_size() for m, s in self.memory.values())
        on_disk = sum(p.stat().st_size for p in self.cache_dir.glob("*.safetensors")) if self.cache_dir else 0
        return max(in_memory, on_disk)


class EmbeddingCache:
    """Per caption, the text-encoder hidden states and (SDXL) the pooled embedding; the encoders are frozen when
    this is used."""

    def __init__(self, encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]):
        self.encode = encode
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def get(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled embeddings or None) of `captions`, stacked in their order."""
        missing = sorted({c for c in captions if c not in self.memory})
        if missing:
            hidden, pooled = self.encode(missing)
            for index, caption in enumerate(missing):
                self.memory[caption] = (_cpu(hidden[index]), None if pooled is None else _cpu(pooled[index]))
        entries = [self.memory[c] for c in captions]
        pooled = [p for _, p in entries]
        return torch.stack([h for h, _ in entries]), None if pooled[0] is None else torch.stack(pooled)

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.memory.values() for t in entry if t is not None)


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).cpu()


# ---------------------------------------------------------------- encoders, and the caches a training run uses


@torch.no_grad()
def encode_distribution(vae, pixels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for a batch of [-1, 1] pixels, in fp32."""
    distribution = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return distribution.mean.float(), distribution.std.float()


def encode_images(vae, pixels: torch.Tensor, images: Sequence[Path], device) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_distribution` of the pixels of `images`; NaN or inf latents (a VAE overflowing in fp16) are a
    one-line error naming the first image that gave them."""
    mean, std = encode_distribution(vae, pixels, device)
    bad = ~(torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1))
    if bool(bad.any()):
        image = images[int(bad.nonzero()[0])]
        where = f"in {str(vae.dtype).removeprefix('torch.')}" if vae.dtype != torch.float32 else "even in fp32"
        raise UserError(
            f"the VAE gives NaN or inf latents for {image} ({where}): pass --vae with a VAE fixed for fp16, or --mixed-precision bf16 or no"
        )
    return mean, std


def encode_captions(
    pipe, text_encoders: dict[str, torch.nn.Module], family: ModelFamily, captions: list[str], device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled embedding or None) the UNet is conditioned on, for captions padded to each
    tokenizer's length: each of the family's text encoders (`text_encoders`, by component) at its hidden layer,
    joined along the width, and the pooled, projected output of the encoder that gives one (SDXL's second). An
    empty caption gives zeros where the family's pipeline does so for an empty prompt (SDXL). With gradients only
    if an encoder trains."""
    hidden, pooled = [], None
    for spec in family.text_encoders:
        tokenizer, encoder = getattr(pipe, spec.tokenizer), text_encoders[spec.component]
        tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())):
            output = encoder(tokens.input_ids.to(device), output_hidden_states=spec.hidden_layer != -1)
        # -1 is the encoder's output (after its final layer norm, as the pipelines use it); others are raw layers
        hidden.append(output[0] if spec.hidden_layer == -1 else output.hidden_states[spec.hidden_layer])
        if spec.pooled:
            pooled = output[0]  # CLIPTextModelWithProjection's first output: the projected pooled embedding
    hidden = torch.cat(hidden, dim=-1)
    if family.empty_prompt_zeros and "" in captions:
        keep = torch.tensor([caption != "" for caption in captions], device=hidden.device)
        hidden = hidden * keep.view(-1, 1, 1).to(hidden.dtype)
        pooled = None if pooled is None else pooled * keep.view(-1, 1).to(pooled.dtype)
    return hidden, pooled


def build_caches(
    mode: str, model: BaseModel, out: Path, records: Sequence[ImageRecord]
) -> tuple[LatentCache | None, EmbeddingCache | None]:
    """Latent cache (`mode` memory, or disk in OUT/cache) unless off or some subset crops at random; embedding cache
    unless a text encoder trains or every caption changes from step to step (shuffled tags, tag dropout, wildcards):
    the captions that stay the same are cached, the others encoded at each step."""
    if mode == "off":
        return None, None
    pipe, device = model.pipe, model.device
    latent_cache = None
    if all(record.rules.crop != "random" for record in records):
        cache_dir = out / "cache" if mode == "disk" else None
        latent_cache = LatentCache(
            lambda pixels, paths: encode_images(pipe.vae, pixels, paths, device), model_fingerprint(model.name, pipe.vae), cache_dir
        )
    embedding_cache = None
    if not model.trains_text_encoders and any(record.rules.static or record.rules.caption_dropout for record in records):
        embedding_cache = EmbeddingCache(lambda captions: encode_captions(pipe, model.text_encoders, model.family, captions, device))
    return latent_cache, embedding_cache


def fill_caches(records, buckets, latent_cache: LatentCache | None, embedding_cache: EmbeddingCache | None, show: bool) -> None:
    """Encode every image (both flips when flipping) and caption once, before the first step; report the size."""
    if latent_cache is not None:
        jobs = [
            (record, size, flip) for record, size in zip(records, buckets) for flip in ((False, True) if record.rules.flip else (False,))
        ]
        for record, size, flip in tqdm(jobs, desc="caching latents", disable=not show):
            crop = record.rules.crop
            latent_cache.get(record.path, size, crop, flip, functools.partial(load_image, record, size, crop=crop, flip=flip))
    if embedding_cache is not None:
        captions = {step_caption(record.caption, record.rules, None) for record in records if record.rules.static}
        captions = sorted(captions | ({""} if any(record.rules.caption_dropout for record in records) else set()))
        for start in range(0, len(captions), 16):
            embedding_cache.get(captions[start : start + 16])
    if show and (latent_cache or embedding_cache):
        size = sum(cache.size_bytes() for cache in (latent_cache, embedding_cache) if cache is not None)
        where = f" (on disk: {latent_cache.cache_dir})" if latent_cache and latent_cache.cache_dir else ""
        latents = len(latent_cache.memory) if latent_cache else 0
        captions = len(embedding_cache.memory) if embedding_cache else 0
        tqdm.write(f"cache: {latents} latents, {captions} captions, {size / 2**20:.1f} MiB{where}")


@dataclass
class BatchEncoder:
    """Turns a micro-batch of dataset indices into (latents, conditioning): flips, crops and caption shuffling and
    dropout drawn from the step's `rng`, latent samples from its `generator`; SDXL's time ids from each image's size
    and crop."""

    data: DataConfig  # the trigger word
    model: BaseModel  # the VAE and text encoders (possibly wrapped for training), the device and the UNet's dtype
    records: Sequence[ImageRecord]
    sizes: Sequence[Size]  # each record's bucket
    latent_cache: LatentCache | None
    embedding_cache: EmbeddingCache | None

    def __call__(self, indices: list[int], rng: random.Random, generator: torch.Generator) -> tuple[torch.Tensor, Conditioning]:
        model, device = self.model, self.model.device
        means, stds, pixels, captions, time_ids = [], [], [], [], []
        for index in indices:
            record, size, rules = self.records[index], self.sizes[index], self.records[index].rules
            flip = rules.flip and rng.random() < 0.5
            window = crop_window(record, size, rules.crop, rng)
            load = functools.partial(load_image, record, size, flip=flip, window=window)
            if self.latent_cache is not None:
                mean, std = self.latent_cache.get(record.path, size, rules.crop, flip, load)
                means.append(mean)
                stds.append(std)
            else:
                pixels.append(load())
            captions.append(step_caption(record.caption, rules, rng, self.data.trigger))
            time_ids.append(sdxl_time_ids(record, size, window, flip))
        captions = drop_captions(captions, [self.records[index].rules.caption_dropout for index in indices], rng)
        if pixels:  # no cache: the micro-batch (one bucket, so one size) through the VAE in one call
            mean, std = encode_images(model.pipe.vae, torch.stack(pixels), [self.records[index].path for index in indices], device)
        else:
            mean, std = torch.stack(means), torch.stack(stds)
        mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
        noise = torch.randn(mean.shape, generator=generator).to(device)
        latents = (mean + std * noise) * model.pipe.vae.config.scaling_factor
        hidden, pooled = self._embed(captions, [caption == "" or self.records[i].rules.static for caption, i in zip(captions, indices)])
        conditioning = Conditioning(hidden, pooled, torch.tensor(time_ids, dtype=torch.float32) if model.family.time_ids else None)
        return latents.to(model.dtype), conditioning.to(device, model.dtype)

    def _embed(self, captions: list[str], cached: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The captions' conditioning: those that never change from the cache, the others encoded now, in order."""
        if self.embedding_cache is None or not any(cached):
            return encode_captions(self.model.pipe, self.model.text_encoders, self.model.family, captions, self.model.device)
        if all(cached):
            return self.embedding_cache.get(captions)
        hidden, pooled = self.embedding_cache.get([c for c, hit in zip(captions, cached) if hit])
        model = self.model
        fresh_hidden, fresh_pooled = encode_captions(
            model.pipe, model.text_encoders, model.family, [c for c, hit in zip(captions, cached) if not hit], model.device
        )
        order = torch.tensor([index for index, hit in enumerate(cached) if hit] + [index for index, hit in enumerate(cached) if not hit])
        inverse = torch.argsort(order)
        hidden = torch.cat([hidden.to(fresh_hidden.device, fresh_hidden.dtype), fresh_hidden])[inverse.to(fresh_hidden.device)]
        if pooled is not None:
            pooled = torch.cat([pooled.to(fresh_pooled.device, fresh_pooled.dtype), fresh_pooled])[inverse.to(fresh_pooled.device)]
        return hidden, pooled
