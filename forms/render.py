"""The blank form as it is printed: a white page with the frame, the title, each count's label and its digit
boxes, drawn from the one form description so that printing, synthetic sheets and reading agree."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forms.layout import PX_PER_MM, Form

FRAME_LINE_MM = 0.6  # the frame the reader finds: thick enough to survive a blurred photo
BOX_LINE_MM = 0.35  # digit boxes: thin, so that a digit touching one stays readable once the line is removed
MARGIN_MM = 15.0  # white paper around the frame (a printer's unprintable border is ~5 mm)
LABEL_X_MM = 12.0  # where each count's label starts, from the frame's left edge
TITLE_Y_MM = 14.0  # the title's vertical centre, from the frame's top edge
TITLE_MM = 7.0  # the title's cap-to-descender height
LABEL_MM = 5.0


@dataclass(frozen=True)
class Page:
    """Where the frame sits on a rendered page: the page is the frame plus a margin on every side."""

    px_per_mm: float
    margin_mm: float
    width: int  # the page, in pixels
    height: int

    @property
    def origin(self) -> tuple[float, float]:
        """The frame's top-left corner (the centre of its printed line) in page pixels."""
        return self.margin_mm * self.px_per_mm, self.margin_mm * self.px_per_mm

    def to_page(self, x_mm: float, y_mm: float) -> tuple[float, float]:
        """A point given in mm from the frame's top-left corner, in page pixels."""
        left, top = self.origin
        return left + x_mm * self.px_per_mm, top + y_mm * self.px_per_mm


def page_of(form: Form, px_per_mm: float = PX_PER_MM, margin_mm: float = MARGIN_MM) -> Page:
    """The page `blank_form` draws for these arguments."""
    return Page(px_per_mm=px_per_mm, margin_mm=margin_mm,
                width=round((form.frame_width + 2 * margin_mm) * px_per_mm),
                height=round((form.frame_height + 2 * margin_mm) * px_per_mm))


def frame_corners(form: Form, px_per_mm: float = PX_PER_MM, margin_mm: float = MARGIN_MM) -> np.ndarray:
    """The frame's corners (top-left, top-right, bottom-right, bottom-left) in page pixels, float [4, 2]."""
    page = page_of(form, px_per_mm, margin_mm)
    return np.array([page.to_page(0, 0), page.to_page(form.frame_width, 0),
                     page.to_page(form.frame_width, form.frame_height), page.to_page(0, form.frame_height)],
                    dtype=np.float64)


def blank_form(form: Form, px_per_mm: float = PX_PER_MM, margin_mm: float = MARGIN_MM) -> np.ndarray:
    """The blank form as uint8 grayscale [height, width]: black print on white paper."""
    from PIL import Image, ImageDraw

    page = page_of(form, px_per_mm, margin_mm)
    canvas = np.full((page.height, page.width), 255, dtype=np.uint8)
    frame_px = max(2, round(FRAME_LINE_MM * px_per_mm))
    outline(canvas, *page.origin, *page.to_page(form.frame_width, form.frame_height), frame_px)
    box_px = max(1, round(BOX_LINE_MM * px_per_mm))
    for count in form.counts:
        for box in form.boxes(count.id):
            outline(canvas, *page.to_page(box.x, box.y), *page.to_page(box.x + box.width, box.y + box.height),
                       box_px)

    image = Image.fromarray(canvas, mode="L")
    draw = ImageDraw.Draw(image)
    if form.title:
        draw.text(page.to_page(form.frame_width / 2, TITLE_Y_MM), form.title, fill=0, anchor="mm",
                  font=_font(TITLE_MM * px_per_mm), stroke_width=max(1, round(0.1 * px_per_mm)), stroke_fill=0)
    label_font = _font(LABEL_MM * px_per_mm)
    for count in form.counts:
        x, y = page.to_page(LABEL_X_MM, count.y + form.box_height / 2)
        draw.text((x, y), count.label, fill=0, anchor="lm", font=label_font)
    return np.asarray(image, dtype=np.uint8).copy()


def outline(canvas: np.ndarray, left: float, top: float, right: float, bottom: float, thickness: int) -> None:
    """Draws an axis-aligned black outline, its line centred on the given edges (so that shared sides coincide)."""
    before = thickness // 2
    x0, y0, x1, y1 = (round(v) for v in (left, top, right, bottom))
    canvas[y0 - before:y0 - before + thickness, x0 - before:x1 - before + thickness] = 0
    canvas[y1 - before:y1 - before + thickness, x0 - before:x1 - before + thickness] = 0
    canvas[y0 - before:y1 - before + thickness, x0 - before:x0 - before + thickness] = 0
    canvas[y0 - before:y1 - before + thickness, x1 - before:x1 - before + thickness] = 0


def _font(height_px: float):
    from PIL import ImageFont

    return ImageFont.load_default(size=max(8, round(height_px)))
