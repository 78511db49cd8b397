"""Image geometry of a filled sheet: find the printed frame, straighten and orient the sheet, and cut one clean
cell (dark ink on white, the box's printed lines removed) per digit box. Also the two form-less modes: a cut-out
row of boxes and a number written without boxes.

Everything here is OpenCV on grayscale uint8 images; the model server reads the cells later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from forms.layout import PX_PER_MM, Form

MIN_SHORT_SIDE = 600  # a form photo: below this a 12 mm box is ~35 px and its 0.35 mm lines vanish
MAX_PIXELS = 40_000_000  # a 40 MP photo is ~120 MB as RGB; larger is not a phone photo
MIN_STRIP_SIDE = 20  # a row of boxes or a written number
WORK_LONG_SIDE = 2400  # the frame is searched on a copy no longer than this (~1 canonical px per px)

FRAME_MIN_AREA = 0.10  # the frame fills at least this share of the photo
LINE_SEARCH_MM = 2.0  # how far a printed box line may be from where the frame's warp puts it
LINE_FOUND = 0.5  # share of a box side that must be ink for the side to count as printed there
BOXES_MATCH = 0.75  # share of the form's boxes whose four sides are found: below this it is not this form
BLANK_INK = 0.012  # share of a box's inside covered by ink below which it is empty
BLANK_EXTENT = 0.25  # ... or when no ink component reaches this share of the box's height or width


class GeometryError(ValueError):
    """The image cannot be read as a form (or row, or number); the message is one line."""


@dataclass(frozen=True)
class Cell:
    """One box's content: dark ink on white with the printed lines removed, ready for the model server."""

    image: np.ndarray  # uint8 [h, w]
    blank: bool
    ink: float  # the box's ink (also what is written over its sides) as a share of the box's inside
    quad: np.ndarray  # float [4, 2]: the box's corners (TL, TR, BR, BL) in the original image
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) of `image` in the straightened image


@dataclass(frozen=True)
class Registered:
    """A photo of a form straightened to the canonical image (the frame at `px_per_mm`)."""

    image: np.ndarray  # uint8 [height, width] = form.canonical_size(px_per_mm)
    homography: np.ndarray  # 3x3: original image pixel -> canonical pixel
    rotation: int  # how the sheet lay in the photo: 0, 90, 180 or 270 degrees clockwise
    frame: np.ndarray  # float [4, 2]: the frame's corners (the form's TL, TR, BR, BL) in the original image
    matched: float  # share of the form's boxes whose printed sides were found
    px_per_mm: float = PX_PER_MM

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Canonical points [N, 2] in original image pixels (to draw a cell back onto the photo)."""
        import cv2

        inverse = np.linalg.inv(self.homography)
        return cv2.perspectiveTransform(np.asarray(points, np.float64).reshape(-1, 1, 2), inverse).reshape(-1, 2)


# --- images ----------------------------------------------------------------------------------------------------

def _gray(image: np.ndarray) -> np.ndarray:
    import cv2

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise GeometryError(f"expected an 8-bit image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    if image.ndim != 2:
        raise GeometryError(f"expected a grayscale or colour image, got an array of shape {image.shape}")
    return np.ascontiguousarray(image)


def _check_size(gray: np.ndarray, min_short_side: int) -> None:
    h, w = gray.shape
    if min(h, w) < min_short_side:
        raise GeometryError(f"image too small: {w}x{h} px, need at least {min_short_side} px on the short side")
    if h * w > MAX_PIXELS:
        raise GeometryError(f"image too large: {w}x{h} px is {h * w / 1e6:.0f} megapixels, at most "
                            f"{MAX_PIXELS // 1_000_000} megapixels")


def _odd(value: float) -> int:
    return max(3, int(value) // 2 * 2 + 1)


def _flatten(gray: np.ndarray, background_px: float) -> np.ndarray:
    """The image divided by its paper: uneven light removed, paper ~255, ink dark (float32)."""
    import cv2

    # The paper is estimated on a small copy: a closing (max, then min) wider than any stroke keeps only paper.
    factor = max(1, int(background_px // 8))
    small = cv2.resize(gray, (max(1, gray.shape[1] // factor), max(1, gray.shape[0] // factor)),
                       interpolation=cv2.INTER_AREA)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (_odd(background_px / factor),) * 2)
    paper = cv2.morphologyEx(small, cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_REPLICATE)
    paper = cv2.GaussianBlur(paper, (0, 0), max(1.0, background_px / factor / 2))
    paper = cv2.resize(paper, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return np.clip(gray.astype(np.float32) * 255.0 / np.maximum(paper, 1.0), 0, 255)


def _ink(flat: np.ndarray) -> np.ndarray:
    """Ink as a 0/255 mask: darker than the paper by more than its noise (estimated, not guessed)."""
    sample = flat[::4, ::4]
    paper = float(np.median(sample))
    spread = 1.4826 * float(np.median(np.abs(sample - paper)))
    threshold = paper - max(45.0, 5.0 * spread)
    return np.where(flat < threshold, 255, 0).astype(np.uint8)


def _open(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (width, height)))


# --- the frame ---------------------------------------------------------------------------------------------------

def _order(corners: np.ndarray) -> np.ndarray:
    """Corners clockwise on screen from the one nearest the image's top-left."""
    centre = corners.mean(axis=0)
    angles = np.arctan2(corners[:, 1] - centre[1], corners[:, 0] - centre[0])
    ordered = corners[np.argsort(angles)]
    return np.roll(ordered, -int(np.argmin(ordered.sum(axis=1))), axis=0)


def _fit_sides(contour: np.ndarray, quad: np.ndarray) -> np.ndarray | None:
    """The quad's corners refined by fitting a straight line to the contour points along each side."""
    import cv2

    points = contour.reshape(-1, 2).astype(np.float64)
    lines = []
    for i in range(4):
        a, b = quad[i], quad[(i + 1) % 4]
        side = b - a
        length = float(np.hypot(*side))
        if length < 10:
            return None
        along = (points - a) @ side / length ** 2
        across = np.abs((points - a) @ np.array([-side[1], side[0]]) / length)
        near = points[(along > 0.1) & (along < 0.9) & (across < max(3.0, 0.015 * length))]
        if len(near) < 10:
            return None
        vx, vy, x0, y0 = cv2.fitLine(near.astype(np.float32), cv2.DIST_HUBER, 0, 0.01, 0.01).ravel()
        lines.append((np.array([x0, y0], np.float64), np.array([vx, vy], np.float64)))
    corners = []
    for i in range(4):
        (p, u), (q, v) = lines[i - 1], lines[i]
        matrix = np.array([u, -v]).T
        if abs(np.linalg.det(matrix)) < 1e-6:
            return None
        t = np.linalg.solve(matrix, q - p)
        corners.append(p + t[0] * u)
    return np.array(corners)


def _quad(contour: np.ndarray) -> np.ndarray | None:
    import cv2

    approx = cv2.approxPolyDP(contour, 0.02 * cv2.arcLength(contour, True), True)
    if len(approx) != 4 or not cv2.isContourConvex(approx):
        return None
    return _order(approx.reshape(4, 2).astype(np.float64))


def _frames(work: np.ndarray) -> list[np.ndarray]:
    """Candidate frames in the working image, largest first: corners [4, 2] on the printed line's centre.

    A frame is a thin dark quadrilateral band: its outer contour is a convex quadrilateral that does not touch
    the image's border, and its hole (the inside) is most of its area, which a blob or a noise texture is not."""
    import cv2

    h, w = work.shape
    smooth = cv2.GaussianBlur(work, (0, 0), 1.0)
    binary = cv2.adaptiveThreshold(smooth, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV,
                                   _odd(min(h, w) / 30), 10)
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    found = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:  # a hole
            continue
        area = cv2.contourArea(contour)
        if area < FRAME_MIN_AREA * h * w:
            continue
        x, y, bw, bh = cv2.boundingRect(contour)
        if x <= 1 or y <= 1 or x + bw >= w - 1 or y + bh >= h - 1:
            continue
        outer = _quad(contour)
        if outer is None or abs(cv2.contourArea(outer.astype(np.float32)) - area) > 0.06 * area:
            continue
        holes, child = [], hierarchy[i][2]
        while child != -1:
            holes.append(contours[child])
            child = hierarchy[child][0]
        hole = max(holes, key=cv2.contourArea, default=None)
        if hole is None or cv2.contourArea(hole) < 0.6 * area:
            continue
        outer_fit = _fit_sides(contour, outer)
        inner = _quad(hole)
        inner_fit = _fit_sides(hole, inner) if inner is not None else None
        if outer_fit is None:
            continue
        # The band's centre line: blur and thresholding move both edges alike, and cancel in the mean.
        corners = (outer_fit + inner_fit) / 2 if inner_fit is not None else outer_fit
        found.append((area, corners))
    found.sort(key=lambda item: -item[0])
    return [corners for _, corners in found[:4]]


# --- the boxes -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Sides:
    """A box's printed sides in a straightened image: line centres and how much of each side was found."""

    left: float
    top: float
    right: float
    bottom: float
    coverage: tuple[float, float, float, float]
    thickness: float

    @property
    def found(self) -> bool:
        return min(self.coverage) >= LINE_FOUND


def _peak(profile: np.ndarray, start: int, expected: int) -> tuple[float, float, float]:
    """(position, height, width) of the strongest ridge in a projection profile; position in image pixels.

    Of two equal ridges the one nearer `expected` (an index into the profile) wins. The position is the centre
    of the ridge's top (>= 90 %), so that a thick stroke lying against a printed line does not pull the line
    towards it; the width is the ridge's at half height (the line's thickness)."""
    distance = np.abs(np.arange(len(profile)) - expected) / max(1, len(profile))
    best = int(np.argmax(profile * (1.0 - 0.1 * distance)))
    height = float(profile[best])
    if height <= 0:
        return start + len(profile) / 2, 0.0, 0.0

    def ridge(level: float) -> tuple[int, int]:
        lo, hi = best, best
        while lo > 0 and profile[lo - 1] >= level * height:
            lo -= 1
        while hi < len(profile) - 1 and profile[hi + 1] >= level * height:
            hi += 1
        return lo, hi

    lo, hi = ridge(0.9)
    position = float(np.average(np.arange(lo, hi + 1), weights=profile[lo:hi + 1]))
    lo, hi = ridge(0.5)
    return start + position, height, float(hi - lo + 1)


def _find_sides(horizontal: np.ndarray, vertical: np.ndarray, expected: tuple[int, int, int, int],
                search: int) -> _Sides:
    """Each side's printed line near where it is expected, from the long-line maps (0/255)."""
    left, top, right, bottom = expected
    h, w = horizontal.shape
    # A side is measured along nearly its whole length: a printed side spans the box, a digit's long stroke
    # (a "1" beside it) at most ~85 % of it.
    inset_x, inset_y = max(2, (right - left) // 25), max(2, (bottom - top) // 25)

    def rows(y: int, x0: int, x1: int):
        y0, y1 = max(0, y - search), min(h, y + search + 1)
        if y0 >= y1 or x0 >= x1:
            return float(y), 0.0, 0.0
        return _peak(horizontal[y0:y1, x0:x1].mean(axis=1) / 255.0, y0, y - y0)

    def cols(x: int, y0: int, y1: int):
        x0, x1 = max(0, x - search), min(w, x + search + 1)
        if x0 >= x1 or y0 >= y1:
            return float(x), 0.0, 0.0
        return _peak(vertical[y0:y1, x0:x1].mean(axis=0) / 255.0, x0, x - x0)

    found = [rows(top, left + inset_x, right - inset_x), rows(bottom, left + inset_x, right - inset_x)]
    found += [cols(left, top + inset_y, bottom - inset_y), cols(right, top + inset_y, bottom - inset_y)]
    (y_top, c_top, t_top), (y_bottom, c_bottom, t_bottom), (x_left, c_left, t_left), (x_right, c_right, t_right) = found
    widths = [t for t, c in ((t_top, c_top), (t_bottom, c_bottom), (t_left, c_left), (t_right, c_right))
              if c >= LINE_FOUND]
    return _Sides(left=x_left, top=y_top, right=x_right, bottom=y_bottom,
                  coverage=(c_left, c_top, c_right, c_bottom), thickness=float(np.median(widths)) if widths else 0.0)


def _line_maps(ink: np.ndarray, box_w: float, box_h: float) -> tuple[np.ndarray, np.ndarray]:
    """Long horizontal and vertical ink runs: printed lines (a digit's stroke is rarely half a box long)."""
    return _open(ink, max(5, round(0.5 * box_w)), 1), _open(ink, 1, max(5, round(0.5 * box_h)))


def _form_sides(canonical: np.ndarray, form: Form, px_per_mm: float) -> tuple[dict[str, list[_Sides]], np.ndarray]:
    """Every box's printed sides in the canonical image, and the flattened image they were found in."""
    flat = _flatten(canonical, 4.0 * px_per_mm)
    ink = _ink(flat)
    horizontal, vertical = _line_maps(ink, form.box_width * px_per_mm, form.box_height * px_per_mm)
    search = max(3, round(LINE_SEARCH_MM * px_per_mm))
    sides = {count.id: [_find_sides(horizontal, vertical, box.pixels(px_per_mm), search)
                        for box in form.boxes(count.id)] for count in form.counts}
    return sides, flat


def _matched(sides: dict[str, list[_Sides]]) -> float:
    boxes = [box for row in sides.values() for box in row]
    return sum(box.found for box in boxes) / len(boxes)


def _score(sides: dict[str, list[_Sides]]) -> float:
    return float(np.mean([min(1.0, c) for row in sides.values() for box in row for c in box.coverage]))


def register(image: np.ndarray, form: Form, px_per_mm: float = PX_PER_MM) -> Registered:
    """Finds the form's printed frame in a photo, straightens it to `form.canonical_size()` and turns it upright.

    Raises GeometryError when the image is too small or too large, shows no frame, or its boxes are not this
    form's."""
    import cv2

    gray = _gray(image)
    _check_size(gray, MIN_SHORT_SIDE)
    h, w = gray.shape
    shrink = min(1.0, WORK_LONG_SIDE / max(h, w))
    work = gray if shrink == 1.0 else cv2.resize(gray, (round(w * shrink), round(h * shrink)),
                                                 interpolation=cv2.INTER_AREA)
    frames = _frames(work)
    if not frames:
        raise GeometryError("not a form: no printed frame found")
    width, height = form.canonical_size(px_per_mm)
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    to_work = np.diag([shrink, shrink, 1.0])
    best = None
    for corners in frames:
        top = np.hypot(*(corners[1] - corners[0])) + np.hypot(*(corners[2] - corners[3]))
        side = np.hypot(*(corners[3] - corners[0])) + np.hypot(*(corners[2] - corners[1]))
        portrait = side > top
        if abs(math.log(form.frame_height / form.frame_width)) < 0.1:  # near-square: any turn is possible
            turns = (0, 1, 2, 3)
        else:
            turns = (0, 2) if portrait == (form.frame_height > form.frame_width) else (1, 3)
        for turn in turns:
            source = np.roll(corners, -turn, axis=0).astype(np.float32)
            warp = cv2.getPerspectiveTransform(source, target)
            canonical = cv2.warpPerspective(work, warp, (width, height), flags=cv2.INTER_LINEAR,
                                            borderMode=cv2.BORDER_REPLICATE)
            sides, _ = _form_sides(canonical, form, px_per_mm)
            candidate = (_score(sides), _matched(sides), turn, warp, canonical, source)
            if best is None or candidate[0] > best[0]:
                best = candidate
    _, matched, turn, warp, canonical, source = best
    if matched < BOXES_MATCH:
        boxes = sum(count.digits for count in form.counts)
        raise GeometryError(f"boxes not found: {round(matched * boxes)} of the {boxes} boxes of form {form.name!r} "
                            f"are where the form puts them inside the frame found")
    return Registered(image=canonical, homography=warp @ to_work, rotation=90 * turn,
                      frame=source.astype(np.float64) / shrink, matched=matched, px_per_mm=px_per_mm)


# --- cells -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Strokes:
    """A region of a straightened image around some boxes, with their printed lines taken out (all 0/255)."""

    x0: int  # the region's top-left corner in the straightened image
    y0: int
    strokes: np.ndarray  # ink that is not a printed line (strokes crossing a line bridged over it)
    lines: np.ndarray  # the line pixels that were taken out
    bands: np.ndarray  # where the boxes' lines run
    thick: np.ndarray  # ink thicker than a printed line: a stroke, also where it lies on a line
    half: float  # half a band's width


def _span(a: float, b: float, limit: int) -> slice:
    return slice(min(limit, max(0, int(a))), min(limit, max(0, int(math.ceil(b)) + 1)))


def _remove_lines(ink: np.ndarray, boxes: list[_Sides], box_w: float, box_h: float, thickness: float) -> _Strokes:
    import cv2

    half = thickness / 2 + 2.5  # a line's pixels, plus its blurred or aliased fringe
    reach_x, reach_y = 0.35 * box_w, 0.45 * box_h  # how far a digit written across a line may reach
    h, w = ink.shape
    x0, y0 = max(0, int(min(b.left for b in boxes) - reach_x)), max(0, int(min(b.top for b in boxes) - reach_y))
    x1 = min(w, int(max(b.right for b in boxes) + reach_x) + 1)
    y1 = min(h, int(max(b.bottom for b in boxes) + reach_y) + 1)
    region = ink[y0:y1, x0:x1]
    rows, cols = region.shape
    horizontal, vertical = _line_maps(region, box_w, box_h)

    # Bands along the printed lines: only there may ink be taken for a line (a long "1" elsewhere stays).
    band_h = np.zeros(region.shape, np.uint8)
    band_v = np.zeros(region.shape, np.uint8)
    for b in boxes:
        along_x = _span(b.left - half - x0, b.right + half - x0, cols)
        along_y = _span(b.top - half - y0, b.bottom + half - y0, rows)
        for y in (b.top, b.bottom):
            band_h[_span(y - half - y0, y + half - y0, rows), along_x] = 255
        for x in (b.left, b.right):
            band_v[along_y, _span(x - half - x0, x + half - x0, cols)] = 255
    lines_h = cv2.dilate(horizontal, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 5))) & band_h
    lines_v = cv2.dilate(vertical, cv2.getStructuringElement(cv2.MORPH_RECT, (5, 3))) & band_v

    # Ink much thicker than a printed line is a stroke, also where it lies on a line (a "1" written on a side).
    # A blob that wide and no longer is where two lines meet (a blurred corner), not a stroke.
    wide = round(1.5 * thickness) + 3
    thick = cv2.morphologyEx(region, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (wide, wide)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(thick, connectivity=8)
    corner = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]) < 2.5 * wide
    corner[0] = False
    thick[corner[labels]] = 0
    thick = cv2.dilate(thick, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3)))
    lines_h &= ~thick
    lines_v &= ~thick
    lines = lines_h | lines_v
    rest = region & ~lines

    # What is left of a line beside its band (a blurred or aliased line is wider than its found thickness) is
    # dropped before strokes are bridged across the line, or the bridging would redraw the line itself.
    near_line = (cv2.dilate(band_h | band_v, cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5))) > 0) & (thick == 0)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(rest, connectivity=8)
    beside = np.bincount(labels.ravel(), weights=near_line.ravel(), minlength=count)
    area = stats[:, cv2.CC_STAT_AREA]
    fringe = (beside >= 0.9 * area) | (area < _min_area(box_h))
    fringe[0] = False
    rest[fringe[labels]] = 0

    # A stroke that crosses a line continues on both sides of it: bridge the gap the removal left, across the
    # line only.
    gap = max(3, int(math.ceil(2 * half)) + 2)
    across_h = cv2.morphologyEx(rest, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (1, gap)))
    across_v = cv2.morphologyEx(rest, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (gap, 1)))
    strokes = rest | (across_h & lines_h) | (across_v & lines_v)
    return _Strokes(x0=x0, y0=y0, strokes=strokes, lines=lines, bands=band_h | band_v, thick=thick, half=half)


def _min_area(box_h: float) -> float:
    return max(4.0, (0.04 * box_h) ** 2)  # smaller is a speck of noise, not part of a digit


def _assign(cut: _Strokes, boxes: list[_Sides], box_w: float, box_h: float) -> list[np.ndarray]:
    """Each box's strokes (bool masks of the region): every piece of ink goes to the box it was written in."""
    import cv2

    reach_x, reach_y = 0.35 * box_w, 0.45 * box_h
    x0, y0, half = cut.x0, cut.y0, cut.half
    rows, cols = cut.strokes.shape
    # Strokes that only a removed line parts (a digit written along a side) are one digit: group them through
    # the line's pixels next to them. The bridges group; they are not drawn into the cell.
    gap = max(3, int(math.ceil(2 * half)) + 2)
    bridges = cv2.dilate(cut.strokes, cv2.getStructuringElement(cv2.MORPH_RECT, (gap, gap))) & cut.lines
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(cut.strokes | bridges, connectivity=8)
    is_stroke = cut.strokes > 0
    stroke_labels = np.where(is_stroke, labels, 0)
    area = np.bincount(stroke_labels.ravel(), minlength=count)
    thin_on_line = (cut.bands > 0) & (cut.thick == 0) & is_stroke  # could be what is left of a line
    on_line = np.bincount(labels.ravel(), weights=thin_on_line.ravel(), minlength=count)
    inside_pixels = np.zeros((len(boxes), count))  # per box: each component's stroke pixels inside the box
    column_pixels = np.zeros((len(boxes), count))  # ... and between its side lines, a little above and below
    for index, b in enumerate(boxes):
        inside = stroke_labels[_span(b.top + half - y0, b.bottom - half - y0, rows),
                               _span(b.left + half - x0, b.right - half - x0, cols)]
        inside_pixels[index] = np.bincount(inside.ravel(), minlength=count)
        window = stroke_labels[_span(b.top - reach_y / 2 - y0, b.bottom + reach_y / 2 - y0, rows),
                               _span(b.left - x0, b.right - x0 - 1, cols)]
        column_pixels[index] = np.bincount(window.ravel(), minlength=count)
    masks = [np.zeros(labels.shape, bool) for _ in boxes]
    for label in range(1, count):
        if area[label] < _min_area(box_h) or on_line[label] >= 0.9 * area[label]:  # a speck, or a line's remnant
            continue
        component = (labels == label) & is_stroke
        if len(boxes) > 1:
            first, second = sorted(int(i) for i in np.argsort(column_pixels[:, label])[::-1][:2])
            neighbours = abs(boxes[first].right - boxes[second].left) <= 2 * half and \
                abs(boxes[first].top - boxes[second].top) <= 2 * half
            side = (boxes[first].right + boxes[second].left) / 2 - x0
            left, width = stats[label, cv2.CC_STAT_LEFT], stats[label, cv2.CC_STAT_WIDTH]
            # Ink reaching deep into two neighbouring boxes is two digits that touch (no digit is wider than
            # its box, and one written across a side reaches only a little way over it): split at the side.
            if neighbours and min(side - left, left + width - side) >= 0.33 * box_w and \
                    min(column_pixels[first, label], column_pixels[second, label]) >= 0.1 * area[label]:
                cut_at = max(0, round(side))
                masks[first][:, :cut_at] |= component[:, :cut_at]
                masks[second][:, cut_at:] |= component[:, cut_at:]
                continue
        cx, cy = centroids[label] + (x0, y0)
        # The box the digit's centre is in; past a row's outer side, the nearest box (no neighbour claims it).
        # Not above or below a box: that is where printed text is, and a digit crossing the top or bottom line
        # keeps its centre inside.
        near = [(max(b.left - cx, cx - b.right, 0.0), index) for index, b in enumerate(boxes)
                if b.left - reach_x / 2 <= cx < b.right + reach_x / 2 and b.top <= cy <= b.bottom]
        owner = min(near)[1] if near else None
        if owner is None and inside_pixels[:, label].max() >= 0.25 * area[label]:
            owner = int(np.argmax(inside_pixels[:, label]))  # mostly outside, but written into this box
        if owner is not None:
            masks[owner] |= component
    return masks


def _cut(flat: np.ndarray, ink: np.ndarray, boxes: list[_Sides], box_w: float, box_h: float,
         to_original) -> list[Cell]:
    """One cell per box of a straightened image, in the order of `boxes` (their printed sides as found)."""
    import cv2

    thickness = float(np.median([b.thickness for b in boxes if b.thickness > 0] or [2.0]))
    cut = _remove_lines(ink, boxes, box_w, box_h, thickness)
    masks = _assign(cut, boxes, box_w, box_h)
    x0, y0, half = cut.x0, cut.y0, cut.half
    # Whether a box holds a digit is judged on ink away from the printed lines, or thick ink on them: what is
    # left of a badly printed or blurred line is thin and beside the line, and no digit.
    zone = round(2 * thickness) + 1
    line_zone = cv2.dilate(cut.bands, cv2.getStructuringElement(cv2.MORPH_RECT, (zone, zone))) > 0
    telling = ~line_zone | (cut.thick > 0)
    soft_edge = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    cells = []
    for b, mask in zip(boxes, masks):
        left, top = int(math.ceil(b.left + half)), int(math.ceil(b.top + half))
        right, bottom = int(b.right - half) + 1, int(b.bottom - half) + 1
        inside_area = max(1, (right - left) * (bottom - top))
        if mask.any():  # the crop is the box's inside, grown to the digit where it is written over a side
            ys, xs = np.nonzero(mask)
            left, top = min(left, int(xs.min()) + x0), min(top, int(ys.min()) + y0)
            right, bottom = max(right, int(xs.max()) + 1 + x0), max(bottom, int(ys.max()) + 1 + y0)
        evidence = mask & telling
        extent = 0.0
        if evidence.any():
            ys, xs = np.nonzero(evidence)
            extent = max((ys.max() - ys.min() + 1) / box_h, (xs.max() - xs.min() + 1) / box_w)
        ink_share = float(evidence.sum()) / inside_area
        keep = cv2.dilate(mask.astype(np.uint8), soft_edge)[top - y0:bottom - y0, left - x0:right - x0] > 0
        image = np.where(keep, flat[top:bottom, left:right], 255).astype(np.uint8)
        corners = np.array([[b.left, b.top], [b.right, b.top], [b.right, b.bottom], [b.left, b.bottom]])
        cells.append(Cell(image=image, blank=bool(ink_share < BLANK_INK or extent < BLANK_EXTENT), ink=ink_share,
                          quad=to_original(corners), crop=(left, top, right, bottom)))
    return cells


def cut_cells(registered: Registered, form: Form) -> dict[str, list[Cell]]:
    """One cell per box of every count, each box placed by its own printed lines near where the form puts it."""
    px_per_mm = registered.px_per_mm
    sides, flat = _form_sides(registered.image, form, px_per_mm)
    ink = _ink(flat)
    boxes = []
    for count in form.counts:
        expected = [box.pixels(px_per_mm) for box in form.boxes(count.id)]
        boxes += _fallback(sides[count.id], expected)
    cells = iter(_cut(flat, ink, boxes, form.box_width * px_per_mm, form.box_height * px_per_mm,
                      registered.to_original))
    return {count.id: [next(cells) for _ in range(count.digits)] for count in form.counts}


def _fallback(row: list[_Sides], expected: list[tuple[int, int, int, int]]) -> list[_Sides]:
    """A side whose line was not found goes where the found ones say the row has moved (a faint or torn line)."""
    shifts_x = [s.left - e[0] for s, e in zip(row, expected) if s.coverage[0] >= LINE_FOUND]
    shifts_x += [s.right - e[2] for s, e in zip(row, expected) if s.coverage[2] >= LINE_FOUND]
    shifts_y = [s.top - e[1] for s, e in zip(row, expected) if s.coverage[1] >= LINE_FOUND]
    shifts_y += [s.bottom - e[3] for s, e in zip(row, expected) if s.coverage[3] >= LINE_FOUND]
    dx = float(np.median(shifts_x)) if shifts_x else 0.0
    dy = float(np.median(shifts_y)) if shifts_y else 0.0
    fixed = []
    for s, (left, top, right, bottom) in zip(row, expected):
        c = s.coverage
        fixed.append(_Sides(left=s.left if c[0] >= LINE_FOUND else left + dx,
                            top=s.top if c[1] >= LINE_FOUND else top + dy,
                            right=s.right if c[2] >= LINE_FOUND else right + dx,
                            bottom=s.bottom if c[3] >= LINE_FOUND else bottom + dy,
                            coverage=c, thickness=s.thickness))
    return fixed


# White paper added around a cell before it is sent: the model's preprocessing reads the paper's level and
# the ink's polarity from the image's border (components/transform.py), so ink cut off at the box's side
# (a digit written across it) must not be the border.
CELL_MARGIN = 0.25  # of the cell's longer side, on each side


def encode(cell: Cell) -> bytes:
    """The cell on a margin of white paper as a grayscale PNG: the bytes the model server is sent."""
    from data.sample import encode_png

    margin = max(2, round(CELL_MARGIN * max(cell.image.shape)))
    return encode_png(np.pad(cell.image, margin, constant_values=255))


# --- without a form --------------------------------------------------------------------------------------------

def _runs(profile: np.ndarray, level: float) -> list[tuple[int, int, float]]:
    """(start, end exclusive, peak) of the stretches where a profile reaches `level`."""
    above = np.concatenate([[False], profile >= level, [False]])
    edges = np.flatnonzero(np.diff(above.astype(np.int8)))
    return [(int(a), int(b), float(profile[a:b].max())) for a, b in zip(edges[::2], edges[1::2])]


def _skew(ink: np.ndarray) -> float:
    """The angle in degrees of the long near-horizontal lines (a row's top and bottom), 0 when there are none."""
    import cv2

    w = ink.shape[1]
    lines = cv2.HoughLinesP(ink, 1, np.pi / 720, threshold=max(10, w // 6), minLineLength=max(15, w // 6),
                            maxLineGap=max(2, w // 100))
    if lines is None:
        return 0.0
    angles, weights = [], []
    for x1, y1, x2, y2 in lines[:, 0]:
        angle = math.degrees(math.atan2(y2 - y1, x2 - x1))
        angle = (angle + 90) % 180 - 90
        if abs(angle) < 20:
            angles.append(angle)
            weights.append(math.hypot(x2 - x1, y2 - y1))
    if not angles:
        return 0.0
    order = np.argsort(angles)
    cumulative = np.cumsum(np.array(weights)[order])
    return float(np.array(angles)[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def find_row(image: np.ndarray) -> list[Cell]:
    """The cells of a single row of boxes (a strip cut from a form), left to right, without a form description."""
    import cv2

    gray = _gray(image)
    _check_size(gray, MIN_STRIP_SIDE)
    h, w = gray.shape
    flat = _flatten(gray, max(9.0, min(h, w) / 4))
    angle = _skew(_ink(flat))
    # Straighten on a canvas large enough for the turned strip; `turn` maps original -> straight pixels.
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(turn[0, 0]), abs(turn[0, 1])
    size = (int(math.ceil(w * cos + h * sin)), int(math.ceil(w * sin + h * cos)))
    turn[:, 2] += (size[0] - w) / 2, (size[1] - h) / 2
    straight = cv2.warpAffine(flat, turn, size, flags=cv2.INTER_LINEAR, borderValue=255.0)
    ink = _ink(straight)
    sw = ink.shape[1]

    horizontal = _open(ink, max(15, sw // 8), 1)
    rows = sorted(_runs(horizontal.sum(axis=1) / 255.0 / sw, 0.15), key=lambda run: -run[2])[:2]
    if len(rows) < 2:
        raise GeometryError("no row of boxes found: fewer than two long horizontal lines")
    (t0, t1, _), (b0, b1, _) = sorted(rows)
    top, bottom = (t0 + t1 - 1) / 2, (b0 + b1 - 1) / 2
    inner = bottom - top
    if inner < 8:
        raise GeometryError("no row of boxes found: its top and bottom lines are too close")
    thickness = float(np.median([t1 - t0, b1 - b0]))
    vertical = _open(ink, 1, max(5, round(0.5 * inner)))
    a, b = int(top + thickness), int(bottom - thickness) + 1
    cols = vertical[a:b].sum(axis=0) / 255.0 / max(1, b - a)
    xs = [((s + e - 1) / 2, peak) for s, e, peak in _runs(cols, 0.92)]
    # A digit's long straight stroke may pass for a side: drop the weaker side of any box far narrower than most.
    while len(xs) > 2:
        widths = np.diff([x for x, _ in xs])
        narrow = int(np.argmin(widths))
        if widths[narrow] >= 0.55 * np.median(widths):
            break
        xs.pop(narrow if xs[narrow][1] < xs[narrow + 1][1] else narrow + 1)
    boxes = []
    for (left, _), (right, _) in zip(xs, xs[1:]):
        if right - left < 0.3 * inner:
            continue
        span = slice(int(left + thickness), int(right - thickness) + 1)
        covered = [horizontal[max(0, round(y) - 2):round(y) + 3, span].max(axis=0).mean() / 255.0
                   for y in (top, bottom)]
        if min(covered) >= LINE_FOUND:  # not the gap between two separate boxes
            boxes.append(_Sides(left=left, top=top, right=right, bottom=bottom, coverage=(1.0, 1.0, 1.0, 1.0),
                                thickness=thickness))
    if not boxes:
        raise GeometryError("no row of boxes found: no box between the row's lines")
    back = cv2.invertAffineTransform(turn)

    def to_original(points: np.ndarray) -> np.ndarray:
        return cv2.transform(np.asarray(points, np.float64).reshape(-1, 1, 2), back).reshape(-1, 2)

    box_w = float(np.median([box.right - box.left for box in boxes]))
    return _cut(straight, ink, boxes, box_w, inner, to_original)


def split_number(image: np.ndarray) -> list[Cell]:
    """The digits of a number written without boxes, left to right: ink components, those above one another
    (a 5's hat, a broken 4) taken together."""
    import cv2

    gray = _gray(image)
    _check_size(gray, MIN_STRIP_SIDE)
    h, w = gray.shape
    flat = _flatten(gray, max(9.0, min(h, w) / 2))
    ink = _ink(flat)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    parts = [label for label in range(1, count) if stats[label, cv2.CC_STAT_AREA] >= max(6, h * w // 20000)]
    parts.sort(key=lambda label: stats[label, cv2.CC_STAT_LEFT])
    groups: list[list[int]] = []
    for label in parts:
        x, width = stats[label, cv2.CC_STAT_LEFT], stats[label, cv2.CC_STAT_WIDTH]
        if groups:
            gx0 = min(stats[g, cv2.CC_STAT_LEFT] for g in groups[-1])
            gx1 = max(stats[g, cv2.CC_STAT_LEFT] + stats[g, cv2.CC_STAT_WIDTH] for g in groups[-1])
            overlap = min(gx1, x + width) - max(gx0, x)
            if overlap >= 0.3 * min(width, gx1 - gx0):
                groups[-1].append(label)
                continue
        groups.append([label])
    if not groups:
        raise GeometryError("no number found: no ink on the image")
    areas = [sum(stats[g, cv2.CC_STAT_AREA] for g in group) for group in groups]
    heights = [max(stats[g, cv2.CC_STAT_TOP] + stats[g, cv2.CC_STAT_HEIGHT] for g in group)
               - min(stats[g, cv2.CC_STAT_TOP] for g in group) for group in groups]
    tallest = max(heights)
    cells = []
    grow = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    for group, area, height in zip(groups, areas, heights):
        if area < 0.08 * max(areas) or height < 0.3 * tallest:  # a speck or a stray mark, not a digit
            continue
        left = min(stats[g, cv2.CC_STAT_LEFT] for g in group)
        top = min(stats[g, cv2.CC_STAT_TOP] for g in group)
        right = max(stats[g, cv2.CC_STAT_LEFT] + stats[g, cv2.CC_STAT_WIDTH] for g in group)
        bottom = max(stats[g, cv2.CC_STAT_TOP] + stats[g, cv2.CC_STAT_HEIGHT] for g in group)
        pad = max(2, (bottom - top) // 10)
        left, top = max(0, left - pad), max(0, top - pad)
        right, bottom = min(w, right + pad), min(h, bottom + pad)
        mask = cv2.dilate(np.isin(labels[top:bottom, left:right], group).astype(np.uint8), grow) > 0
        cell = np.where(mask, flat[top:bottom, left:right], 255).astype(np.uint8)
        quad = np.array([[left, top], [right, top], [right, bottom], [left, bottom]], dtype=np.float64)
        cells.append(Cell(image=cell, blank=False, ink=float(area) / ((right - left) * (bottom - top)), quad=quad,
                          crop=(int(left), int(top), int(right), int(bottom))))
    return cells
