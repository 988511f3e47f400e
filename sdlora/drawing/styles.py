"""The three ways a scene is painted, and how each words it: `flat_poster` and `ink_hatch` (the example LoRA
datasets) and `neutral` (the demo base model's own rendering, which neither of the other two looks like).

A style paints a scene's `Part`s (subjects.py, scenes.py) onto a canvas and words its colours through a `Words`
object. `flat_poster` and `ink_hatch` paint palette indices with integer-exact drawing, so `datasets_examples/`
rebuilds to the same pixels everywhere. `neutral` paints RGB with soft shading (light from the top left, skies and
grounds in gentle gradients) and no outlines. `draw` renders any style at a multiple of the wanted size and resizes
it down the way sdlora's training data loader does, so a 64-pixel picture has smooth edges.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .raster import Canvas, dilate, erode, hatch
from .scenes import scene
from .subjects import COLOURS, Part, Words

PAPER, INK = (243, 235, 215), (30, 28, 34)
STYLE_NAMES = ("neutral", "flat_poster", "ink_hatch")
# every word a caption of any style can hold (tests/drawing checks it): the demo model's tokenizer learns one token for each
CAPTION_WORDS = tuple(
    """5 6 7 8 a an and background black blue boat bold brown bubbles cat centre colours cream cross dark door drawing eyes face
    faces fish flat flatposter flower flowers front grass green hatched hatching house in ink inkhatch left light line middle
    mountains navy of on orange outlines paper peaks petals pine pink pointed purple rays red right roof round sail sailing sea
    sky snowy solid stem sun tail teal the three tree triangular two under water waves white with yellow zigzag""".split()
)


@dataclass(frozen=True)
class Style:
    """One rendering: name, trigger word, dataset seed, caption ending, how colours are worded and how parts are painted.

    `render(canvas, parts)` paints palette indices into `canvas` (the palette styles) or returns the RGB picture
    (`neutral`, whose shading needs more colours than a palette holds).
    """

    name: str
    trigger: str
    seed: int
    suffix: str
    words: Words
    render: Callable[[Canvas, list[Part]], np.ndarray | None]
    palette: tuple[tuple[int, int, int], ...]


def _tone(colour: str) -> int:
    """0 light (bare paper), 1 hatched, 2 cross-hatched, 3 solid ink: from the colour's luma, in integers."""
    r, g, b = COLOURS[colour]
    luma = (299 * r + 587 * g + 114 * b) // 1000
    return 0 if luma >= 200 else 1 if luma >= 120 else 2 if luma >= 50 else 3


def _render_poster(canvas: Canvas, parts: list[Part]) -> None:
    names = list(COLOURS)
    stroke = max(3, min(canvas.width, canvas.height) // 90)
    for part in parts:
        if part.outline:
            canvas.paint(dilate(part.mask, stroke), names.index("black"))
        canvas.paint(part.mask, names.index(part.colour))


def _render_ink(canvas: Canvas, parts: list[Part]) -> None:
    stroke = max(1, min(canvas.width, canvas.height) // 200)
    spacing = max(5, min(canvas.width, canvas.height) // 64)
    for number, part in enumerate(parts):
        if part.background and not part.outline:
            continue  # the sky or a plain backdrop is the bare paper
        tone = _tone(part.colour)
        if not part.outline:  # strokes and dots: pupils, whiskers, waves cut into hatching
            canvas.paint(part.mask, 1 if tone == 3 else 0)
            continue
        canvas.paint(part.mask, 0)  # paper first: a shape hides what it covers
        if part.background:
            shading = hatch(canvas, "-", spacing + 3, 1)
        elif tone == 1:
            shading = hatch(canvas, ("/", "\\", "|")[number % 3], spacing, 1, phase=number)
        elif tone == 2:
            shading = hatch(canvas, "/", spacing - 1, 1, phase=number) | hatch(canvas, "\\", spacing - 1, 1, phase=number)
        else:
            shading = np.full(part.mask.shape, tone == 3)
        canvas.paint(part.mask & shading, 1)
        canvas.paint(part.mask & ~erode(part.mask, stroke), 1)


def _render_neutral(canvas: Canvas, parts: list[Part]) -> np.ndarray:
    """Soft shading, no outlines: each shape lit from its top left, backgrounds in a gentle top-to-bottom gradient."""
    ys, xs = np.mgrid[0 : canvas.height, 0 : canvas.width].astype(np.float32)
    picture = np.zeros((canvas.height, canvas.width, 3), dtype=np.float32)
    for part in parts:
        if not part.mask.any():
            continue
        colour = np.asarray(COLOURS[part.colour], dtype=np.float32)
        if part.background:
            shade = 1.06 - 0.12 * ys[part.mask] / canvas.height
        elif part.outline:  # a shape (strokes and dots stay flat)
            rows, cols = np.nonzero(part.mask)
            u = (xs[part.mask] - cols.min()) / max(1, cols.max() - cols.min())
            v = (ys[part.mask] - rows.min()) / max(1, rows.max() - rows.min())
            shade = 1.16 - 0.32 * (0.4 * u + 0.6 * v)
        else:
            shade = np.ones(int(part.mask.sum()), dtype=np.float32)
        # shading towards white for light tones and towards black for dark ones keeps every colour recognisable
        picture[part.mask] = np.clip(colour[None, :] * shade[:, None] + 10.0 * (shade[:, None] - 1.0), 0, 255)
    return np.rint(picture).astype(np.uint8)


def _ink_fill(colour: str) -> str:
    return ("", "hatched", "cross-hatched", "solid black")[_tone(colour)]


def _ink_background(colour: str, noun: str) -> str:
    return "" if noun in ("sky", "background", "water") else f"hatched {noun}"


COLOUR_WORDS = Words(lambda c: c, lambda c, noun: f"{c} {noun}")
STYLES = {
    "flat_poster": Style(
        "flat_poster", "flatposter", 1, "flat colours, bold black outlines", COLOUR_WORDS, _render_poster, tuple(COLOURS.values())
    ),
    "ink_hatch": Style(
        "ink_hatch",
        "inkhatch",
        2,
        "black ink line drawing, cross-hatching, cream paper",
        Words(_ink_fill, _ink_background),
        _render_ink,
        (PAPER, INK),
    ),
    # the base model's pictures: captions name what is drawn and nothing else (no trigger, no style words)
    "neutral": Style("neutral", "", 3, "", COLOUR_WORDS, _render_neutral, tuple(COLOURS.values())),
}


def caption(style: Style, phrase: str) -> str:
    """The caption of a scene phrase in a style: trigger, phrase, style words (the neutral style: the phrase alone)."""
    text = ", ".join(part for part in (style.trigger, phrase, style.suffix) if part)
    text = re.sub(r"\s+", " ", text).replace(" ,", ",")
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def paint(style: Style, width: int, height: int, rng: random.Random, kind: str) -> tuple[Canvas, np.ndarray | None, str]:
    """(canvas, RGB picture or None for the palette styles, phrase) of one scene of `kind` at full size."""
    canvas = Canvas(width, height, list(style.palette))
    parts, phrase = scene(canvas, rng, style.words, kind)
    return canvas, style.render(canvas, parts), phrase


def draw(style: Style, size: tuple[int, int], rng: random.Random, kind: str, supersample: int = 4) -> tuple[np.ndarray, str]:
    """(RGB uint8 picture of `size` = (width, height), caption) of one scene, drawn `supersample` times larger and
    resized down with Lanczos, as sdlora's data loader resizes training images."""
    width, height = size
    canvas, rgb, phrase = paint(style, width * supersample, height * supersample, rng, kind)
    if rgb is None:
        rgb = np.asarray(canvas.palette, dtype=np.uint8)[canvas.pixels]
    picture = Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(picture), caption(style, phrase)
