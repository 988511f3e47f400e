"""Which of the three styles a picture is in: a small CNN fitted on procedural renderings.

    python -m sdlora.demo.style            # fit on renderings, report held-out accuracy, write style_classifier.safetensors
    python -m sdlora.demo.style --check    # report the shipped classifier's accuracy on held-out renderings

It is fitted on renderings of the three styles at 64 px, drawn as the LoRA datasets are and then blurred and noised
at random, because generated pictures are softer and noisier than drawn ones. Fixed image statistics (colourfulness,
dark ridges, paper share, gradient spread) were tried first and separated neutral from flat_poster too poorly
(docs/benchmarks.md). Fitting is deterministic: fixed seeds, one thread.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..drawing.scenes import DEMO_KINDS
from ..drawing.styles import STYLE_NAMES, STYLES, draw
from ..storage.atomic import atomic_file

CLASSIFIER_FILE = Path(__file__).resolve().parent / "style_classifier.safetensors"
FIT_START, TEST_START = 6_000_000, 7_000_000  # scene indices of the fitting and held-out renderings (clear of pretraining's)


def _network() -> torch.nn.Sequential:
    """Four 3x3 conv levels (GroupNorm, SiLU, average pooling), global average, a linear layer: 63k parameters."""
    nn = torch.nn

    def level(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.GroupNorm(8, outputs), nn.SiLU()]

    return nn.Sequential(
        *level(3, 16),
        *level(16, 16),
        nn.AvgPool2d(2),
        *level(16, 32),
        nn.AvgPool2d(2),
        *level(32, 64),
        nn.AvgPool2d(2),
        *level(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, len(STYLE_NAMES)),
    )


def as_array(pictures) -> np.ndarray:
    """RGB uint8 [N, H, W, 3] from such an array, or a list of arrays or PIL images."""
    if isinstance(pictures, np.ndarray):
        return pictures
    return np.stack([picture if isinstance(picture, np.ndarray) else np.asarray(picture.convert("RGB")) for picture in pictures])


def _tensor(pictures: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class StyleClassifier:
    """64x64 RGB pictures -> one of `STYLE_NAMES`."""

    def __init__(self, network: torch.nn.Module | None = None):
        self.network = (network or _network()).eval()
        self.styles = STYLE_NAMES

    @torch.no_grad()
    def probabilities(self, pictures) -> np.ndarray:
        pictures = as_array(pictures)
        if pictures.shape[1:3] != (64, 64):
            pictures = np.stack([np.asarray(Image.fromarray(p).resize((64, 64), Image.Resampling.LANCZOS)) for p in pictures])
        return torch.softmax(self.network(_tensor(pictures)), dim=1).numpy()

    def classify(self, pictures) -> list[str]:
        """The style of each picture (RGB uint8 [N, H, W, 3], or a list of PIL images)."""
        return [self.styles[i] for i in self.probabilities(pictures).argmax(axis=1)]

    def save(self, path: str | Path) -> None:
        with atomic_file(path) as tmp:
            save_file(
                {key: value.contiguous() for key, value in self.network.state_dict().items()},
                str(tmp),
                metadata={"styles": ",".join(self.styles)},
            )


def load_classifier(path: str | Path = CLASSIFIER_FILE) -> StyleClassifier:
    network = _network()
    network.load_state_dict(load_file(str(path)))
    return StyleClassifier(network)


def _degrade(picture: np.ndarray, rng: random.Random) -> np.ndarray:
    """A random blur and noise: generated pictures are softer and noisier than drawn ones."""
    image = Image.fromarray(picture)
    radius = rng.choice((0.0, 0.0, 0.4, 0.7, 1.0))
    if radius:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    noisy = np.asarray(image).astype(np.float32)
    sigma = rng.choice((0.0, 2.0, 5.0, 8.0))
    if sigma:
        noisy += np.asarray(np.random.default_rng(rng.randrange(2**32)).normal(0.0, sigma, noisy.shape), dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def renderings(count: int, start: int, degrade: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(pictures [3 * count, 64, 64, 3], style labels): `count` per style, scenes `start` on, drawn as the LoRA datasets
    are (the example sets are 384-512 px pictures trained at 64 px: drawn 6 or 8 times larger, then resized down)."""
    pictures, labels = [], []
    for label, name in enumerate(STYLE_NAMES):
        for index in range(start, start + count):
            rng = random.Random(f"style-{name}-{index}")
            picture, _ = draw(STYLES[name], (64, 64), rng, DEMO_KINDS[index % len(DEMO_KINDS)], supersample=rng.choice((6, 8)))
            pictures.append(_degrade(picture, rng) if degrade else picture)
            labels.append(label)
    return np.stack(pictures), np.asarray(labels)


def fit(pictures: np.ndarray, labels: np.ndarray, epochs: int = 10, seed: int = 0) -> StyleClassifier:
    """The CNN fitted with AdamW on the pictures, flipped at random; deterministic (one thread, seeded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        network = _network()
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(seed)
        x, y = _tensor(pictures), torch.from_numpy(labels).long()
        for _ in tqdm(range(epochs), desc="fitting the style classifier", unit="epoch"):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), 32):
                index = order[start : start + 32]
                batch = x[index]
                flip = torch.rand(len(index), generator=generator) < 0.5
                batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
                loss = torch.nn.functional.cross_entropy(network(batch), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return StyleClassifier(network)


def accuracy(classifier: StyleClassifier, pictures: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """(share right, confusion matrix [true, predicted])."""
    predicted = classifier.probabilities(pictures).argmax(axis=1)
    confusion = np.zeros((len(classifier.styles),) * 2, dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    return float((predicted == labels).mean()), confusion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlora.demo.style", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CLASSIFIER_FILE, help="where to write the fitted classifier")
    parser.add_argument("--count", type=int, default=1000, help="renderings per style to fit on (default 1000)")
    parser.add_argument("--check", action="store_true", help="only report the shipped classifier's held-out accuracy")
    args = parser.parse_args(argv)
    if args.check:
        classifier = load_classifier(args.out)
    else:
        classifier = fit(*renderings(args.count, FIT_START))
        classifier.save(args.out)
        print(f"wrote {args.out}")
    for degrade in (False, True):
        share, confusion = accuracy(classifier, *renderings(200, TEST_START, degrade=degrade))
        print(
            f"held-out renderings ({'blurred and noised' if degrade else 'clean'}): {share:.1%} right; confusion (rows true, columns predicted {', '.join(STYLE_NAMES)}):"
        )
        print("\n".join("  " + " ".join(f"{n:4d}" for n in row) for row in confusion))
    return 0


if __name__ == "__main__":
    sys.exit(main())
