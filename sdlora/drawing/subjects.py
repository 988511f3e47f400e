"""Simple subjects for make_datasets.py (house, tree, sun, mountains, fish, cat face, boat, flower), each with its caption phrase.

A subject is a list of `Part`s painted in order (later parts cover earlier ones) plus a phrase naming what was
drawn. Colours are names from `COLOURS`; the style decides how a colour shows (flat fill or ink hatching) and how
it is worded, through a `Words` object, so one subject builder serves both datasets.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .raster import Canvas, ellipse, polygon, polyline, rectangle, segment

# the limited poster palette; "black" is also the outline colour
COLOURS = {
    "black": (28, 26, 30),
    "white": (248, 246, 238),
    "cream": (244, 230, 196),
    "red": (212, 58, 48),
    "orange": (238, 136, 38),
    "yellow": (246, 202, 58),
    "pink": (236, 140, 162),
    "purple": (122, 76, 150),
    "light blue": (150, 200, 228),
    "blue": (46, 96, 172),
    "navy": (32, 46, 88),
    "teal": (36, 140, 140),
    "green": (78, 158, 84),
    "dark green": (36, 92, 56),
    "brown": (128, 82, 50),
}
BRIGHT = ("red", "orange", "yellow", "pink", "purple", "blue", "teal", "green")


@dataclass
class Part:
    """One shape: its pixels, its colour name, and whether it gets an outline."""

    mask: np.ndarray
    colour: str
    outline: bool = True
    background: bool = False  # sky, sea, ground: the ink style leaves the sky as bare paper


@dataclass
class Words:
    """How a style names things: `fill(colour)` gives the adjective for a shape, `background` a phrase or ''."""

    fill: Callable[[str], str]
    background: Callable[[str, str], str]  # (colour, noun) -> "blue sea" / "hatched sea" / "" (bare paper)


def pick_colour(rng: random.Random, choices: tuple[str, ...], *avoid: str) -> str:
    """One of `choices`, never one of `avoid` (a subject never takes its background's colour)."""
    return rng.choice([c for c in choices if c not in avoid])


def px(value: float) -> int:
    """A length or coordinate in whole pixels."""
    return int(round(value))


# ---------------------------------------------------------------- subjects: (parts, phrase)


def house(c: Canvas, rng: random.Random, w: Words, x: int, ground: int, width: int, avoid: tuple[str, ...] = ()) -> tuple[list[Part], str]:
    """A house standing on `ground`: walls, triangular roof, door and window."""
    height = px(width * rng.uniform(0.9, 1.2))
    top, eaves = ground - height, ground - px(height * 0.55)
    body, roof, door = (
        pick_colour(rng, BRIGHT + ("cream", "white"), *avoid),
        pick_colour(rng, BRIGHT, *avoid),
        pick_colour(rng, ("brown", "navy", "red", "teal")),
    )
    roof = roof if roof != body else pick_colour(rng, BRIGHT, body, *avoid)
    door = door if door != body else pick_colour(rng, ("brown", "navy", "red", "teal"), body)
    overhang, door_width = width // 10, width // 4
    door_left = x + width // 2 - door_width // 2 + rng.choice((-1, 1)) * width // 5
    window_left = x + width // 2 + (width // 8 if door_left < x + width // 2 - door_width // 2 else -width // 8 - width // 4)
    parts = [
        Part(rectangle(c, x, eaves, x + width, ground), body),
        Part(polygon(c, [(x - overhang, eaves), (x + width // 2, top), (x + width + overhang, eaves)]), roof),
        Part(rectangle(c, door_left, ground - px(height * 0.35), door_left + door_width, ground), door),
        Part(rectangle(c, window_left, eaves + height // 10, window_left + width // 4, eaves + height // 10 + width // 4), "light blue"),
    ]
    return parts, f"a {w.fill(body)} house with a {w.fill(roof)} triangular roof and a {w.fill(door)} door"


def tree(c: Canvas, rng: random.Random, w: Words, x: int, ground: int, width: int, avoid: tuple[str, ...] = ()) -> tuple[list[Part], str]:
    """A round tree (trunk and oval crown) or a pine (three stacked triangles) standing on `ground`."""
    height = min(px(width * rng.uniform(1.4, 1.9)), ground * 9 // 10)  # the crown stays inside the picture
    trunk = width // 5
    parts = [Part(rectangle(c, x + width // 2 - trunk // 2, ground - px(height * 0.45), x + width // 2 + trunk // 2, ground), "brown")]
    crown = pick_colour(rng, ("green", "dark green", "orange", "teal"), *avoid)
    if rng.random() < 0.5:
        parts.append(Part(ellipse(c, x + width // 2, ground - px(height * 0.65), width // 2, px(height * 0.33)), crown))
        return parts, f"a round {w.fill(crown)} tree"
    for tier in range(3):  # a pine: three stacked triangles, narrower towards the top
        base, tip, half = (
            ground - px(height * (0.3 + 0.2 * tier)),
            ground - px(height * (0.62 + 0.19 * tier)),
            px(width * (0.5 - 0.1 * tier)),
        )
        parts.append(Part(polygon(c, [(x + width // 2 - half, base), (x + width // 2, tip), (x + width // 2 + half, base)]), crown))
    return parts, f"a pointed {w.fill(crown)} pine tree"


def sun(c: Canvas, rng: random.Random, w: Words, cx: int, cy: int, radius: int, avoid: tuple[str, ...] = ()) -> tuple[list[Part], str]:
    """A disc, with rays half of the time."""
    colour = pick_colour(rng, ("yellow", "orange", "red", "white"), *avoid)
    rays = rng.random() < 0.5
    parts = []
    if rays:
        for k in range(8):
            angle = k * math.pi / 4 + 0.2
            inner, outer = radius * 1.25, radius * 1.7
            start = (cx + px(inner * math.cos(angle)), cy + px(inner * math.sin(angle)))
            end = (cx + px(outer * math.cos(angle)), cy + px(outer * math.sin(angle)))
            parts.append(Part(segment(c, start, end, max(3, radius // 6)), colour))
    parts.append(Part(ellipse(c, cx, cy, radius, radius), colour))
    return parts, f"a {w.fill(colour)} sun" + (" with rays" if rays else "")


def mountains(c: Canvas, rng: random.Random, w: Words, ground: int, avoid: tuple[str, ...] = ()) -> tuple[list[Part], str]:
    """Two or three triangular mountains on `ground` with snow caps."""
    colour = pick_colour(rng, ("purple", "blue", "navy", "teal", "brown"), *avoid)
    parts = []
    for _ in range(rng.randint(2, 3)):
        peak_x, half = rng.randint(0, c.width), rng.randint(c.width // 5, c.width // 3)
        peak_y = ground - rng.randint(c.height // 5, c.height // 3)
        parts.append(Part(polygon(c, [(peak_x - half, ground), (peak_x, peak_y), (peak_x + half, ground)]), colour))
        cap = (ground - peak_y) // 4  # a snow cap: the top quarter of the same triangle
        parts.append(
            Part(
                polygon(
                    c,
                    [
                        (peak_x - half * cap // (ground - peak_y), peak_y + cap),
                        (peak_x, peak_y),
                        (peak_x + half * cap // (ground - peak_y), peak_y + cap),
                    ],
                ),
                "white",
            )
        )
    return parts, f"{w.fill(colour)} mountains with {w.fill('white')} snowy peaks"


def fish(c: Canvas, rng: random.Random, w: Words, cx: int, cy: int, length: int, avoid: tuple[str, ...] = ()) -> tuple[list[Part], str]:
    """A fish facing left or right: oval body, tail and fin triangles, an eye."""
    body = pick_colour(rng, BRIGHT, *avoid)
    tail = pick_colour(rng, BRIGHT, body, *avoid)
    facing = rng.choice((-1, 1))  # -1: head to the left
    rx, ry = length // 2, px(length * rng.uniform(0.22, 0.32))
    back = cx - facing * rx
    parts = [
        Part(polygon(c, [(back + facing * rx // 4, cy), (back - facing * rx // 2, cy - ry), (back - facing * rx // 2, cy + ry)]), tail),
        Part(
            polygon(c, [(cx - facing * rx // 3, cy - ry + ry // 4), (cx, cy - ry - ry // 2), (cx + facing * rx // 3, cy - ry + ry // 4)]),
            tail,
        ),
        Part(ellipse(c, cx, cy, rx, ry), body),
        Part(ellipse(c, cx + facing * rx // 2, cy - ry // 4, max(3, ry // 4), max(3, ry // 4)), "white"),
        Part(ellipse(c, cx + facing * rx // 2, cy - ry // 4, max(1, ry // 9), max(1, ry // 9)), "black", outline=False),
    ]
    return parts, f"a {w.fill(body)} fish with a {w.fill(tail)} tail"


def cat_face(c: Canvas, rng: random.Random, w: Words, cx: int, cy: int, radius: int, avoid: tuple[str, ...] = ()) -> tuple[list[Part], str]:
    """A cat's face: oval head, triangular ears, eyes with slit pupils, nose, mouth and whiskers."""
    fur = pick_colour(rng, ("orange", "brown", "cream", "purple", "white", "yellow"), *avoid)
    eyes = pick_colour(rng, ("green", "yellow", "blue", "teal"), fur)
    ry = px(radius * 0.85)
    ear = [(-0.9, -0.2), (-0.7, -1.25), (-0.2, -0.75)]
    parts = [Part(polygon(c, [(cx + px(sx * ex * radius), cy + px(ey * radius)) for ex, ey in ear]), fur) for sx in (1, -1)]
    parts.append(Part(ellipse(c, cx, cy, radius, ry), fur))
    for sx in (-1, 1):
        ex = cx + sx * radius * 2 // 5
        parts.append(Part(ellipse(c, ex, cy - ry // 5, radius // 6, radius // 5), eyes))
        parts.append(Part(ellipse(c, ex, cy - ry // 5, max(1, radius // 20), radius // 6), "black", outline=False))
        for dy in (-1, 1):  # whiskers
            parts.append(
                Part(
                    segment(
                        c,
                        (cx + sx * radius // 4, cy + ry // 4 + dy * radius // 14),
                        (cx + sx * radius * 4 // 5, cy + ry // 4 + dy * radius // 5),
                        max(2, radius // 40),
                    ),
                    "black",
                    outline=False,
                )
            )
    nose = radius // 9
    parts.append(Part(polygon(c, [(cx - nose, cy + ry // 10), (cx + nose, cy + ry // 10), (cx, cy + ry // 10 + nose)]), "pink"))
    mouth = [(cx - radius // 6, cy + ry * 2 // 5), (cx, cy + ry // 10 + nose), (cx + radius // 6, cy + ry * 2 // 5)]
    parts.append(Part(polyline(c, mouth, max(2, radius // 40)), "black", outline=False))
    return parts, f"a {w.fill(fur)} cat face with {w.fill(eyes)} eyes"


def boat(
    c: Canvas, rng: random.Random, w: Words, cx: int, waterline: int, width: int, avoid: tuple[str, ...] = ()
) -> tuple[list[Part], str]:
    """A sailing boat: hull, mast and a triangular sail, floating at `waterline`."""
    hull = pick_colour(rng, ("red", "brown", "navy", "yellow", "teal"), *avoid)
    sail = pick_colour(rng, ("white", "cream", "orange", "pink", "red"), hull, *avoid)
    deck, mast_top = waterline - width // 6, waterline - width
    parts = [
        Part(segment(c, (cx, deck), (cx, mast_top), max(3, width // 40)), "brown"),
        Part(
            polygon(
                c,
                [
                    (cx + width // 30, mast_top + width // 20),
                    (cx + width // 30, deck - width // 12),
                    (cx + width * 2 // 5, deck - width // 12),
                ],
            ),
            sail,
        ),
        Part(
            polygon(
                c,
                [
                    (cx - width // 2, deck),
                    (cx + width // 2, deck),
                    (cx + width * 3 // 10, waterline + width // 12),
                    (cx - width * 3 // 10, waterline + width // 12),
                ],
            ),
            hull,
        ),
    ]
    return parts, f"a {w.fill(hull)} sailing boat with a {w.fill(sail)} triangular sail"


def flower(
    c: Canvas, rng: random.Random, w: Words, cx: int, cy: int, radius: int, ground: int, avoid: tuple[str, ...] = ()
) -> tuple[list[Part], str]:
    """A flower: round petals around a centre, on a stem with a leaf reaching down to `ground`."""
    petal = pick_colour(rng, ("red", "pink", "purple", "orange", "white", "yellow"), *avoid)
    centre = pick_colour(rng, ("yellow", "orange", "brown"), petal)
    count = rng.randint(5, 8)
    parts = [
        Part(segment(c, (cx, cy), (cx, ground), max(4, radius // 6)), "green"),
        Part(ellipse(c, cx + radius * 2 // 3, (cy + ground) // 2, radius // 2, radius // 5), "green"),
    ]
    for k in range(count):
        angle = 2 * math.pi * k / count
        petal_x, petal_y = cx + px(radius * 0.62 * math.cos(angle)), cy + px(radius * 0.62 * math.sin(angle))
        parts.append(Part(ellipse(c, petal_x, petal_y, radius * 2 // 5, radius * 2 // 5), petal))
    parts.append(Part(ellipse(c, cx, cy, radius * 2 // 5, radius * 2 // 5), centre))
    return parts, f"a {w.fill(petal)} flower with {count} round petals and a {w.fill(centre)} centre on a {w.fill('green')} stem"
