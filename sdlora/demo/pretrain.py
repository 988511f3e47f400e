"""Pretrain the demo base model from procedural scenes: python -m sdlora.demo.pretrain OUT [--seed 0].

Four stages, each resumable, in OUT:
1. `pool.npz`: the pictures. Neutral scenes (what the base model draws) for the UNet, plus flat_poster and ink_hatch
   renderings for the VAE alone: a VAE is a codec, trained broadly (SD's saw far more than SD's UNet was tuned on),
   so that a LoRA trained on those styles can be decoded; the UNet, which holds the model's prior, sees only
   neutral scenes.
2. `vae.ckpt`: the autoencoder (L1 reconstruction and L1 of its pixel differences, which keeps thin lines sharp, and
   a small KL term; its posterior made near-deterministic, as trained SD VAEs are), its scaling factor set so the
   latents of the neutral pictures have unit variance (SD's 0.18215 plays the same part).
3. the neutral pictures' latents (posterior means) and tokenized captions, computed again on resume (seconds).
4. `unet.ckpt` then `pipeline/`: the UNet and the text encoder trained together on the diffusion loss of the demo's
   zero-terminal-SNR schedule (`models.demo.SCHEDULER_CONFIG`): the velocity target, unweighted (min-SNR weights
   would give the pure-noise steps, where a picture's layout and colours are chosen, almost no weight), 10% empty
   captions (so classifier-free guidance works), an EMA of both kept and shipped.

Every random draw of step s comes from a generator seeded from (seed, stage, s), so a run stopped and resumed from
a checkpoint gives the same weights as one run straight through; two runs with the same seed and thread count give
the same bits on one machine. `pipeline/` is written in half precision; `sdlora/models/demo/` is a copy of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..drawing.scenes import DEMO_KINDS
from ..drawing.styles import STYLE_NAMES, STYLES, draw
from ..errors import UserError
from ..models.demo import DEMO_SIZE, build_demo_architecture
from ..models.loading import save_pipeline
from ..models.tiny import make_encoder_near_deterministic
from ..storage.atomic import atomic_file
from ..training.objective import target_for


@dataclass(frozen=True)
class Schedule:
    """How much of everything: the full run's figures are the defaults; tests shrink them."""

    neutral_images: int = 12000
    other_images: int = 2000  # per example style, for the VAE only
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-7
    edge_weight: float = 1.0
    unet_steps: int = 1800
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    checkpoint_every: int = 100
    workers: int = 2


STAGES = {"vae": 1, "unet": 2}  # mixed into the per-step seeds
HELD_OUT = 5_000_000  # pictures from this index on are never pretrained on: held-out prompts and classifier tests


def scene_seed(seed: int, style: str, index: int) -> int:
    """The `random.Random` seed of picture `index` of `style` drawn with `seed` (clear of the example sets' 1000-2999)."""
    return seed * 10**8 + STYLE_NAMES.index(style) * 10**7 + 100_000 + index


def _draw_one(job: tuple[str, int, int]) -> tuple[np.ndarray, str]:
    style, seed, index = job
    # the example styles drawn 8 times larger, as their datasets' 512-pixel pictures are, so outlines and hatching
    # come out as thin as a LoRA trained at 64 px sees them
    supersample = 4 if style == "neutral" else 8
    rng = random.Random(scene_seed(seed, style, index))
    return draw(STYLES[style], (DEMO_SIZE, DEMO_SIZE), rng, DEMO_KINDS[index % len(DEMO_KINDS)], supersample=supersample)


def draw_pool(schedule: Schedule, seed: int) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{style: (pictures [N, 64, 64, 3] uint8, captions)}: neutral for the UNet and VAE, the two others for the VAE."""
    counts = {"neutral": schedule.neutral_images, "flat_poster": schedule.other_images, "ink_hatch": schedule.other_images}
    jobs = [(style, seed, index) for style, count in counts.items() for index in range(count)]
    progress = {"total": len(jobs), "desc": "drawing scenes", "unit": "img"}
    if schedule.workers <= 1:
        drawn = [_draw_one(job) for job in tqdm(jobs, **progress)]
    else:
        with get_context("spawn").Pool(schedule.workers) as pool:  # each picture from its own seed: the order of work does not matter
            drawn = list(tqdm(pool.imap(_draw_one, jobs, chunksize=64), **progress))
    pool_by_style, start = {}, 0
    for style, count in counts.items():
        part = drawn[start : start + count]
        start += count
        pool_by_style[style] = (np.stack([picture for picture, _ in part]), [text for _, text in part])
    return pool_by_style


def load_or_draw_pool(out: Path, schedule: Schedule, seed: int) -> dict[str, tuple[np.ndarray, list[str]]]:
    path = out / "pool.npz"
    if path.is_file():
        data = np.load(path)
        captions = json.loads((out / "captions.json").read_text(encoding="utf-8"))
        return {style: (data[style], captions[style]) for style in captions}
    pool = draw_pool(schedule, seed)
    with atomic_file(out / "captions.json") as tmp:
        Path(tmp).write_text(json.dumps({style: captions for style, (_, captions) in pool.items()}), encoding="utf-8")
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as stream:
            np.savez(stream, **{style: pictures for style, (pictures, _) in pool.items()})
    return pool


def _generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGES[stage] * 100_000 + step)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _pixels(pictures: np.ndarray, index: torch.Tensor) -> torch.Tensor:
    batch = torch.from_numpy(pictures[index.numpy()]).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.is_file() else None  # our own file, still read weights-only


def train_vae(vae, pool, schedule: Schedule, seed: int, out: Path) -> None:
    """The autoencoder on every style's pictures; resumes from out/vae.ckpt."""
    pictures = np.concatenate([pictures for pictures, _ in pool.values()])
    # near-deterministic, as trained SD VAEs are (posterior std ~0.01): the log-variance outputs are fixed at std
    # 0.0025 and never trained, so the decoder learns from the latents themselves, not a blur of noisy samples, and
    # a LoRA's training latents (mean + std * noise) are the means the UNet was pretrained on
    make_encoder_near_deterministic(vae)
    latent_channels = vae.config.latent_channels
    vae.quant_conv.weight.register_hook(lambda grad: torch.cat([grad[:latent_channels], torch.zeros_like(grad[latent_channels:])]))
    vae.quant_conv.bias.register_hook(lambda grad: torch.cat([grad[:latent_channels], torch.zeros_like(grad[latent_channels:])]))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=schedule.vae_lr, weight_decay=0.0)
    start, checkpoint = 0, _load_checkpoint(out / "vae.ckpt")
    if checkpoint:
        vae.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start = checkpoint["step"]
    vae.train()
    bar = tqdm(range(start, schedule.vae_steps), initial=start, total=schedule.vae_steps, desc="VAE", unit="step")
    for step in bar:
        generator = _generator(seed, "vae", step)
        index = torch.randint(len(pictures), (schedule.vae_batch,), generator=generator)
        images = _pixels(pictures, index)
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.sample(generator=generator)).sample
        # L1, plus L1 of the horizontal and vertical differences: edges and thin lines (outlines, hatching) stay sharp
        edges = sum((decoded.diff(dim=d) - images.diff(dim=d)).abs().mean() for d in (2, 3))
        loss = (decoded - images).abs().mean() + schedule.edge_weight * edges + schedule.kl_weight * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, schedule.vae_steps, schedule.vae_lr, schedule.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % schedule.checkpoint_every == 0 or step + 1 == schedule.vae_steps:
            _save_checkpoint(out / "vae.ckpt", {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1})
    vae.eval()


@torch.no_grad()
def encode_pool(vae, pictures: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of the pictures (unscaled)."""
    means = [
        vae.encode(_pixels(pictures, torch.arange(i, min(i + batch, len(pictures))))).latent_dist.mean
        for i in range(0, len(pictures), batch)
    ]
    return torch.cat(means)


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def train_unet(pipe, latents: torch.Tensor, ids: torch.Tensor, schedule: Schedule, seed: int, out: Path) -> dict:
    """UNet and text encoder together on the neutral latents; returns the EMA weights {"unet": ..., "text_encoder": ...}."""
    from diffusers import DDPMScheduler  # diffusers takes seconds to import: only when pretraining

    unet, text_encoder = pipe.unet, pipe.text_encoder
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    empty = _tokenize(pipe.tokenizer, [""])[0]
    modules = {"unet": unet, "text_encoder": text_encoder}
    parameters = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=schedule.unet_lr, weight_decay=0.01)
    ema = {name: {key: value.detach().clone() for key, value in module.state_dict().items()} for name, module in modules.items()}
    start, checkpoint = 0, _load_checkpoint(out / "unet.ckpt")
    if checkpoint:
        for name, module in modules.items():
            module.load_state_dict(checkpoint[name])
        optimizer.load_state_dict(checkpoint["optimizer"])
        ema, start = checkpoint["ema"], checkpoint["step"]
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, schedule.unet_steps), initial=start, total=schedule.unet_steps, desc="UNet", unit="step")
    for step in bar:
        generator = _generator(seed, "unet", step)
        index = torch.randint(len(latents), (schedule.unet_batch,), generator=generator)
        batch = latents[index]
        tokens = ids[index].clone()
        tokens[torch.rand(len(index), generator=generator) < schedule.caption_dropout] = empty
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_schedule.add_noise(batch, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(tokens)[0]).sample
        loss = (prediction - target_for(noise_schedule, batch, noise, timesteps, None)).pow(2).mean()
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, schedule.unet_steps, schedule.unet_lr, schedule.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(schedule.ema_decay, (1 + step) / (10 + step))  # diffusers EMAModel's warm-up
        with torch.no_grad():
            for name, module in modules.items():
                for key, value in module.state_dict().items():
                    if value.dtype.is_floating_point:
                        ema[name][key].lerp_(value, 1 - decay)
                    else:
                        ema[name][key].copy_(value)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % schedule.checkpoint_every == 0 or step + 1 == schedule.unet_steps:
            state = {name: module.state_dict() for name, module in modules.items()}
            _save_checkpoint(out / "unet.ckpt", {**state, "optimizer": optimizer.state_dict(), "ema": ema, "step": step + 1})
    unet.eval()
    text_encoder.eval()
    return ema


def pretrain(out: str | os.PathLike, seed: int = 0, schedule: Schedule | None = None) -> Path:
    """Run (or resume) every stage in `out`; returns the half-precision pipeline folder out/pipeline."""
    schedule = schedule or Schedule()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "schedule.json"
    wanted = {"seed": seed, **asdict(schedule)}
    if recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")) != wanted:
        raise UserError(f"{out} holds a run with other settings ({recorded}): resume it with those, or choose another folder")
    recorded.write_text(json.dumps(wanted, indent=1), encoding="utf-8")
    torch.manual_seed(seed)
    pool = load_or_draw_pool(out, schedule, seed)
    pipe = build_demo_architecture(seed)
    train_vae(pipe.vae, pool, schedule, seed, out)
    neutral_pictures, neutral_captions = pool["neutral"]
    means = encode_pool(pipe.vae, neutral_pictures)
    scaling = round(1.0 / means.std().item(), 4)
    pipe.vae.register_to_config(scaling_factor=scaling)
    tqdm.write(f"VAE scaling factor {scaling} (latent std {means.std().item():.4f} over {len(means)} neutral pictures)")
    latents = means * scaling
    ids = _tokenize(pipe.tokenizer, neutral_captions)
    ema = train_unet(pipe, latents, ids, schedule, seed, out)
    pipe.unet.load_state_dict(ema["unet"])
    pipe.text_encoder.load_state_dict(ema["text_encoder"])
    pipe.to(torch.float16)
    return save_pipeline(pipe, out / "pipeline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlora.demo.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="work folder: pool, checkpoints and out/pipeline (run again to resume)")
    parser.add_argument("--seed", type=int, default=0)
    defaults = Schedule()
    for field, value in asdict(defaults).items():
        parser.add_argument("--" + field.replace("_", "-"), type=type(value), default=value, help=f"default {value}")
    args = parser.parse_args(argv)
    schedule = replace(defaults, **{field: getattr(args, field) for field in asdict(defaults)})
    try:
        folder = pretrain(args.out, args.seed, schedule)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
