"""Judges a generated image from its pixels alone: which colours, which shape, where.

    from worker.builtin.checker import judge
    j = judge(rgb)                   # rgb: numpy uint8 array (H, W, 3); the built-in model makes 64x64
    j.shape_colour, j.background_colour, j.shape, j.position, j.size

Colour names are those of `worker.builtin.data.COLOURS` (red, green, blue, yellow, white, black); shapes
are circle, square, triangle; positions centre, left, right, top, bottom; sizes small, large. A field is
None when the image does not show the thing (for instance no shape at all: `shape is None`).

How: the background is the median colour of the one-pixel border; shape pixels are those clearly away
from it; the shape's colour is their median. The class is the best intersection-over-union against a
circle, a square and an apex-up triangle of the same area centred on the same centroid, and the
position is the centroid's nearest anchor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.builtin import data

_NAMES = list(data.COLOURS)
_PALETTE = np.array([data.COLOURS[n] for n in _NAMES], dtype=np.float32)
# Drawn area of each shape class at each size, in pixels: the size threshold sits between them.
_AREAS = {
    (shape, size): float(data.coverage(data.place("red", shape, "blue", size, "centre")).sum())
    for shape in data.SHAPES
    for size in data.SIZES
}


@dataclass(frozen=True)
class Judgement:
    shape_colour: str | None
    background_colour: str | None
    shape: str | None
    position: str | None
    size: str | None
    shape_score: float = 0.0  # IoU of the best template; low means "not clearly any shape"
    area: float = 0.0  # shape pixels, in 64x64 pixel units


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette name nearest (Euclidean RGB) to one colour."""
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(1)
    return _NAMES[int(d.argmin())]


def _template(shape: str, h: int, w: int, cx: float, cy: float, area: float) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        r = np.sqrt(area / np.pi)
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = np.sqrt(area) / 2
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # equilateral, apex up, centroid at (cx, cy): area = (3 sqrt 3 / 4) R^2
    big_r = np.sqrt(area / (3 * np.sqrt(3) / 4))
    half_base = big_r * np.sqrt(3) / 2
    return (dy <= big_r / 2) & (dy >= -big_r + np.abs(dx) / half_base * 1.5 * big_r)


def judge(image: np.ndarray) -> Judgement:
    """Reads one RGB uint8 image (H, W, 3) and says what it shows."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    img = img[..., :3].astype(np.float32)
    h, w, _ = img.shape
    scale = (data.IMAGE_SIZE / w) * (data.IMAGE_SIZE / h)  # areas in 64x64 units
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb)
    dist_bg = np.sqrt(((img - bg_rgb) ** 2).sum(-1))
    candidate = dist_bg > 60.0
    if candidate.sum() * scale < 12:
        return Judgement(None, background, None, None, None)
    fg_rgb = np.median(img[candidate], axis=0)
    shape_colour = nearest_colour(fg_rgb)
    # A pixel is shape if it is nearer the shape's colour than the background's (anti-aliased edges split).
    dist_fg = np.sqrt(((img - fg_rgb) ** 2).sum(-1))
    mask = dist_fg < dist_bg
    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    best, best_iou = data.SHAPES[0], -1.0
    for shape in data.SHAPES:
        t = _template(shape, h, w, cx, cy, area)
        iou = float((t & mask).sum() / max(1, (t | mask).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    # Position: the nearest anchor, in 64-pixel units.
    px, py = cx * data.IMAGE_SIZE / w, cy * data.IMAGE_SIZE / h
    position = min(
        data.ANCHORS, key=lambda p: (data.ANCHORS[p][0] - px) ** 2 + (data.ANCHORS[p][1] - py) ** 2
    )
    threshold = np.sqrt(_AREAS[(best, "small")] * _AREAS[(best, "large")])
    size = "small" if area * scale < threshold else "large"
    return Judgement(shape_colour, background, best, position, size, best_iou, area * scale)
