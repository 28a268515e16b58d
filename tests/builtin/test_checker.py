"""The checker reads drawn images of known content correctly."""

from __future__ import annotations

import numpy as np
import pytest

from worker.builtin import checker, data

ALL_PAIRS = [(c, s) for c in data.COLOURS for s in data.SHAPES]


def expected(scene: data.Scene) -> tuple[str, ...]:
    return (scene.colour, scene.background, scene.shape, scene.position, scene.size)


def got(j: checker.Judgement) -> tuple[str | None, ...]:
    return (j.shape_colour, j.background_colour, j.shape, j.position, j.size)


def test_reads_every_combination_at_its_anchor() -> None:
    for colour, shape in ALL_PAIRS:
        for background in data.COLOURS:
            if background == colour:
                continue
            for size in data.SIZES:
                for position in data.POSITIONS:
                    scene = data.place(colour, shape, background, size, position)
                    assert got(checker.judge(data.render(scene))) == expected(scene), scene


def test_reads_jittered_random_scenes() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        scene = data.random_scene(rng, ALL_PAIRS)
        assert got(checker.judge(data.render(scene))) == expected(scene), scene


def test_the_brief_example_red_circle_on_blue() -> None:
    j = checker.judge(data.render(data.place("red", "circle", "blue", "large", "centre")))
    assert (j.shape_colour, j.shape, j.background_colour) == ("red", "circle", "blue")
    assert j.shape_score > 0.9


def test_tolerates_noise_and_other_resolutions() -> None:
    rng = np.random.default_rng(3)
    scene = data.place("yellow", "triangle", "black", "large", "left")
    noisy = data.render(scene).astype(np.int16) + rng.normal(0, 12, (64, 64, 3)).astype(np.int16)
    assert got(checker.judge(np.clip(noisy, 0, 255).astype(np.uint8))) == expected(scene)
    big = data.render(scene, size=64).repeat(2, axis=0).repeat(2, axis=1)
    assert got(checker.judge(big)) == expected(scene)


def test_plain_image_has_no_shape() -> None:
    plain = np.full((64, 64, 3), data.COLOURS["green"], dtype=np.uint8)
    j = checker.judge(plain)
    assert j.background_colour == "green"
    assert j.shape is None and j.shape_colour is None and j.position is None


def test_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        checker.judge(np.zeros((64, 64), dtype=np.uint8))
