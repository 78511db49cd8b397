"""POST /api/read-sheet's reading of a tally-form photo: what `digits read --form FORM --json --marked` does
(forms/ reads; the cells go to the model server through the web app's client), as one JSON answer.

Imported only when the app starts: an app installed without the forms package or OpenCV answers the
endpoint with 501 and serves everything else. A sheet that is not accepted is kept for a person
(web/sheet_queue.py) with what `Sheet` carries besides the answer.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forms import layout, reader
from forms.marking import marked_image
from forms.reading import SheetReading
from monitoring import names as n
from serving.config import BatchingConfig

# Cells per request to the model server: TF Serving with batching on refuses more than its
# max_batch_size in one request (docker/batching_parameters.txt), `digits serve` the same.
BATCH_SIZE = BatchingConfig.max_batch_size
# The marked sheet in the answer: a phone photo's 4000 px would make a data URL of many megabytes.
MARKED_MAX_SIDE = 1600


class Unreadable(Exception):
    """A photo that cannot be read as the form: its HTTP status and one line for the person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Sheet:
    """The answer to send, and what the metrics count of it."""

    document: dict
    outcome: str  # one of monitoring.names.SHEET_OUTCOMES, not SHEET_UNREADABLE
    counts: list[str] = field(default_factory=list)  # each count's outcome (names.COUNT_OUTCOMES)
    failed_checks: list[str] = field(default_factory=list)  # the names of the checks that fail
    reading: SheetReading | None = None  # what the review queue keeps of a sheet a person must look at
    marked: object = None  # the marked photo (a PIL image), at most MARKED_MAX_SIDE a side


class SheetReader:
    def __init__(self, form: layout.Form):
        self.form = form

    @classmethod
    def load(cls, path: Path | None) -> SheetReader:
        """The reader of the form described at `path` (layout.FormError if it cannot be), None: the tally form."""
        return cls(layout.tally_form() if path is None else layout.load(path))

    @property
    def check_names(self) -> list[str]:
        return [check.name for check in self.form.checks]

    def read(self, body: bytes, predict: Callable[[list[bytes]], list]) -> Sheet:
        """The sheet in the image file `body`, its cells answered by `predict` (a list of cell PNGs in, one
        answer each out, as forms.reader.Predict). Unreadable when it is no image or not this form; the
        model server's errors pass through."""
        try:
            pixels = reader.decode(body)
        except reader.ReadError as error:
            raise Unreadable(400, str(error)) from None
        try:
            result = reader.read_sheet(pixels, self.form, predict)
        except reader.ReadError as error:  # not a form, boxes not found: an image, but not of this form
            raise Unreadable(422, str(error)) from None
        sheet = result.reading
        outcome = (n.SHEET_ACCEPTED if sheet.accepted else n.SHEET_INCONSISTENT if sheet.inconsistent
                   else n.SHEET_NEEDS_REVIEW)
        marked = small_marked(pixels, result)
        out = io.BytesIO()
        marked.save(out, format="PNG")
        document = {**sheet.to_dict(), "verdict": outcome, "turned": result.turned,
                    "marked": "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()}
        counts = [n.COUNT_ACCEPTED if count.accepted else n.COUNT_UNREAD if count.value is None
                  else n.COUNT_NEEDS_REVIEW for count in sheet.counts.values()]
        failed = [check.name for check in sheet.checks if check.holds is False]
        return Sheet(document, outcome, counts, failed, sheet, marked)


def small_marked(pixels, result: reader.ReadSheet):
    """The sheet with every box outlined as `digits read --marked` draws it (upright), at most MARKED_MAX_SIDE a
    side."""
    from PIL import Image

    image = marked_image(pixels, result.marks(), result.turned)  # upright
    image.thumbnail((MARKED_MAX_SIDE, MARKED_MAX_SIDE), Image.Resampling.LANCZOS)
    return image
