"""Procedural training data for the built-in model: one flat shape on a flat background, with a caption.

Everything is drawn with numpy from a seeded generator, so a training run needs no files and no network.
Edges are anti-aliased by 4x4 supersampling, which keeps them smooth enough for a x4 autoencoder to rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

# Six well separated colours; the checker classifies pixels by the nearest of these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("centre", "left", "right", "top", "bottom")

# Shape "radius" in pixels per size; squares and triangles are scaled from it to similar areas.
RADIUS = {"small": 7.0, "large": 12.0}
OFFSET = 14.0  # distance of the left/right/top/bottom anchors from the image centre
ANCHORS = {
    "centre": (32.0, 32.0),
    "left": (32.0 - OFFSET, 32.0),
    "right": (32.0 + OFFSET, 32.0),
    "top": (32.0, 32.0 - OFFSET),
    "bottom": (32.0, 32.0 + OFFSET),
}
JITTER = 1.5  # uniform jitter of the shape centre, pixels

# Colour-shape pairs never drawn in training, to test that the text conditioning composes.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "circle"), ("blue", "square"))

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """What one image shows; `x`, `y` are the shape's centre (triangle: its centroid) in pixels."""

    colour: str
    shape: str
    background: str
    size: str
    position: str
    x: float = 32.0
    y: float = 32.0


def coverage(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float32 (size, size)."""
    s = _SUPERSAMPLE
    grid = (np.arange(size * s, dtype=np.float32) + 0.5) / s
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    dx, dy = xs - scene.x, ys - scene.y
    r = RADIUS[scene.size]
    if scene.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif scene.shape == "square":
        h = r * 0.85
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif scene.shape == "triangle":
        # Equilateral, apex up, centroid at (x, y), circumradius R.
        big_r = r * 1.2
        half_base = big_r * np.sqrt(3.0) / 2.0
        base_y = big_r / 2.0
        # inside: below the two slanted edges and above the base (y grows downward)
        slope_y = -big_r + (np.abs(dx) / half_base) * (1.5 * big_r)
        inside = (dy <= base_y) & (dy >= slope_y)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return inside.reshape(size, s, size, s).mean(axis=(1, 3)).astype(np.float32)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 image (size, size, 3) of the scene."""
    cov = coverage(scene, size)[..., None]
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    bg = np.asarray(COLOURS[scene.background], dtype=np.float32)
    img = bg * (1.0 - cov) + fg * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def training_pairs() -> list[tuple[str, str]]:
    """The (colour, shape) pairs that training may draw."""
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]


def random_scene(rng: np.random.Generator, pairs: list[tuple[str, str]] | None = None) -> Scene:
    pairs = pairs if pairs is not None else training_pairs()
    colour, shape = pairs[rng.integers(len(pairs))]
    backgrounds = [c for c in COLOURS if c != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    ax, ay = ANCHORS[position]
    jx, jy = rng.uniform(-JITTER, JITTER, size=2)
    return Scene(colour, shape, background, size, position, float(ax + jx), float(ay + jy))


def place(colour: str, shape: str, background: str, size: str, position: str) -> Scene:
    """A scene at its anchor, no jitter."""
    ax, ay = ANCHORS[position]
    return Scene(colour, shape, background, size, position, ax, ay)


# ---------------------------------------------------------------- captions

_SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big")}
_POSITION_PHRASES = {
    "centre": ("in the centre", "in the center", "in the middle", "at the centre"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
}
_BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "with a {} background", "on {}")


def canonical_caption(scene: Scene) -> str:
    """The caption form the evaluation uses: 'a small red circle at the top on a blue background'."""
    position = _POSITION_PHRASES[scene.position][0]
    return f"a {scene.size} {scene.colour} {scene.shape} {position} on a {scene.background} background"


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of many phrasings; size, position and background words are each sometimes left out."""

    def pick(options: tuple[str, ...]) -> str:
        return options[rng.integers(len(options))]

    words = ["a"]
    if rng.random() < 0.75:
        words.append(pick(_SIZE_WORDS[scene.size]))
    words += [scene.colour, scene.shape]
    subject = " ".join(words)
    position = pick(_POSITION_PHRASES[scene.position]) if rng.random() < 0.8 else ""
    with_background = rng.random() < 0.9
    order = rng.integers(4)
    if not with_background:
        parts = [subject, position]
    elif order == 0:
        parts = [subject, position, pick(_BACKGROUND_PHRASES).format(scene.background)]
    elif order == 1:
        parts = [subject, pick(_BACKGROUND_PHRASES).format(scene.background), position]
    elif order == 2:
        parts = [f"a {scene.background} background with", subject, position]
    else:
        parts = [f"on a {scene.background} background,", subject, position]
    return " ".join(p for p in parts if p)


def caption_words() -> list[str]:
    """Every word the caption grammar can produce (the tokenizer gives each one token)."""
    words = {"a", ",", "background", "with", "image", "picture", "of", "the", "an"}
    words.update(COLOURS, SHAPES, {"center", "middle"})
    for options in _SIZE_WORDS.values():
        words.update(options)
    for phrases in _POSITION_PHRASES.values():
        for phrase in phrases:
            words.update(phrase.split())
    for phrase in _BACKGROUND_PHRASES:
        words.update(w for w in phrase.replace("{}", "").split())
    return sorted(words)


def batch(
    rng: np.random.Generator, n: int, pairs: list[tuple[str, str]] | None = None
) -> tuple[np.ndarray, list[Scene]]:
    """n random training scenes and their images, uint8 (n, 64, 64, 3)."""
    scenes = [random_scene(rng, pairs) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes
