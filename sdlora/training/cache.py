"""Encode images to VAE latent distributions and captions to text embeddings once, reuse them every epoch; and
turn one micro-batch of dataset indices into the UNet's inputs (`BatchEncoder`), from the caches or afresh.

Latents are cached as the distribution (mean, std), not a sample: training still draws a fresh sample each step
from its own generator, exactly as without the cache, so cached and uncached runs train the same model.
Entries are keyed by image content hash, bucket size, crop, flip, the loss mask's source and content hash and the
model's fingerprint (captions by their hash and the text encoders' fingerprint); an image's loss mask (`--masked-loss`)
is cached with its latents, already on the latent grid. On disk (`--cache disk`) each entry is a small safetensors file, read
when a step needs it, so RAM holds none of them; memory and disk give the same tensors, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from .data import ImageRecord, Window, crop_window, drop_captions, load_image, load_mask, sdxl_time_ids, step_caption
from .objective import Conditioning, latent_mask

CACHE_VERSION = "1"


def model_fingerprint(model_name: str, module: torch.nn.Module) -> str:
    """A short hash of a model's config and first weights, so caches of different models never mix."""
    digest = hashlib.sha256(f"{CACHE_VERSION}|{model_name}|".encode())
    config = getattr(module, "config", None)
    if config is not None:
        config = dict(config) if isinstance(config, Mapping) else config.to_dict()  # diffusers' FrozenDict, transformers' configs
        # diffusers lists the keys left at their defaults in set order, which changes with each process's hash seed
        config.pop("_use_default_values", None)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    first = next(iter(module.state_dict().values()))
    digest.update(first.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


LatentEntry = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # mean, std, the loss mask on the latent grid
EmbeddingEntry = tuple[torch.Tensor, torch.Tensor | None]


class LatentCache:
    """(mean, std) of the VAE latent distribution per (image, size, crop, flip), and the image's loss mask if it has
    one: in memory, or with a `cache_dir` on disk only, each entry read back from its file when a step needs it (RAM
    holds none of them)."""

    def __init__(
        self,
        encode: Callable[[torch.Tensor, list[Path]], tuple[torch.Tensor, torch.Tensor]],
        fingerprint: str,
        cache_dir: Path | None = None,
    ):
        self.encode = encode
        self.fingerprint = fingerprint
        self.cache_dir = cache_dir
        self.memory: dict[str, LatentEntry] = {}  # memory mode only
        self.keys: set[str] = set()  # the entries this run has used, wherever they are held
        self._digests: dict[Path, str] = {}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def mask_tag(self, record: ImageRecord) -> str:
        """What an entry's key says of the image's loss mask: its source (a mask image, or the image's alpha) and
        the content hash of the file it is read from; "" without one (the keys of runs without masks)."""
        if record.mask_source is None:
            return ""
        return f"-{'alpha' if record.alpha_mask else 'mask'}{self._digest(record.mask_source)}"

    def key(self, path: Path, size: tuple[int, int], crop: str, flip: bool, mask: str = "") -> str:
        return f"{self._digest(path)}-{size[0]}x{size[1]}-{crop}-{'flip' if flip else 'noflip'}{mask}-{self.fingerprint}"

    def get(
        self,
        path: Path,
        size: tuple[int, int],
        crop: str,
        flip: bool,
        load_pixels: Callable[[], torch.Tensor],
        mask: str = "",
        load_pixel_mask: Callable[[], torch.Tensor] | None = None,
    ) -> LatentEntry:
        """Cached (mean, std, mask) for an image, encoding `load_pixels()` ([3, H, W] in [-1, 1]) on a miss, and
        bringing `load_pixel_mask()` ([1, H, W] in [0, 1]; its tag `mask`) to the latent grid."""
        key = self.key(path, size, crop, flip, mask)
        entry = self._lookup(key)
        if entry is None:
            mean, std = self.encode(load_pixels().unsqueeze(0), [path])
            on_grid = None if load_pixel_mask is None else latent_mask(load_pixel_mask()[None], mean.shape[-2:])[0]
            entry = self._store(key, mean[0], std[0], on_grid)
        return entry

    def fill(self, images: Sequence[tuple]) -> None:
        """Cache `images` (path, size, crop, flip, load_pixels, and for an image with a loss mask its tag and
        load_pixel_mask), all of one size: those not cached yet go through the VAE together, in one call."""
        missing = []
        for path, size, crop, flip, load_pixels, *masked in images:
            mask, load_pixel_mask = masked or ("", None)
            key = self.key(path, size, crop, flip, mask)
            if key not in {k for k, *_ in missing} and self._lookup(key) is None:  # an image twice is encoded once
                missing.append((key, path, load_pixels, load_pixel_mask))
        if missing:
            mean, std = self.encode(torch.stack([load() for _, _, load, _ in missing]), [path for _, path, _, _ in missing])
            for index, (key, _, _, load_pixel_mask) in enumerate(missing):
                on_grid = None if load_pixel_mask is None else latent_mask(load_pixel_mask()[None], mean.shape[-2:])[0]
                self._store(key, mean[index], std[index], on_grid)

    def _lookup(self, key: str) -> LatentEntry | None:
        if self.cache_dir is None:
            entry = self.memory.get(key)
        else:
            entry = _read_entry(self.cache_dir / f"{key}.safetensors", ("mean", "std"), ("mask",))
        if entry is not None:
            self.keys.add(key)
        return entry

    def _store(self, key: str, mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor | None = None) -> LatentEntry:
        cpu = [None if t is None else t.to(torch.float32).cpu().contiguous() for t in (mean, std, mask)]
        entry: LatentEntry = (cpu[0], cpu[1], cpu[2])
        if self.cache_dir is None:
            self.memory[key] = entry
        else:
            tensors = {"mean": entry[0], "std": entry[1]} | ({} if mask is None else {"mask": entry[2]})
            _write_entry(self.cache_dir / f"{key}.safetensors", tensors)
        self.keys.add(key)
        return entry

    def size_bytes(self) -> int:
        """The bytes of this run's entries: in memory, or their files on disk."""
        if self.cache_dir is None:
            return sum(_bytes(entry) for entry in self.memory.values())
        return _file_bytes(self.cache_dir / f"{key}.safetensors" for key in self.keys)


class EmbeddingCache:
    """Per caption, the text-encoder hidden states and (SDXL) the pooled embedding, in memory, or with a `cache_dir`
    on disk only (named by the caption's hash and the encoders' `fingerprint`); the encoders are frozen when this is
    used."""

    def __init__(
        self,
        encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]],
        fingerprint: str = "",
        cache_dir: Path | None = None,
    ):
        self.encode = encode
        self.fingerprint = fingerprint
        self.cache_dir = cache_dir
        self.memory: dict[str, EmbeddingEntry] = {}  # memory mode only
        self.keys: set[str] = set()  # the captions this run has used
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    def get(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled embeddings or None) of `captions`, stacked in their order."""
        found = {caption: self._lookup(caption) for caption in set(captions)}
        missing = sorted(caption for caption, entry in found.items() if entry is None)
        if missing:
            hidden, pooled = self.encode(missing)
            for index, caption in enumerate(missing):
                found[caption] = self._store(caption, _cpu(hidden[index]), None if pooled is None else _cpu(pooled[index]))
        entries = [found[c] for c in captions]
        pooled = [p for _, p in entries]
        return torch.stack([h for h, _ in entries]), None if pooled[0] is None else torch.stack(pooled)

    def _file(self, caption: str) -> Path:
        return self.cache_dir / f"{hashlib.sha256(caption.encode()).hexdigest()[:24]}-{self.fingerprint}.safetensors"

    def _lookup(self, caption: str) -> EmbeddingEntry | None:
        entry = self.memory.get(caption) if self.cache_dir is None else _read_entry(self._file(caption), ("hidden",), ("pooled",))
        if entry is not None:
            self.keys.add(caption)
        return entry

    def _store(self, caption: str, hidden: torch.Tensor, pooled: torch.Tensor | None) -> EmbeddingEntry:
        if self.cache_dir is None:
            self.memory[caption] = (hidden, pooled)
        else:
            tensors = {"hidden": hidden.contiguous()} | ({} if pooled is None else {"pooled": pooled.contiguous()})
            _write_entry(self._file(caption), tensors)
        self.keys.add(caption)
        return hidden, pooled

    def size_bytes(self) -> int:
        """The bytes of this run's entries: in memory, or their files on disk."""
        if self.cache_dir is None:
            return sum(_bytes(entry) for entry in self.memory.values())
        return _file_bytes(self._file(caption) for caption in self.keys)


def _read_entry(path: Path, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> tuple | None:
    """The named tensors of a cache file (None for a missing optional one), or None if it is absent or damaged."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        return (*(tensors[name] for name in names), *(tensors.get(name) for name in optional))
    except Exception:  # a damaged entry is re-encoded, never trusted
        return None


def _write_entry(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))


def _bytes(entry: tuple[torch.Tensor | None, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in entry if t is not None)


def _file_bytes(paths) -> int:
    return sum(path.stat().st_size for path in paths if path.is_file())


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).cpu()


# ---------------------------------------------------------------- encoders, and the caches a training run uses


@torch.no_grad()
def encode_distribution(vae, pixels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for a batch of [-1, 1] pixels, in fp32."""
    distribution = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return distribution.mean.float(), distribution.std.float()


def scale_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """A latent sample as the denoiser reads it: (x - shift_factor) * scaling_factor (SD3's VAE has a shift, SD1/SDXL's none)."""
    shift = vae.config.get("shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


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
    pipe, text_encoders: dict[str, torch.nn.Module], family: ModelFamily, captions: list[str], device, t5_max_length: int = 77
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled embedding or None) the denoiser is conditioned on, for captions padded to each
    tokenizer's length: each of the family's text encoders (`text_encoders`, by component) at its hidden layer,
    joined along the width, and the pooled, projected output of the encoder that gives one (SDXL's second). An
    empty caption gives zeros where the family's pipeline does so for an empty prompt (SDXL). With gradients only
    if an encoder trains. SD3's layout is `_encode_joint`'s."""
    if any(spec.architecture == "t5" for spec in family.text_encoders):
        return _encode_joint(pipe, text_encoders, family, captions, device, t5_max_length)
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


def _encode_joint(
    pipe, text_encoders: dict[str, torch.nn.Module], family: ModelFamily, captions: list[str], device, t5_max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's text, as `StableDiffusion3Pipeline.encode_prompt` makes it: the CLIPs' penultimate states joined along the
    width and zero-padded to T5's, then T5's tokens (`t5_max_length` of them) after them along the sequence, zeros
    there when the T5 is left out; the pooled embedding is both CLIPs' projected outputs joined."""
    clips, pooled, t5 = [], [], None
    for spec in family.text_encoders:
        encoder = text_encoders.get(spec.component)
        if encoder is None:  # the optional T5 left out (--no-t5, or a pipeline without it)
            continue
        tokenizer = getattr(pipe, spec.tokenizer)
        length = t5_max_length if spec.architecture == "t5" else tokenizer.model_max_length
        tokens = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())):
            if spec.architecture == "t5":
                t5 = encoder(tokens.input_ids.to(device))[0]
                continue
            output = encoder(tokens.input_ids.to(device), output_hidden_states=True)
        clips.append(output.hidden_states[spec.hidden_layer])
        pooled.append(output[0])  # CLIPTextModelWithProjection's first output: the projected pooled embedding
    clip = torch.cat(clips, dim=-1)
    width = pipe.transformer.config.joint_attention_dim
    if t5 is None:
        t5 = torch.zeros(len(captions), t5_max_length, width, device=clip.device, dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


# SD3's per-encoder dropout options (kohya's --clip_l_dropout_rate, --clip_g_dropout_rate, --t5_dropout_rate) and the
# component each zeroes
ENCODER_DROPOUT = (("clip_l_dropout", "text_encoder"), ("clip_g_dropout", "text_encoder_2"), ("t5_dropout", "text_encoder_3"))


def encoder_dropout_rates(data: DataConfig, model: BaseModel) -> dict[str, float]:
    """The per-encoder dropout rates of `data` by component (those above 0); refused in one line for a model without
    SD3's three encoders, and T5's with --no-t5 (its part is zeros already)."""
    rates = {component: getattr(data, option) for option, component in ENCODER_DROPOUT if getattr(data, option)}
    if not rates:
        return rates
    if not any(spec.architecture == "t5" for spec in model.family.text_encoders):
        flags = ", ".join(f"--{option.replace('_', '-')}" for option, component in ENCODER_DROPOUT if component in rates)
        raise UserError(
            f"{flags}: per-encoder dropout is for SD3's three text encoders; {model.name} is {model.family.label}: use --caption-dropout"
        )
    if "text_encoder_3" in rates and "text_encoder_3" not in model.text_encoders:
        raise UserError("--t5-dropout with --no-t5: T5's part of the text is always zeros then; drop one of them")
    return rates


def draw_encoder_dropout(rates: Mapping[str, float], count: int, rng: random.Random) -> list[frozenset[str]]:
    """For each of `count` images, the components whose part of its text is dropped this step: one draw from `rng`
    per image per encoder with a rate above 0, in the order of `rates` (as kohya draws, per image and encoder)."""
    return [frozenset(component for component, rate in rates.items() if rng.random() < rate) for _ in range(count)]


def zero_dropped_encoders(
    model: BaseModel, hidden: torch.Tensor, pooled: torch.Tensor, dropped: Sequence[frozenset[str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's text (`_encode_joint`'s layout) with each image's dropped encoders' parts set to zero, as kohya's
    Sd3TextEncodingStrategy.drop_cached_text_encoder_outputs does: a CLIP's columns of the CLIP tokens and its
    columns of the pooled embedding; T5's tokens (every column). New tensors: cached ones are never written."""
    if not any(dropped):
        return hidden, pooled
    hidden_mask = torch.zeros(hidden.shape, dtype=torch.bool, device=hidden.device)
    pooled_mask = torch.zeros(pooled.shape, dtype=torch.bool, device=pooled.device)
    clip_rows = hidden.shape[1] - model.t5_max_length  # the CLIPs' tokens come first, T5's after them
    column = pooled_column = 0
    for spec in model.family.text_encoders:
        if spec.architecture == "t5":
            for image, parts in enumerate(dropped):
                if spec.component in parts:
                    hidden_mask[image, clip_rows:] = True
            continue
        config = getattr(model.pipe, spec.component).config  # the pipeline's own module (the run's may be wrapped)
        width, pooled_width = config.hidden_size, config.projection_dim
        for image, parts in enumerate(dropped):
            if spec.component in parts:
                hidden_mask[image, :clip_rows, column : column + width] = True
                pooled_mask[image, pooled_column : pooled_column + pooled_width] = True
        column, pooled_column = column + width, pooled_column + pooled_width
    return hidden.masked_fill(hidden_mask, 0.0), pooled.masked_fill(pooled_mask, 0.0)


def build_caches(
    mode: str, model: BaseModel, out: Path, records: Sequence[ImageRecord]
) -> tuple[LatentCache | None, EmbeddingCache | None]:
    """Latent cache (`mode` memory, or disk in OUT/cache) unless off or some subset crops at random; embedding cache
    (memory, or disk in OUT/cache/text) unless a text encoder trains or every caption changes from step to step
    (shuffled tags, tag dropout, wildcards): the captions that stay the same are cached, the others encoded at each
    step. Each encodes where its model is: after filling, a damaged disk entry is encoded by the offloaded model."""
    if mode == "off":
        return None, None
    pipe, encoders = model.pipe, model.text_encoders
    latent_cache = None
    if all(record.rules.crop != "random" for record in records):
        cache_dir = out / "cache" if mode == "disk" else None
        latent_cache = LatentCache(
            lambda pixels, paths: encode_images(pipe.vae, pixels, paths, _device_of(pipe.vae)),
            model_fingerprint(model.name, pipe.vae),
            cache_dir,
        )
    embedding_cache = None
    if not model.trains_text_encoders and any(record.rules.static or record.rules.caption_dropout for record in records):
        fingerprint, cache_dir = (text_fingerprint(model), out / "cache" / "text") if mode == "disk" else ("", None)
        embedding_cache = EmbeddingCache(
            lambda captions: encode_captions(
                pipe, encoders, model.family, captions, _device_of(next(iter(encoders.values()))), model.t5_max_length
            ),
            fingerprint,
            cache_dir,
        )
    return latent_cache, embedding_cache


def text_fingerprint(model: BaseModel) -> str:
    """A short hash of the text encoders, their tokenizers and which of their outputs condition the UNet, so cached
    embeddings of different models never mix."""
    pipe, family = model.pipe, model.family
    parts = [f"{CACHE_VERSION}|{family.empty_prompt_zeros}"]
    for spec in family.text_encoders:
        if spec.component not in model.text_encoders:  # SD3's T5 left out: zeros in its place
            parts.append(f"{spec.component} left out")
            continue
        tokenizer = getattr(pipe, spec.tokenizer)
        if spec.architecture == "t5":
            parts.append(f"t5 {model.t5_max_length}")
        parts.append(f"{spec.hidden_layer}|{spec.pooled}|{len(tokenizer)}|{tokenizer.model_max_length}")
        parts.append(model_fingerprint(model.name, model.text_encoders[spec.component]))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def fill_caches(
    records,
    buckets,
    latent_cache: LatentCache | None,
    embedding_cache: EmbeddingCache | None,
    show: bool,
    batch_size: int = 1,
    share: tuple[int, int] = (0, 1),
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> None:
    """Encode every image (both flips when flipping; `batch_size` images of one size per VAE call) and caption once,
    before the first step; report the size.

    `share` is (this process's index, the process count). A disk cache is filled once for all processes: each
    encodes its share of the entries, waits for the others (`wait_for_everyone`, called by every process), then
    reads theirs back. A memory cache is each process's own, so each fills it with every entry (every process
    draws from all the images over the epochs)."""
    process, count = share
    shared = count > 1 and any(cache is not None and cache.cache_dir is not None for cache in (latent_cache, embedding_cache))
    jobs: list[tuple[ImageRecord, Size, bool]] = []
    captions: list[str] = []
    if latent_cache is not None:
        jobs = [
            (record, size, flip) for record, size in zip(records, buckets) for flip in ((False, True) if record.rules.flip else (False,))
        ]
        if shared:  # one job per entry, so that no two processes encode the same image
            jobs = list(
                {
                    (record.path, size, record.rules.crop, flip, record.mask_source, record.alpha_mask): (record, size, flip)
                    for record, size, flip in jobs
                }.values()
            )
        _fill_latents(latent_cache, jobs[process::count] if shared else jobs, batch_size, show)
    if embedding_cache is not None:
        static = {step_caption(record.caption, record.rules, None) for record in records if record.rules.static}
        captions = sorted(static | ({""} if any(record.rules.caption_dropout for record in records) else set()))
        _fill_embeddings(embedding_cache, captions[process::count] if shared else captions)
    if shared:
        wait_for_everyone()
        # the other processes' entries, read from their files (one found damaged is encoded again)
        if latent_cache is not None:
            _fill_latents(latent_cache, jobs, batch_size, show=False)
        if embedding_cache is not None:
            _fill_embeddings(embedding_cache, captions)
    if show and (latent_cache or embedding_cache):
        size = sum(cache.size_bytes() for cache in (latent_cache, embedding_cache) if cache is not None)
        where = f" (on disk: {latent_cache.cache_dir})" if latent_cache and latent_cache.cache_dir else ""
        latents = len(latent_cache.keys) if latent_cache else 0
        captions = len(embedding_cache.keys) if embedding_cache else 0
        tqdm.write(f"cache: {latents} latents, {captions} captions, {size / 2**20:.1f} MiB{where}")


def _fill_embeddings(embedding_cache: EmbeddingCache, captions: list[str]) -> None:
    """The embeddings of `captions`, 16 captions per text-encoder call."""
    for start in range(0, len(captions), 16):
        embedding_cache.get(captions[start : start + 16])


def _fill_latents(latent_cache: LatentCache, jobs: Sequence[tuple[ImageRecord, Size, bool]], batch_size: int, show: bool) -> None:
    """The latents of `jobs` (record, bucket size, flip), `batch_size` images of one size per VAE call (jobs
    grouped by size, in order within a size)."""
    by_size: dict[Size, list[tuple[ImageRecord, Size, bool]]] = {}
    for job in jobs:
        by_size.setdefault(job[1], []).append(job)
    batches = [group[start : start + batch_size] for group in by_size.values() for start in range(0, len(group), batch_size)]
    with tqdm(total=len(jobs), desc="caching latents", disable=not show) as progress:
        for batch in batches:
            images = []
            for record, size, flip in batch:
                crop = record.rules.crop
                load_pixels = functools.partial(load_image, record, size, crop=crop, flip=flip)
                load_pixel_mask = None
                if record.mask_source is not None:  # a cached crop is the centre one
                    load_pixel_mask = functools.partial(load_mask, record, size, crop_window(record, size, crop), flip)
                images.append((record.path, size, crop, flip, load_pixels, latent_cache.mask_tag(record), load_pixel_mask))
            latent_cache.fill(images)
            progress.update(len(batch))


@dataclass(frozen=True)
class Draw:
    """One image of a micro-batch as this step sees it: the random choices (mirror, crop window, caption after
    shuffling and dropout) drawn, nothing loaded yet."""

    index: int  # into the dataset's records
    size: Size  # its bucket
    flip: bool
    window: Window  # where the image is cut (`crop_window`)
    caption: str
    dropped_encoders: frozenset[str] = frozenset()  # SD3: the text encoders whose part of its text is zeroed this step

    @property
    def key(self) -> tuple:
        return (self.index, self.size, self.flip, self.window)


class ImageLoader:
    """Decodes, crops and resizes training images on `workers` threads, ahead of the step that needs them (the
    next step's draws are known a step early: each step's choices are a function of its seed). PIL releases the
    GIL while it decodes and resamples, so threads load in parallel with each other and with the training step.
    `workers=0` loads each image in the step that needs it, on the training thread. Pixels are identical either way."""

    def __init__(self, records: Sequence[ImageRecord], workers: int):
        self.records = records
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sdlora-images") if workers else None
        self.pending: dict[tuple, Future] = {}

    def prefetch(self, draws: Sequence[Draw]) -> None:
        """Start loading `draws` (those not already under way); forget loads no longer wanted."""
        if self.pool is None:
            return
        wanted = {draw.key: draw for draw in draws}
        for key in [key for key in self.pending if key not in wanted]:
            self.pending.pop(key).cancel()
        for key, draw in wanted.items():
            if key not in self.pending:
                self.pending[key] = self.pool.submit(self._load, draw)

    def __call__(self, draw: Draw) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image's pixels and its loss mask at pixel size (None without one): from a prefetched load if one was
        started, else loaded now."""
        future = self.pending.pop(draw.key, None)
        return future.result() if future is not None else self._load(draw)

    def _load(self, draw: Draw) -> tuple[torch.Tensor, torch.Tensor | None]:
        record = self.records[draw.index]
        pixels = load_image(record, draw.size, flip=draw.flip, window=draw.window)
        return pixels, None if record.mask_source is None else load_mask(record, draw.size, draw.window, draw.flip)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending.clear()


@dataclass
class BatchEncoder:
    """Turns a micro-batch of dataset indices into (latents, conditioning), in two halves: `draw` makes the step's
    random choices (flips, crops, caption shuffling and dropout, from the step's `rng`), `encode` loads what they
    need and encodes it (latent samples from the step's `generator`; SDXL's time ids from each image's size and crop)."""

    data: DataConfig  # the trigger word
    model: BaseModel  # the VAE and text encoders (possibly wrapped for training), the device and the UNet's dtype
    records: Sequence[ImageRecord]
    sizes: Sequence[Size]  # each record's bucket
    latent_cache: LatentCache | None
    embedding_cache: EmbeddingCache | None
    loader: ImageLoader | None = None  # without a latent cache: the images, loaded ahead on worker threads
    encoder_dropout: dict[str, float] = dataclasses.field(default_factory=dict)  # SD3: `encoder_dropout_rates`

    def __call__(
        self, indices: list[int], rng: random.Random, generator: torch.Generator
    ) -> tuple[torch.Tensor, Conditioning, torch.Tensor | None]:
        return self.encode(self.draw(indices, rng), generator)

    def draw(self, indices: list[int], rng: random.Random) -> list[Draw]:
        """The micro-batch's random choices, in a fixed order of draws from `rng`."""
        draws = []
        for index in indices:
            record, size, rules = self.records[index], self.sizes[index], self.records[index].rules
            flip = rules.flip and rng.random() < 0.5
            window = crop_window(record, size, rules.crop, rng)
            draws.append(Draw(index, size, flip, window, step_caption(record.caption, rules, rng, self.data.trigger)))
        captions = drop_captions([d.caption for d in draws], [self.records[d.index].rules.caption_dropout for d in draws], rng)
        dropped = draw_encoder_dropout(self.encoder_dropout, len(draws), rng) if self.encoder_dropout else [frozenset()] * len(draws)
        return [dataclasses.replace(d, caption=c, dropped_encoders=parts) for d, c, parts in zip(draws, captions, dropped)]

    def encode(self, draws: Sequence[Draw], generator: torch.Generator) -> tuple[torch.Tensor, Conditioning, torch.Tensor | None]:
        """The UNet's inputs for the drawn micro-batch, and the loss masks on the latent grid ([batch, 1, h, w]; ones
        for an image without a mask, as kohya fills them) or None when no image of it has one."""
        model, device = self.model, self.model.device
        if self.latent_cache is not None:
            entries = []
            for d in draws:
                record = self.records[d.index]
                load_pixels = functools.partial(load_image, record, d.size, flip=d.flip, window=d.window)
                load_pixel_mask = None if record.mask_source is None else functools.partial(load_mask, record, d.size, d.window, d.flip)
                mask = self.latent_cache.mask_tag(record)
                entries.append(self.latent_cache.get(record.path, d.size, record.rules.crop, d.flip, load_pixels, mask, load_pixel_mask))
            mean, std = torch.stack([entry[0] for entry in entries]), torch.stack([entry[1] for entry in entries])
            masks = [entry[2] for entry in entries]
        else:  # no cache: the micro-batch (one bucket, so one size) through the VAE in one call
            load = self.loader or ImageLoader(self.records, 0)
            loaded = [load(d) for d in draws]
            pixels = torch.stack([pixels for pixels, _ in loaded])
            mean, std = encode_images(model.pipe.vae, pixels, [self.records[d.index].path for d in draws], device)
            masks = [None if mask is None else latent_mask(mask[None], mean.shape[-2:])[0].cpu() for _, mask in loaded]
        mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
        loss_masks = None
        if any(mask is not None for mask in masks):
            ones = torch.ones(1, *mean.shape[-2:])
            loss_masks = torch.stack([ones if mask is None else mask for mask in masks]).to(device, torch.float32)
        noise = torch.randn(mean.shape, generator=generator).to(device)
        latents = scale_latents(mean + std * noise, model.pipe.vae)
        captions = [d.caption for d in draws]
        hidden, pooled = self._embed(captions, [c == "" or self.records[d.index].rules.static for c, d in zip(captions, draws)])
        if self.encoder_dropout:  # after the cache: cached text stays whole, and each step drops its own parts
            hidden, pooled = zero_dropped_encoders(model, hidden, pooled, [d.dropped_encoders for d in draws])
        time_ids = [sdxl_time_ids(self.records[d.index], d.size, d.window, d.flip) for d in draws]
        conditioning = Conditioning(hidden, pooled, torch.tensor(time_ids, dtype=torch.float32) if model.family.time_ids else None)
        return latents.to(model.dtype), conditioning.to(device, model.dtype), loss_masks

    def _embed(self, captions: list[str], cached: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The captions' conditioning: those that never change from the cache, the others encoded now, in order."""
        if self.embedding_cache is None or not any(cached):
            return encode_captions(
                self.model.pipe, self.model.text_encoders, self.model.family, captions, self.model.device, self.model.t5_max_length
            )
        if all(cached):
            return self.embedding_cache.get(captions)
        hidden, pooled = self.embedding_cache.get([c for c, hit in zip(captions, cached) if hit])
        model = self.model
        fresh_hidden, fresh_pooled = encode_captions(
            model.pipe,
            model.text_encoders,
            model.family,
            [c for c, hit in zip(captions, cached) if not hit],
            model.device,
            model.t5_max_length,
        )
        order = torch.tensor([index for index, hit in enumerate(cached) if hit] + [index for index, hit in enumerate(cached) if not hit])
        inverse = torch.argsort(order)
        hidden = torch.cat([hidden.to(fresh_hidden.device, fresh_hidden.dtype), fresh_hidden])[inverse.to(fresh_hidden.device)]
        if pooled is not None:
            pooled = torch.cat([pooled.to(fresh_pooled.device, fresh_pooled.dtype), fresh_pooled])[inverse.to(fresh_pooled.device)]
        return hidden, pooled
