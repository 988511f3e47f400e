"""Encode images to VAE latent distributions and captions to text embeddings once, reuse them every epoch.

Latents are cached as the distribution (mean, std), not a sample: training still draws a fresh sample each step
from its own generator, exactly as without the cache, so cached and uncached runs train the same model.
Entries are keyed by image content hash, bucket size, crop, flip and the model's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_file

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

    def __init__(self, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], fingerprint: str, cache_dir: Path | None = None):
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

    def get(self, path: Path, size: tuple[int, int], crop: str, flip: bool, load_pixels: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (mean, std) for an image, encoding `load_pixels()` ([3, H, W] in [-1, 1]) on a miss."""
        key = self.key(path, size, crop, flip)
        if key in self.memory:
            return self.memory[key]
        entry = self._read_disk(key)
        if entry is None:
            mean, std = self.encode(load_pixels().unsqueeze(0))
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
        """Bytes held in memory (and on disk, when a cache folder is used)."""
        in_memory = sum(m.numel() * m.element_size() + s.numel() * s.element_size() for m, s in self.memory.values())
        on_disk = sum(p.stat().st_size for p in self.cache_dir.glob("*.safetensors")) if self.cache_dir else 0
        return max(in_memory, on_disk)


class EmbeddingCache:
    """Text-encoder hidden states per caption (the text encoder is frozen when this is used)."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]):
        self.encode = encode
        self.memory: dict[str, torch.Tensor] = {}

    def get(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.memory})
        if missing:
            for caption, embedding in zip(missing, self.encode(missing)):
                self.memory[caption] = embedding.detach().to(torch.float32).cpu()
        return torch.stack([self.memory[c] for c in captions])

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.memory.values())


# ---------------------------------------------------------------- encoders, and the caches a training run uses


@torch.no_grad()
def encode_distribution(vae, pixels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for a batch of [-1, 1] pixels, in fp32."""
    distribution = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return distribution.mean.float(), distribution.std.float()


def encode_captions(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    """CLIP hidden states for captions padded to the tokenizer's length; with gradients only if the encoder trains."""
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in text_encoder.parameters())):
        return text_encoder(tokens.input_ids.to(device))[0]


def build_caches(config, pipe, device, out: Path) -> tuple[LatentCache | None, EmbeddingCache | None]:
    """Latent cache unless off or crops are random; embedding cache unless the text encoder trains or captions are shuffled."""
    if config.cache == "off":
        return None, None
    latent_cache = None
    if config.crop != "random":
        cache_dir = out / "cache" if config.cache == "disk" else None
        latent_cache = LatentCache(lambda pixels: encode_distribution(pipe.vae, pixels, device), model_fingerprint(config.model, pipe.vae), cache_dir)
    embedding_cache = None
    if not config.train_text_encoder and not config.shuffle_captions:
        embedding_cache = EmbeddingCache(lambda captions: encode_captions(pipe.tokenizer, pipe.text_encoder, captions, device))
    return latent_cache, embedding_cache


def fill_caches(config, records, buckets, latent_cache: LatentCache | None, embedding_cache: EmbeddingCache | None, show: bool) -> None:
    """Encode every image (both flips when flipping) and caption once, before the first step; report the size."""
    from tqdm.auto import tqdm

    from .data import load_image

    if latent_cache is not None:
        flips = (False, True) if config.flip else (False,)
        jobs = [(record, size, flip) for record, size in zip(records, buckets) for flip in flips]
        for record, size, flip in tqdm(jobs, desc="caching latents", disable=not show):
            latent_cache.get(record.path, size, config.crop, flip, lambda: load_image(record, size, crop=config.crop, flip=flip))
    if embedding_cache is not None:
        captions = sorted({record.caption for record in records} | ({""} if config.caption_dropout else set()))
        for start in range(0, len(captions), 16):
            embedding_cache.get(captions[start : start + 16])
    if show and (latent_cache or embedding_cache):
        size = sum(cache.size_bytes() for cache in (latent_cache, embedding_cache) if cache is not None)
        where = f" (on disk: {latent_cache.cache_dir})" if latent_cache and latent_cache.cache_dir else ""
        latents = len(latent_cache.memory) if latent_cache else 0
        captions = len(embedding_cache.memory) if embedding_cache else 0
        tqdm.write(f"cache: {latents} latents, {captions} captions, {size / 2**20:.1f} MiB{where}")
