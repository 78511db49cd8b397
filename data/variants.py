"""Digits as people really send them, made from MNIST digits: the robustness benchmark's corpus.

MNIST digits are white on black, fitted into a 20x20 box and centred by their centre of mass in
28x28. Photos, scans and canvas exports are not. Each variant here turns one MNIST digit (28x28
uint8, white ink on black) into the encoded image bytes a user would send, deterministically for
a given seed. benchmarks/robustness.py measures a model on every variant; the normalisation
tests reuse them as a corpus.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

CANVAS = 200  # a drawing canvas or a photo crop, in pixels


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _ink(digit: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(digit, dtype=np.uint8), mode="L")


def _on_canvas(digit: np.ndarray, rng: np.random.Generator, ink_height: int) -> Image.Image:
    """The digit's ink box scaled to `ink_height` pixels tall, pasted off centre on a black canvas."""
    rows, cols = np.nonzero(digit > 0)
    box = _ink(digit).crop((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    scale = ink_height / box.height
    box = box.resize((max(1, round(box.width * scale)), ink_height), Image.BILINEAR)
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    left = int(rng.integers(0, CANVAS - box.width + 1))
    top = int(rng.integers(0, CANVAS - box.height + 1))
    canvas.paste(box, (left, top))
    return canvas


def as_is(digit, rng) -> bytes:
    return _png(_ink(digit))


def inverted(digit, rng) -> bytes:
    """Dark ink on a light background, still 28x28."""
    return _png(_ink(255 - np.asarray(digit)))


def paper(digit, rng) -> bytes:
    """A phone photo of dark ink on white paper: 3x larger, uneven lighting, sensor noise, RGB."""
    big = np.asarray(_ink(digit).resize((84, 84), Image.BILINEAR), dtype=np.float64) / 255
    ys, xs = np.mgrid[0:84, 0:84] / 84
    light = 0.75 + 0.25 * (rng.uniform(0.5, 1) * xs + rng.uniform(0.5, 1) * (1 - ys)) / 2  # brighter to one corner
    page = light * 235 * (1 - 0.85 * big) + rng.normal(0, 6, big.shape)
    rgb = np.stack([page, page * 0.98, page * 0.94], axis=-1)  # slightly warm paper
    return _png(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB"))


def small_in_canvas(digit, rng) -> bytes:
    """About 10 px tall, somewhere on a 200x200 canvas."""
    return _png(_on_canvas(digit, rng, 10))


def large_in_canvas(digit, rng) -> bytes:
    """About 120 px tall, off centre on a 200x200 canvas."""
    return _png(_on_canvas(digit, rng, 120))


def thick(digit, rng) -> bytes:
    """Marker strokes: dilated."""
    return _png(_ink(digit).filter(ImageFilter.MaxFilter(3)))


def thin(digit, rng) -> bytes:
    """A fine pen: eroded at twice the size (eroding 28x28 directly would erase strokes)."""
    big = _ink(digit).resize((56, 56), Image.BILINEAR).filter(ImageFilter.MinFilter(3))
    return _png(big.resize((28, 28), Image.BILINEAR))


def rotated(digit, rng) -> bytes:
    """Up to 15 degrees either way."""
    return _png(_ink(digit).rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR))


def jpeg_30(digit, rng) -> bytes:
    return _jpeg(_ink(digit), quality=30)


def low_contrast(digit, rng) -> bytes:
    """Grey ink on grey: the whole range squeezed into 100..160."""
    return _png(_ink(100 + np.asarray(digit, dtype=np.float64) * 60 / 255))


def coloured(digit, rng) -> bytes:
    """Coloured ink on coloured paper (blue on yellow, or similar), RGB."""
    ink = np.asarray(digit, dtype=np.float64)[..., None] / 255
    paper_colour = np.array([235, 220, 140]) + rng.uniform(-15, 15, 3)
    ink_colour = np.array([40, 60, 170]) + rng.uniform(-20, 20, 3)
    rgb = paper_colour * (1 - ink) + ink_colour * ink
    return _png(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB"))


def transparent(digit, rng) -> bytes:
    """What an HTML canvas exports: black strokes, the background fully transparent (RGBA 0,0,0,0)."""
    alpha = np.asarray(digit, dtype=np.uint8)
    rgba = np.zeros((*alpha.shape, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    return _png(Image.fromarray(rgba, mode="RGBA"))


VARIANTS: dict[str, Callable[[np.ndarray, np.random.Generator], bytes]] = {
    "as is": as_is,
    "inverted": inverted,
    "paper photo": paper,
    "small in canvas": small_in_canvas,
    "large in canvas": large_in_canvas,
    "thick strokes": thick,
    "thin strokes": thin,
    "rotated <= 15 deg": rotated,
    "JPEG q30": jpeg_30,
    "low contrast": low_contrast,
    "coloured ink/paper": coloured,
    "transparent canvas": transparent,
}


def make_variant(name: str, digits: np.ndarray, seed: int = 0) -> list[bytes]:
    """Encoded images of one variant for a stack of MNIST digits [N, 28, 28], reproducible by seed."""
    transform = VARIANTS[name]
    rng = np.random.default_rng([seed, list(VARIANTS).index(name)])
    return [transform(digit, rng) for digit in digits]
