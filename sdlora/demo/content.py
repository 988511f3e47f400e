"""Whether a generated picture shows what its prompt names: held-out prompts with their true colours, and colour checks.

A held-out prompt is the caption of a procedural scene that pretraining never drew (scene indices from
`pretrain.HELD_OUT` on), so its truth is known from the scene's parts: the background's colour and the colour of the
largest subject part. A picture keeps the background when the palette colour nearest its border's median is the
named one, and the subject when at least `SUBJECT_SHARE` of its central pixels are nearest the subject's colour.
The ink_hatch style names no colours, so for it content is judged by layout: the correlation of coarse brightness
maps between the picture with and without the LoRA (same prompt, same seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ..drawing.raster import Canvas
from ..drawing.scenes import scene
from ..drawing.styles import STYLES, caption
from ..drawing.subjects import COLOURS
from .pretrain import HELD_OUT, scene_seed

SUBJECT_SHARE = 0.08
PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float32)
NAMES = list(COLOURS)
# single subjects on a plain background: what a colour check can judge (a scene's border is its background)
CHECKED_KINDS = ("cat", "fish", "flower")


@dataclass(frozen=True)
class HeldOutPrompt:
    text: str
    background: str  # the named background colour
    subject: str  # the colour of the largest subject part


def held_out_prompts(style: str, count: int, seed: int = 0) -> list[HeldOutPrompt]:
    """`count` captions in `style` of single-subject scenes pretraining never drew, with their true colours (known
    from the scene's parts even where the style does not name them)."""
    prompts = []
    for index in range(HELD_OUT, HELD_OUT + count):
        kind = CHECKED_KINDS[index % len(CHECKED_KINDS)]
        # a style words the scene its own way but draws the same parts in the same colours: their colours are the truth
        canvas = Canvas(64, 64, list(STYLES[style].palette))
        parts, phrase = scene(canvas, random.Random(scene_seed(seed, "neutral", index)), STYLES[style].words, kind)
        background = next(part.colour for part in parts if part.background)
        largest = max((part for part in parts if not part.background), key=lambda part: int(part.mask.sum()))
        prompts.append(HeldOutPrompt(caption(STYLES[style], phrase), background, largest.colour))
    return prompts


def nearest_colours(picture: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest palette colour of each pixel, [H, W]."""
    pixels = picture.astype(np.float32)[..., None, :]
    return np.argmin(((pixels - PALETTE) ** 2).sum(axis=-1), axis=-1)


def background_colour(picture: np.ndarray) -> str:
    """The palette colour nearest the median of the picture's 3-pixel border."""
    border = np.concatenate(
        [picture[:3].reshape(-1, 3), picture[-3:].reshape(-1, 3), picture[:, :3].reshape(-1, 3), picture[:, -3:].reshape(-1, 3)]
    )
    median = np.median(border.astype(np.float32), axis=0)
    return NAMES[int(np.argmin(((PALETTE - median) ** 2).sum(axis=-1)))]


def subject_share(picture: np.ndarray, colour: str) -> float:
    """Share of the central half (by side) of the picture nearest `colour`."""
    height, width = picture.shape[:2]
    centre = picture[height // 4 : height - height // 4, width // 4 : width - width // 4]
    return float((nearest_colours(centre) == NAMES.index(colour)).mean())


def keeps_colours(picture: np.ndarray, prompt: HeldOutPrompt) -> tuple[bool, bool]:
    """(background as named, subject colour present)."""
    return background_colour(picture) == prompt.background, subject_share(picture, prompt.subject) >= SUBJECT_SHARE


def layout_correlation(first: np.ndarray, second: np.ndarray, cells: int = 16) -> float:
    """Pearson correlation of the two pictures' brightness averaged over cells x cells blocks."""

    def coarse(picture: np.ndarray) -> np.ndarray:
        luma = picture.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
        height, width = luma.shape
        return (
            luma[: height // cells * cells, : width // cells * cells]
            .reshape(cells, height // cells, cells, width // cells)
            .mean(axis=(1, 3))
            .ravel()
        )

    a, b = coarse(first), coarse(second)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])
