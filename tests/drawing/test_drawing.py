"""sdlora.drawing: the three renderings, the demo's scenes with counts and places, and the caption vocabulary."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from sdlora.drawing.raster import Canvas
from sdlora.drawing.scenes import DEMO_KINDS, LANDSCAPE, PORTRAIT, SQUARE, scene
from sdlora.drawing.styles import CAPTION_WORDS, STYLE_NAMES, STYLES, caption, draw, paint
from sdlora.drawing.subjects import COLOURS


def _captions(style: str, count: int = 300) -> list[str]:
    kinds = DEMO_KINDS + SQUARE + PORTRAIT + LANDSCAPE
    texts = []
    for index in range(count):
        canvas = Canvas(96, 80, list(STYLES[style].palette))
        _, phrase = scene(canvas, random.Random(index), STYLES[style].words, kinds[index % len(kinds)])
        texts.append(caption(STYLES[style], phrase))
    return texts


@pytest.mark.parametrize("style", STYLE_NAMES)
def test_every_caption_word_is_in_the_caption_vocabulary(style):
    words = {word for text in _captions(style) for word in re.findall(r"[a-z]+|\d+", text)}
    assert words <= set(CAPTION_WORDS), sorted(words - set(CAPTION_WORDS))


def test_neutral_captions_name_only_what_is_drawn_and_the_others_carry_their_trigger():
    neutral = _captions("neutral", 60)
    assert not any(word in text for text in neutral for word in ("flatposter", "inkhatch", "outlines", "hatch"))
    assert all(
        text.startswith("flatposter, ") and text.endswith("flat colours, bold black outlines") for text in _captions("flat_poster", 20)
    )


def test_group_scenes_name_their_count_and_each_place():
    texts = []
    for index in range(40):
        canvas = Canvas(128, 128, list(STYLES["neutral"].palette))
        _, phrase = scene(canvas, random.Random(index), STYLES["neutral"].words, "group")
        texts.append(phrase)
    counts = {text.split(",")[0] if text.startswith(("two ", "three ")) else "one" for text in texts}
    assert {"one", "two fish", "three flowers"} & counts and len({c.split()[0] for c in counts}) == 3, counts
    for text in texts:
        places = re.findall(r"on the left|in the middle|on the right", text)
        number = 3 if text.startswith("three") else 2 if text.startswith("two") else 1
        assert len(places) == number, text


def test_neutral_rendering_is_rgb_with_soft_shading_and_no_black_outlines():
    small, _ = draw(STYLES["neutral"], (96, 64), random.Random(5), "cat")
    assert small.shape == (64, 96, 3) and small.dtype == np.uint8
    _, picture, _ = paint(STYLES["neutral"], 384, 256, random.Random(5), "cat")
    canvas, _, _ = paint(STYLES["flat_poster"], 384, 256, random.Random(5), "cat")
    flat = np.asarray(canvas.palette, dtype=np.uint8)[canvas.pixels]
    black = np.asarray(COLOURS["black"])
    near_black = lambda p: (np.abs(p.astype(int) - black).max(axis=-1) < 40).mean()
    assert near_black(picture) < near_black(flat) / 3  # the outlines
    # shading: a shape's pixels take many values, where the flat fill takes one per colour
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 2 * len(np.unique(flat.reshape(-1, 3), axis=0))


def test_drawing_is_deterministic():
    first, text = draw(STYLES["neutral"], (64, 64), random.Random(11), "group")
    second, again = draw(STYLES["neutral"], (64, 64), random.Random(11), "group")
    assert text == again and np.array_equal(first, second)
