"""The form reader: an image in, every box cut, the cells sent in one batch through TF Serving's API, a
reading out. A client of the model server (`digits serve` or the TF Serving container), not a second model.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from forms import geometry, reading
from forms.layout import EMPTY_BLANK, Form
from serving.answers import Answer

Predict = Callable[[list[bytes]], list[Answer]]  # e.g. serving.client.RestClient(...).predict

MAX_IMAGE_BYTES = 40 * 1024 * 1024
MAX_PIXELS = 40_000_000  # a 300 dpi A3 scan is 17 MP; a phone photo 12-50 MP is downscaled by its app


class ReadError(ValueError):
    """An image that cannot be read as asked (not an image, too large, not a form, no boxes): one line."""


def decode(data: bytes) -> np.ndarray:
    """8-bit grayscale pixels of a PNG/JPEG/... file, turned upright by its EXIF orientation (phone photos)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise ReadError(f"{len(data) / 2**20:.0f} MiB; at most {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ReadError(f"{width}x{height} pixels; at most {MAX_PIXELS / 1e6:.0f} megapixels")
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        if isinstance(error, ReadError):
            raise
        raise ReadError(f"not an image ({type(error).__name__})") from None


@dataclass
class ReadSheet:
    reading: reading.SheetReading
    cells: dict[str, list[geometry.Cell]]
    turned: int  # how the sheet lay in the photo: 0, 90, 180 or 270 degrees clockwise

    def marks(self) -> list[tuple[np.ndarray, bool, bool]]:
        """(quad on the photo, for a person to look at, blank) of every box: what forms.marking draws."""
        review = self.reading.to_review()
        return [(cell.quad, index in review[count_id], cell.blank)
                for count_id, cells in self.cells.items() for index, cell in enumerate(cells)]


def _answers(predict: Predict, cells: list[geometry.Cell]) -> list[reading.CellReading]:
    """The inked cells' answers in one call (the client splits it into the server's batch size)."""
    from serving.client import ServerError

    inked = [cell for cell in cells if not cell.blank]
    answers = list(predict([geometry.encode(cell) for cell in inked])) if inked else []
    if len(answers) != len(inked):
        raise ServerError("BAD_ANSWER", f"{len(answers)} answers for {len(inked)} images")
    given = iter(answers)
    return [reading.CellReading(None if cell.blank else next(given)) for cell in cells]


def read_sheet(image: np.ndarray, form: Form, predict: Predict) -> ReadSheet:
    """Every count of a filled form, its checks and what a person should look at."""
    try:
        registered = geometry.register(image, form)
        cells = geometry.cut_cells(registered, form)
    except geometry.GeometryError as error:
        raise ReadError(str(error)) from None
    order = [(count.id, index) for count in form.counts for index in range(len(cells[count.id]))]
    readings = _answers(predict, [cells[count_id][index] for count_id, index in order])
    by_count: dict[str, list[reading.CellReading]] = {count.id: [] for count in form.counts}
    for (count_id, _), cell_reading in zip(order, readings):
        by_count[count_id].append(cell_reading)
    return ReadSheet(reading.read_sheet(form, by_count), cells, registered.rotation)


@dataclass
class ReadNumber:
    reading: reading.CountReading
    cells: list[geometry.Cell]
    turned: int = 0  # a row or a number is read as it lies

    def marks(self) -> list[tuple[np.ndarray, bool, bool]]:
        return [(cell.quad, index in self.reading.review_cells, cell.blank) for index, cell in enumerate(self.cells)]


def read_number(image: np.ndarray, predict: Predict, boxes: bool = True) -> ReadNumber:
    """A number on its own: a row of digit boxes, or (boxes=False) digits written freely."""
    try:
        cells = geometry.find_row(image) if boxes else geometry.split_number(image)
    except geometry.GeometryError as error:
        raise ReadError(str(error)) from None
    count = reading.read_count("number", "number", _answers(predict, cells), EMPTY_BLANK)
    return ReadNumber(count, cells)
