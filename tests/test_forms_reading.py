"""Counts, arithmetic checks and suggestions from the model's answers (forms/reading.py), and the form
description that says what to check (forms/layout.py): plain logic, no image and no server."""

from __future__ import annotations

import json

import pytest

from forms import layout, reading
from serving.answers import Answer


def answer(digit: int, confidence: float = 0.999, runner_up: int | None = None, decision: str = "accepted") -> Answer:
    """An answer as the server decodes it: `confidence` on `digit`, the rest on `runner_up` (or spread)."""
    probabilities = [0.0] * 10
    probabilities[digit] = confidence
    rest = 1.0 - confidence
    if runner_up is not None:
        probabilities[runner_up] = rest
    else:
        for other in range(10):
            if other != digit:
                probabilities[other] = rest / 9
    return Answer(digit, confidence, tuple(probabilities), ink_fraction=0.2, decision=decision)


def cells_of(text: str, **unsure: tuple[int, int, float]) -> list[reading.CellReading]:
    """ " 42" -> a blank box and two accepted digits; unsure={"1": (3, 8, 0.55)} makes box 1 unsure."""
    cells = []
    for index, char in enumerate(text):
        if char == " ":
            cells.append(reading.CellReading(None))
        elif str(index) in unsure:
            digit, other, confidence = unsure[str(index)]
            cells.append(reading.CellReading(answer(digit, confidence, other, "unsure")))
        else:
            cells.append(reading.CellReading(answer(int(char))))
    return cells


FORM = layout.tally_form()
CLEAN = {"candidate_a": "120", "candidate_b": " 85", "candidate_c": "  7", "candidate_d": " 38",
         "valid": "250", "rejected": "  3", "cast": "253"}


def sheet_cells(**override) -> dict[str, list[reading.CellReading]]:
    return {count_id: override.get(count_id) or cells_of(text) for count_id, text in CLEAN.items()}


def test_the_example_form_is_a_valid_description_with_its_two_checks():
    assert [count.id for count in FORM.counts][-3:] == ["valid", "rejected", "cast"]
    assert [check.describe() for check in FORM.checks] == [
        "candidate_a + candidate_b + candidate_c + candidate_d = valid", "valid + rejected = cast"]
    assert FORM.canonical_size() == (1440, 2000)
    assert FORM.boxes("valid")[1].pixels() == (1056, 1120, 1152, 1240)


def test_a_clean_sheet_that_adds_up_is_accepted_without_a_person():
    sheet = reading.read_sheet(FORM, sheet_cells())
    assert sheet.values() == {"candidate_a": 120, "candidate_b": 85, "candidate_c": 7, "candidate_d": 38,
                              "valid": 250, "rejected": 3, "cast": 253}
    assert [check.holds for check in sheet.checks] == [True, True]
    assert sheet.accepted and not sheet.inconsistent and sheet.suggestions == []


def test_a_total_that_does_not_add_up_is_caught_and_never_corrected():
    sheet = reading.read_sheet(FORM, sheet_cells(cast=cells_of("263")))
    assert not sheet.accepted and sheet.inconsistent
    assert [(c.holds, c.left, c.right) for c in sheet.checks] == [(True, 250, 250), (False, 253, 263)]
    # Every digit was read without doubt: the form itself does not add up, there is nothing to suggest.
    assert sheet.suggestions == [] and sheet.values()["cast"] == 263


def test_an_unsure_8_is_resolved_by_the_arithmetic_only_as_a_suggestion():
    # The units of candidate_a: the model says 3 (0.55) or 8 (0.45); the sums say 8.
    unsure = cells_of("128", **{"2": (3, 8, 0.55)})
    sheet = reading.read_sheet(FORM, sheet_cells(candidate_a=unsure, valid=cells_of("258"), cast=cells_of("261")))
    count = sheet.counts["candidate_a"]
    assert count.value is None and count.review_cells == (2,) and "box 3: unsure: 3 or 8" in count.problems[0]
    assert not sheet.accepted and not sheet.inconsistent
    assert [check.holds for check in sheet.checks] == [None, True]
    best = sheet.suggestions[0]
    assert best.values["candidate_a"] == 128 and best.changes == {"candidate_a": (None, 128)}
    # 123 would need valid = 253: no combination of readings makes it add up, so it is not offered.
    assert all(s.values["candidate_a"] != 123 for s in sheet.suggestions)


def test_two_unsure_cells_in_different_counts_are_resolved_together():
    sheet = reading.read_sheet(FORM, sheet_cells(candidate_b=cells_of(" 35", **{"1": (3, 8, 0.6)}),
                                                 rejected=cells_of("  8", **{"2": (8, 3, 0.51)})))
    assert sheet.suggestions[0].values["candidate_b"] == 85 and sheet.suggestions[0].values["rejected"] == 3


def test_an_empty_box_is_a_blank_not_a_zero():
    assert reading.read_count("c", "C", cells_of("  7"), layout.EMPTY_BLANK).value == 7
    inside = reading.read_count("c", "C", cells_of("1 7"), layout.EMPTY_BLANK)
    assert inside.value is None and inside.problems == ("an empty box between digits",) and inside.review_cells == (1,)
    right = reading.read_count("c", "C", cells_of("7  "), layout.EMPTY_BLANK)
    assert right.value is None and "units box is empty" in right.problems[0]
    empty = reading.read_count("c", "C", cells_of("   "), layout.EMPTY_BLANK)
    assert empty.value is None and empty.problems == ("no digit written",)
    # A form that says so reads empty boxes as zeros.
    assert reading.read_count("c", "C", cells_of("1 7"), layout.EMPTY_ZERO).value == 107
    assert reading.read_count("c", "C", cells_of("   "), layout.EMPTY_ZERO).value == 0


def test_a_sheet_with_an_empty_count_goes_to_a_person_with_the_check_left_open():
    sheet = reading.read_sheet(FORM, sheet_cells(rejected=cells_of("   ")))
    assert not sheet.accepted and sheet.checks[1].holds is None
    # The only reading of "rejected" that adds up would be 3, but an empty count has no reading to offer.
    assert sheet.suggestions == []


def test_a_non_digit_in_a_box_is_named():
    cells = cells_of("12 ")
    cells[2] = reading.CellReading(answer(4, 0.4, 9, "not_a_digit"))
    count = reading.read_count("c", "C", cells, layout.EMPTY_BLANK)
    assert count.problems == ("box 3: not a digit",) and count.review_cells == (2,)


def test_a_model_without_abstention_outputs_is_never_accepted_alone():
    cells = [reading.CellReading(Answer(7, 0.99, tuple(0.99 if d == 7 else 0.001 for d in range(10))))]
    count = reading.read_count("c", "C", cells, layout.EMPTY_BLANK)
    assert not count.accepted and count.review_cells == (0,)


def test_the_sheet_as_json_names_the_boxes_to_look_at():
    unsure = cells_of("128", **{"2": (3, 8, 0.55)})
    document = reading.read_sheet(FORM, sheet_cells(candidate_a=unsure)).to_dict()
    json.dumps(document)
    assert document["accepted"] is False
    assert document["counts"]["candidate_a"]["review_boxes"] == [3]
    assert document["counts"]["candidate_a"]["boxes"][2] == {"digit": 3, "confidence": 0.55, "decision": "unsure",
                                                             "runner_up": 8}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("counts"), "missing field 'counts'"),
    (lambda d: d.update(colour="red"), "unknown field 'colour'"),
    (lambda d: d["counts"][0].update(at=[120]), "at must be [x, y] in mm"),
    (lambda d: d["counts"][0].update(digits=0), "digits must be 1-7"),
    (lambda d: d["counts"][0].update(digits="3"), "digits must be a whole number"),
    (lambda d: d["counts"][1].update(id="candidate_a"), "count id 'candidate_a' is given twice"),
    (lambda d: d["counts"][1].update(at=[125, 45]), "overlap those of 'candidate_a'"),
    (lambda d: d["counts"][0].update(at=[175, 40]), "leave the 180 x 250 mm frame"),
    (lambda d: d["checks"][0].update(equals="spoilt"), "names no count 'spoilt'"),
    (lambda d: d["checks"][0].update(sum=["valid"]), "names a count twice"),
    (lambda d: d.update(empty_box="dash"), "empty_box must be one of blank, zero"),
    (lambda d: d["box"].update(width="wide"), "box width must be a number"),
])
def test_a_broken_form_description_is_one_line_naming_the_field(change, message):
    import yaml

    document = yaml.safe_load(layout.Path(layout.__file__).with_name("tally.yaml").read_text())
    change(document)
    with pytest.raises(layout.FormError, match=None) as caught:
        layout.from_dict(document, "tally.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith("tally.yaml")


def test_a_form_file_that_is_not_yaml_or_too_large_or_missing_is_one_line(tmp_path):
    broken = tmp_path / "form.yaml"
    broken.write_text("counts: [\n  - {id: a")
    with pytest.raises(layout.FormError, match=r"form.yaml: not YAML at line \d+$"):
        layout.load(broken)
    large = tmp_path / "large.json"
    large.write_text(" " * (layout.MAX_FILE_BYTES + 1))
    with pytest.raises(layout.FormError, match="at most 64 KiB"):
        layout.load(large)
    with pytest.raises(layout.FormError, match="no such form description"):
        layout.load(tmp_path / "missing.yaml")
    as_json = tmp_path / "form.json"
    import yaml

    as_json.write_text(json.dumps(yaml.safe_load(layout.Path(layout.__file__).with_name("tally.yaml").read_text())))
    assert layout.load(as_json) == FORM
