"""Scenes for make_datasets.py: a background, a few subjects from subjects.py, and one caption phrase for all of it."""

from __future__ import annotations

import random

from .raster import Canvas, ellipse, polyline, rectangle
from .subjects import Part, Words, boat, cat_face, fish, flower, house, mountains, pick_colour, px, sun, tree


def _backdrop(c: Canvas, colour: str) -> Part:
    return Part(rectangle(c, 0, 0, c.width, c.height), colour, outline=False, background=True)


def _band(c: Canvas, top: int, colour: str) -> Part:
    return Part(rectangle(c, 0, top, c.width, c.height), colour, background=True)


def _join(items: list[str]) -> str:
    items = [item for item in items if item]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def countryside(c: Canvas, rng: random.Random, w: Words) -> tuple[list[Part], str]:
    """Sky, maybe a sun and mountains, grass, and a house and/or trees standing on it."""
    sky, grass = pick_colour(rng, ("light blue", "cream", "pink", "yellow")), pick_colour(rng, ("green", "dark green", "yellow", "teal"))
    ground = px(c.height * rng.uniform(0.68, 0.8))
    parts, behind = [_backdrop(c, sky)], []
    if rng.random() < 0.7:
        sun_parts, sun_phrase = sun(
            c, rng, w, px(c.width * rng.choice((0.2, 0.8))), px(c.height * 0.17), min(c.width, c.height) // 10, (sky,)
        )
        parts += sun_parts
        behind.append(f"under {sun_phrase}")
    if c.width >= c.height and rng.random() < 0.6:
        mountain_parts, mountain_phrase = mountains(c, rng, w, ground, (sky, grass))
        parts += mountain_parts
        behind.insert(0, f"in front of {mountain_phrase}")
    parts.append(_band(c, ground, grass))
    subjects = []
    if c.width > c.height or rng.random() < 0.6:
        width = px(c.width * rng.uniform(0.3, 0.38))
        house_parts, phrase = house(c, rng, w, px(c.width * rng.uniform(0.08, 0.2)), ground + c.height // 20, width, (sky, grass))
        parts += house_parts
        subjects.append(phrase)
    # beside a house: one tree, or two in a landscape picture; without a house: one big tree in the middle
    for centre in (0.62, 0.82)[: 2 if subjects and c.width > c.height else 1]:
        width = px(c.width * (0.22 if subjects else 0.5))
        left = px(c.width * centre) - width // 2 if subjects else (c.width - width) // 2
        tree_parts, phrase = tree(c, rng, w, left, ground + c.height // 14, width, (sky, grass))
        parts += tree_parts
        subjects.append(phrase)
    grass_words = w.background(grass, "grass")
    phrase = _join(subjects) + (f" on {grass_words}" if grass_words else "") + ("" if not behind else " " + " ".join(behind))
    return parts, _with_background(phrase, w.background(sky, "sky"))


def seaside(c: Canvas, rng: random.Random, w: Words) -> tuple[list[Part], str]:
    """A sailing boat on a sea with wave strokes, maybe a sun."""
    sky, sea = pick_colour(rng, ("light blue", "cream", "pink", "yellow")), pick_colour(rng, ("blue", "navy", "teal"))
    horizon = px(c.height * rng.uniform(0.58, 0.7))
    parts = [_backdrop(c, sky)]
    phrase_tail = ""
    if rng.random() < 0.7:
        sun_parts, sun_phrase = sun(
            c, rng, w, px(c.width * rng.choice((0.2, 0.78))), px(c.height * 0.2), min(c.width, c.height) // 11, (sky,)
        )
        parts += sun_parts
        phrase_tail = f" under {sun_phrase}"
    parts.append(_band(c, horizon, sea))
    width = px(min(c.width, c.height) * rng.uniform(0.42, 0.55))
    boat_parts, boat_phrase = boat(c, rng, w, px(c.width * rng.uniform(0.4, 0.6)), horizon + (c.height - horizon) // 3, width, (sky, sea))
    parts += boat_parts
    for row in range(3):  # zigzag wave strokes across the sea, below the hull
        y = horizon + (c.height - horizon) * (row + 2) // 5
        step = c.width // 12
        points = [(x, y - (step // 3 if (x // step) % 2 else 0)) for x in range(-step + (row * step) // 2, c.width + step, step)]
        parts.append(Part(polyline(c, points, max(2, c.width // 120)), "white", outline=False))
    sea_words = w.background(sea, "sea")
    phrase = boat_phrase + f" on {'a ' + sea_words if sea_words else 'the sea'} with {w.fill('white')} zigzag waves" + phrase_tail
    return parts, _with_background(phrase, w.background(sky, "sky"))


def single_subject(c: Canvas, rng: random.Random, w: Words, subject: str) -> tuple[list[Part], str]:
    """One large subject (cat face, flower or fish) on a plain background."""
    background = pick_colour(rng, ("teal", "light blue", "cream", "pink", "yellow", "navy"))
    parts = [_backdrop(c, background)]
    size = min(c.width, c.height)
    if subject == "cat":
        subject_parts, phrase = cat_face(c, rng, w, c.width // 2, px(c.height * 0.55), px(size * 0.33), (background,))
    elif subject == "flower":
        subject_parts, phrase = flower(c, rng, w, c.width // 2, px(c.height * 0.36), px(size * 0.3), c.height, (background,))
    else:
        subject_parts, phrase = fish(c, rng, w, c.width // 2, c.height // 2, px(min(c.width * 0.55, c.height * 1.1)), (background,))
    words = w.background(background, "background")
    return parts + subject_parts, phrase + (f" on a {words}" if words else "")


def underwater(c: Canvas, rng: random.Random, w: Words) -> tuple[list[Part], str]:
    """Two or three fish among bubbles."""
    water = pick_colour(rng, ("blue", "navy", "teal", "light blue"))
    parts, phrases = [_backdrop(c, water)], []
    count = rng.randint(2, 3)
    for k in range(count):
        length = px(min(c.width, c.height) * rng.uniform(0.3, 0.42))
        cx = px(c.width * (k + 0.5) / count + rng.randint(-c.width // 20, c.width // 20))
        cx = min(max(cx, length * 4 // 5), c.width - length * 4 // 5)  # head and tail inside the picture
        cy = px(c.height * rng.uniform(0.25, 0.75))
        fish_parts, phrase = fish(c, rng, w, cx, cy, length, (water,))
        parts += fish_parts
        phrases.append(phrase)
    for _ in range(rng.randint(4, 7)):
        radius = rng.randint(min(c.width, c.height) // 60, min(c.width, c.height) // 30)
        parts.append(Part(ellipse(c, rng.randint(0, c.width), rng.randint(0, c.height), radius, radius), "white"))
    water_words = w.background(water, "water")
    number = {2: "two", 3: "three"}[count]
    where = f" in {water_words}" if water_words else ""
    return parts, f"{number} fish, {_join(phrases)},{where} with {w.fill('white')} round bubbles"


def _with_background(phrase: str, sky_words: str) -> str:
    return phrase + (f", {sky_words}" if sky_words else "")


POSITIONS = (("on the left", 0.27), ("in the middle", 0.5), ("on the right", 0.73))
NUMBERS = {2: "two", 3: "three"}


def group(c: Canvas, rng: random.Random, w: Words) -> tuple[list[Part], str]:
    """One to three fish, cat faces or flowers side by side on a plain background, each named with its place."""
    background = pick_colour(rng, ("teal", "light blue", "cream", "pink", "yellow", "navy"))
    subject = rng.choice(("fish", "cat", "flower"))
    count = rng.choice((1, 2, 2, 3))
    if count == 3:
        places = [("on the left", 0.2), ("in the middle", 0.5), ("on the right", 0.8)]
    elif count == 2:
        places = [POSITIONS[0], POSITIONS[2]]
    else:
        places = [rng.choice(POSITIONS)]
    parts, phrases = [_backdrop(c, background)], []
    size = min(c.width, c.height)
    for where, at in places:
        cx = px(c.width * at)
        if subject == "cat":
            radius = px(size * (0.17 if count > 1 else 0.26))
            subject_parts, phrase = cat_face(c, rng, w, cx, px(c.height * rng.uniform(0.5, 0.6)), radius, (background,))
        elif subject == "flower":
            radius = px(size * (0.14 if count > 1 else 0.22))
            subject_parts, phrase = flower(c, rng, w, cx, px(c.height * rng.uniform(0.3, 0.45)), radius, c.height, (background,))
        else:
            length = px(size * (0.26 if count > 1 else 0.4))
            subject_parts, phrase = fish(c, rng, w, cx, px(c.height * rng.uniform(0.35, 0.65)), length, (background,))
        parts += subject_parts
        phrases.append(f"{phrase} {where}")
    words = w.background(background, "background")
    plural = {"fish": "fish", "cat": "cat faces", "flower": "flowers"}[subject]
    head = "" if count == 1 else f"{NUMBERS[count]} {plural}, "
    return parts, head + _join(phrases) + (f", on a {words}" if words else "")


SQUARE = ("countryside", "seaside", "cat", "underwater", "flower", "countryside", "fish")
PORTRAIT = ("flower", "cat", "countryside")
LANDSCAPE = ("seaside", "countryside", "underwater")
# the demo base model's pretraining pictures (square): every scene kind, and groups (counts and places) as often as the rest together
DEMO_KINDS = ("countryside", "seaside", "cat", "underwater", "flower", "fish") + ("group",) * 6


def scene(c: Canvas, rng: random.Random, w: Words, kind: str) -> tuple[list[Part], str]:
    """The parts and caption phrase of one scene of `kind` (see SQUARE, PORTRAIT, LANDSCAPE)."""
    if kind == "countryside":
        return countryside(c, rng, w)
    if kind == "seaside":
        return seaside(c, rng, w)
    if kind == "underwater":
        return underwater(c, rng, w)
    if kind == "group":
        return group(c, rng, w)
    return single_subject(c, rng, w, kind)
