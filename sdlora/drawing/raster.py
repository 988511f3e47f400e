"""Integer-exact drawing with numpy for make_datasets.py: the same pixels on every machine and library version.

Pillow's ImageDraw has changed its ellipse and wide-line algorithms between releases, and floating-point edge
tests can flip a pixel between CPUs, so shapes are decided here with integer arithmetic only: a pixel belongs
to a shape when its centre does. Centres are (2x + 1, 2y + 1) in doubled coordinates and shape vertices are
even numbers there, so a centre never lies exactly on a vertex or a horizontal edge and there are no ties.
No anti-aliasing: hard edges suit both styles and keep the palette small (small PNGs).
"""

from __future__ import annotations

import numpy as np

Point = tuple[int, int]


class Canvas:
    """A picture as palette indices; `paint` lays a mask down in one colour, later paint covering earlier."""

    def __init__(self, width: int, height: int, palette: list[tuple[int, int, int]], background: int = 0):
        self.width, self.height, self.palette = width, height, palette
        self.pixels = np.full((height, width), background, dtype=np.uint8)

    def paint(self, mask: np.ndarray, colour: int) -> None:
        self.pixels[mask] = colour

    def centres(self, left: int, top: int, right: int, bottom: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
        """Rows, columns and doubled pixel-centre coordinates of a box clipped to the canvas (bounds inclusive)."""
        x0, x1 = max(0, left), min(self.width, right + 1)
        y0, y1 = max(0, top), min(self.height, bottom + 1)
        xs = 2 * np.arange(x0, max(x0, x1), dtype=np.int64)[None, :] + 1
        ys = 2 * np.arange(y0, max(y0, y1), dtype=np.int64)[:, None] + 1
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1)), xs, ys

    def empty(self) -> np.ndarray:
        return np.zeros((self.height, self.width), dtype=bool)


def rectangle(canvas: Canvas, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """Pixels with left <= x < right and top <= y < bottom."""
    mask = canvas.empty()
    mask[max(0, top) : max(0, bottom), max(0, left) : max(0, right)] = True
    return mask


def ellipse(canvas: Canvas, cx: int, cy: int, rx: int, ry: int) -> np.ndarray:
    """Pixels whose centre lies inside the axis-aligned ellipse of centre (cx, cy) and radii rx, ry."""
    mask = canvas.empty()
    rows, cols, xs, ys = canvas.centres(cx - rx, cy - ry, cx + rx, cy + ry)
    dx, dy = xs - 2 * cx, ys - 2 * cy
    mask[rows, cols] = dx * dx * (ry * ry) + dy * dy * (rx * rx) <= 4 * rx * rx * ry * ry
    return mask


def polygon(canvas: Canvas, points: list[Point]) -> np.ndarray:
    """Pixels whose centre is inside the polygon (even-odd rule), by exact integer edge crossings."""
    mask = canvas.empty()
    px = [2 * x for x, _ in points]
    py = [2 * y for _, y in points]
    rows, cols, xs, ys = canvas.centres(min(px) // 2, min(py) // 2, max(px) // 2, max(py) // 2)
    inside = np.zeros((ys.shape[0], xs.shape[1]), dtype=bool)
    for i in range(len(points)):
        x1, y1, x2, y2 = px[i], py[i], px[i - 1], py[i - 1]
        if y1 == y2:
            continue  # a horizontal edge is never crossed by a row of centres (odd y)
        spans = (ys > min(y1, y2)) & (ys < max(y1, y2))
        # the crossing is right of the centre: xs < x1 + (ys - y1) * (x2 - x1) / (y2 - y1), multiplied out by the sign
        if y2 > y1:
            right = (xs - x1) * (y2 - y1) < (ys - y1) * (x2 - x1)
        else:
            right = (xs - x1) * (y2 - y1) > (ys - y1) * (x2 - x1)
        inside ^= spans & right
    mask[rows, cols] = inside
    return mask


def segment(canvas: Canvas, start: Point, end: Point, width: int) -> np.ndarray:
    """A stroke of `width` pixels from start to end with round caps (distance of a centre to the segment <= width/2)."""
    mask = canvas.empty()
    (ax, ay), (bx, by) = start, end
    half = width // 2 + 1
    rows, cols, xs, ys = canvas.centres(min(ax, bx) - half, min(ay, by) - half, max(ax, bx) + half, max(ay, by) + half)
    dx, dy = 2 * (bx - ax), 2 * (by - ay)
    vx, vy = xs - 2 * ax, ys - 2 * ay
    along = vx * dx + vy * dy
    length2 = dx * dx + dy * dy
    cross = vx * dy - vy * dx
    # in doubled units the distance doubles too, so "distance <= width / 2" reads "doubled distance^2 <= width^2"
    near_start = vx * vx + vy * vy <= width * width
    near_end = (xs - 2 * bx) ** 2 + (ys - 2 * by) ** 2 <= width * width
    beside = (along > 0) & (along < length2) & (cross * cross <= width * width * length2)
    mask[rows, cols] = near_start | near_end | beside
    return mask


def polyline(canvas: Canvas, points: list[Point], width: int) -> np.ndarray:
    """Strokes joining consecutive points."""
    mask = canvas.empty()
    for start, end in zip(points, points[1:]):
        mask |= segment(canvas, start, end, width)
    return mask


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask grown by a disk of `radius` pixels (the canvas edge repeats outward, so borders get no stroke)."""
    if radius <= 0:
        return mask.copy()
    height, width = mask.shape
    padded = np.pad(mask, radius, mode="edge")
    grown = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:
                grown |= padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
    return grown


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask shrunk by a disk of `radius` pixels."""
    return ~dilate(~mask, radius)


def hatch(canvas: Canvas, direction: str, spacing: int, width: int, phase: int = 0) -> np.ndarray:
    """Parallel stripes over the whole canvas: '/' and '\\' diagonals, '-' horizontal or '|' vertical."""
    ys, xs = np.mgrid[0 : canvas.height, 0 : canvas.width].astype(np.int64)
    along = {"/": xs + ys, "\\": xs - ys, "-": ys, "|": xs}[direction]
    return (along + phase) % spacing < width
