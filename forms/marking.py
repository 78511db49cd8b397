"""A sheet with its boxes outlined for the person who checks it: green accepted, red to look at, grey blank."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

ACCEPTED = (26, 127, 55)
REVIEW = (200, 30, 30)
BLANK = (150, 150, 150)


def marked_image(pixels: np.ndarray, boxes: Iterable[tuple[np.ndarray, bool, bool]], rotation: int = 0):
    """A PIL RGB image of `pixels` with each (quad, to_review, blank) outlined (red outlines are thicker), turned
    so that the sheet reads upright: `rotation` is how it lay in the photo (Registered.rotation). A person
    reading a doubted 6 on an upside-down sheet would read a 9."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    draw = ImageDraw.Draw(image)
    scale = max(1, round(max(image.size) / 600))
    for quad, review, blank in boxes:
        corners = [tuple(float(v) for v in corner) for corner in np.asarray(quad).reshape(4, 2)]
        colour, width = (REVIEW, 3 * scale) if review else (BLANK, scale) if blank else (ACCEPTED, 2 * scale)
        draw.line([*corners, corners[0]], fill=colour, width=width, joint="curve")
    return image.rotate(rotation, expand=True) if rotation % 360 else image
