"""Does --masked-loss learn the unmasked part of the images only? A table.

Each training image holds two patterns: horizontal red/blue stripes in its left half (white in its mask: trained)
and vertical green/yellow stripes in its right half (black in its mask), each at a random phase. Held-out images
are drawn the same way at other phases. A LoRA is trained on the tiny SD1 model with and without --masked-loss
(same seed, steps, rate), and the held-out denoising loss (fixed noise, 8 timesteps spread over the schedule, as
sdlora's validation loss) is measured on each half of the latent grid before and after training. The table gives
the change of each half's loss in percent (negative: learnt), the median over seeds.

    python bench/masked_loss_efficacy.py [--steps 150] [--seeds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 64


def _stripes(phase_left: int, phase_right: int) -> tuple[np.ndarray, np.ndarray]:
    """An image with the two patterns, and its mask (left half white)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    left = np.where(((y + phase_left) // 4) % 2 == 0, 0, 1)
    right = np.where(((x + phase_right) // 4) % 2 == 0, 2, 3)
    colours = np.array([(210, 40, 40), (40, 40, 210), (40, 190, 60), (230, 220, 40)], dtype=np.uint8)
    image = colours[np.where(x < SIZE // 2, left, right)]
    mask = np.where(x < SIZE // 2, 255, 0).astype(np.uint8)
    return image, mask


def _sets(root: Path, train: int = 8, held_out: int = 4) -> tuple[Path, Path, list[Path]]:
    images, masks, held = root / "images", root / "masks", root / "held_out"
    for folder in (images, masks, held):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(train):
        image, mask = _stripes(int(rng.integers(8)), int(rng.integers(8)))
        Image.fromarray(image).save(images / f"img{index}.png")
        Image.fromarray(mask, "L").save(masks / f"img{index}.png")
        (images / f"img{index}.txt").write_text("stripes")
    for index in range(held_out):
        Image.fromarray(_stripes(index * 2 + 1, index * 2 + 5)[0]).save(held / f"held{index}.png")
    return images, masks, sorted(held.glob("*.png"))


@torch.no_grad()
def _half_losses(run, held_out: list[Path]) -> tuple[float, float]:
    """The held-out loss on the left (trained) and right (masked) halves of the latent grid."""
    from sdlora.training.data import ImageRecord, load_image
    from sdlora.training.objective import diffusion_loss

    model = run.model
    vae = model.pipe.vae
    pixels = torch.stack([load_image(ImageRecord(p, "", SIZE, SIZE), (SIZE, SIZE)) for p in held_out])
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    latents = latents.to(model.device)
    hidden = run.encoder._embed(["stripes"] * len(held_out), [False] * len(held_out))[0]
    width = latents.shape[-1]
    left = torch.zeros(1, 1, *latents.shape[-2:], device=model.device)
    left[..., : width // 2] = 1.0
    totals = [0.0, 0.0]
    count = model.noise_scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(1234)
    for timestep in torch.linspace(0, count - 1, 8).round().long():
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(held_out),), int(timestep))
        for half, mask in enumerate((left, 1 - left)):
            loss = diffusion_loss(
                model.unet, model.noise_scheduler, latents, hidden, run.config.objective, timesteps=timesteps, noise=noise,
                mask=mask.expand(len(held_out), -1, -1, -1),
            )  # fmt: skip
            totals[half] += float(loss) / float(mask.mean()) / 8
    return totals[0], totals[1]


def _trial(images: Path, masks: Path, held_out: list[Path], out: Path, masked: bool, seed: int, steps: int) -> tuple[float, float]:
    from sdlora.training import recipe
    from sdlora.training.config import TrainConfig

    options = dict(mask_dir=str(masks), masked_loss=True) if masked else {}
    config = TrainConfig.from_options(
        data_dir=str(images), output_dir=str(out), model="tiny", resolution=SIZE, rank=4, alpha=8.0, steps=steps, batch_size=2,
        lr=2e-3, checkpoint_every=0, validate_every=0, samples=False, seed=seed, mixed_precision="no", **options,
    )  # fmt: skip
    run = recipe.setup(config)
    before = _half_losses(run, held_out)
    recipe.run_steps(run)
    after = _half_losses(run, held_out)
    return tuple(100.0 * (a - b) / b for a, b in zip(after, before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="sdlora-masked-"))
    images, masks, held_out = _sets(root / "data")
    rows = []
    for masked in (False, True):
        changes = [_trial(images, masks, held_out, root / f"run-{masked}-{seed}", masked, seed, args.steps) for seed in range(args.seeds)]
        rows.append((masked, [statistics.median(c[half] for c in changes) for half in (0, 1)], changes))
    print(f"\nheld-out loss change after {args.steps} steps on the tiny SD1 model, median of {args.seeds} seeds")
    print("| run | left half (trained, mask white) | right half (mask black) | per seed (left, right) |")
    print("| --- | --- | --- | --- |")
    for masked, (left, right), changes in rows:
        seeds = "; ".join(f"{a:+.1f}, {b:+.1f}" for a, b in changes)
        print(f"| {'--masked-loss' if masked else 'no mask'} | {left:+.1f}% | {right:+.1f}% | {seeds} |")


if __name__ == "__main__":
    main()
