"""The form description: where a tally form's counts are written and which counts must add up.

A form is described once, in a small YAML (or JSON) file, and that one description is used to print
the blank form, to generate test sheets and to read filled ones. Positions are millimetres from the
top-left corner of the form's printed frame, measured with a ruler on the blank form, so that the
description does not depend on the resolution of a scan. See docs/forms.md for the format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# The canonical image a sheet is warped to before its boxes are cut: its frame at this many pixels per
# millimetre. At 8 px/mm a 10 mm box is 80 px: several times MNIST's 28 px, so a cell survives a blurred
# photo, and small enough that a sheet stays a few megabytes.
PX_PER_MM = 8.0

EMPTY_BLANK = "blank"  # an empty box is no digit: a count with an empty box inside it needs a person
EMPTY_ZERO = "zero"  # an empty box reads 0 (forms that tell people to leave zeros out)
EMPTY_BOX_RULES = (EMPTY_BLANK, EMPTY_ZERO)

_ID = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_DIGITS = 7  # per count: up to 9,999,999 (a count on one form, not a national total)
MAX_FILE_BYTES = 64 * 1024


class FormError(ValueError):
    """A form description that cannot be used; the message is one line naming the file and the field."""


@dataclass(frozen=True)
class Box:
    """One digit box in millimetres from the frame's top-left corner."""

    x: float
    y: float
    width: float
    height: float

    def pixels(self, px_per_mm: float = PX_PER_MM) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in the canonical image, right and bottom exclusive."""
        return (round(self.x * px_per_mm), round(self.y * px_per_mm),
                round((self.x + self.width) * px_per_mm), round((self.y + self.height) * px_per_mm))


@dataclass(frozen=True)
class Count:
    """A number written one digit per box, most significant digit first."""

    id: str
    label: str
    digits: int
    x: float  # the first box's top-left corner
    y: float

    def boxes(self, box_width: float, box_height: float, gap: float) -> tuple[Box, ...]:
        return tuple(Box(self.x + i * (box_width + gap), self.y, box_width, box_height) for i in range(self.digits))

    @property
    def largest(self) -> int:
        return 10 ** self.digits - 1


@dataclass(frozen=True)
class Check:
    """The sum of some counts equals another count: the arithmetic the form itself guarantees."""

    name: str
    terms: tuple[str, ...]
    total: str

    def describe(self) -> str:
        return f"{' + '.join(self.terms)} = {self.total}"


@dataclass(frozen=True)
class Form:
    name: str
    title: str
    frame_width: float  # the printed frame, in mm
    frame_height: float
    box_width: float
    box_height: float
    box_gap: float  # between the boxes of one count; 0: they share their sides, as on most forms
    empty_box: str
    counts: tuple[Count, ...]
    checks: tuple[Check, ...]

    def count(self, count_id: str) -> Count:
        for count in self.counts:
            if count.id == count_id:
                return count
        raise KeyError(count_id)

    def boxes(self, count_id: str) -> tuple[Box, ...]:
        return self.count(count_id).boxes(self.box_width, self.box_height, self.box_gap)

    def canonical_size(self, px_per_mm: float = PX_PER_MM) -> tuple[int, int]:
        """(width, height) in pixels of the frame-warped sheet."""
        return round(self.frame_width * px_per_mm), round(self.frame_height * px_per_mm)

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise FormError(f"form {self.name!r}: {problems[0]}")


def _problems(form: Form) -> list[str]:
    problems = []
    if not (20 <= form.frame_width <= 600 and 20 <= form.frame_height <= 900):
        problems.append(f"frame must be 20-600 mm wide and 20-900 mm high, got {form.frame_width:g} x "
                        f"{form.frame_height:g}")
    if not (4 <= form.box_width <= 40 and 4 <= form.box_height <= 40):
        problems.append(f"boxes must be 4-40 mm on each side, got {form.box_width:g} x {form.box_height:g}")
    if not 0 <= form.box_gap <= 40:
        problems.append(f"box gap must be 0-40 mm, got {form.box_gap:g}")
    if form.empty_box not in EMPTY_BOX_RULES:
        problems.append(f"empty_box must be one of {', '.join(EMPTY_BOX_RULES)}, got {form.empty_box!r}")
    if not form.counts:
        problems.append("a form needs at least one count")
    ids = [count.id for count in form.counts]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        problems.append(f"count id {duplicated[0]!r} is given twice")
    placed: list[tuple[str, Box]] = []
    for count in form.counts:
        if not _ID.match(count.id):
            problems.append(f"count id {count.id!r} must be lower-case letters, digits and _ (a letter first)")
        if not 1 <= count.digits <= MAX_DIGITS:
            problems.append(f"count {count.id!r}: digits must be 1-{MAX_DIGITS}, got {count.digits}")
            continue
        for box in count.boxes(form.box_width, form.box_height, form.box_gap):
            if box.x < 0 or box.y < 0 or box.x + box.width > form.frame_width or box.y + box.height > form.frame_height:
                problems.append(f"count {count.id!r}: its boxes leave the {form.frame_width:g} x "
                                f"{form.frame_height:g} mm frame")
                break
            overlapping = next((other for other, placed_box in placed if _overlap(box, placed_box)), None)
            if overlapping is not None and overlapping != count.id:
                problems.append(f"count {count.id!r}: its boxes overlap those of {overlapping!r}")
                break
            placed.append((count.id, box))
    known = set(ids)
    for check in form.checks:
        named = [*check.terms, check.total]
        unknown = [name for name in named if name not in known]
        if unknown:
            problems.append(f"check {check.name!r} names no count {unknown[0]!r}")
        elif len(set(named)) != len(named):
            problems.append(f"check {check.name!r} names a count twice")
        elif not check.terms:
            problems.append(f"check {check.name!r} sums no counts")
    return problems


def _overlap(a: Box, b: Box) -> bool:
    return a.x < b.x + b.width and b.x < a.x + a.width and a.y < b.y + b.height and b.y < a.y + a.height


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormError(f"{where} must be a number, got {value!r}")
    return float(value)


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise FormError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _only(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise FormError(f"{where}: unknown field {unknown[0]!r} (expected {', '.join(sorted(allowed))})")


def from_dict(document, source: str = "form") -> Form:
    """A Form from a parsed description; FormError names the first problem in one line."""
    document = _mapping(document, source)
    _only(document, {"name", "title", "frame", "box", "empty_box", "counts", "checks"}, source)
    try:
        frame = _mapping(document["frame"], f"{source}: frame")
        box = _mapping(document["box"], f"{source}: box")
        counts = document["counts"]
    except KeyError as missing:
        raise FormError(f"{source}: missing field {missing.args[0]!r}") from None
    _only(frame, {"width", "height"}, f"{source}: frame")
    _only(box, {"width", "height", "gap"}, f"{source}: box")
    if not isinstance(counts, list):
        raise FormError(f"{source}: counts must be a list")
    parsed_counts = []
    for index, count in enumerate(counts):
        where = f"{source}: counts[{index}]"
        count = _mapping(count, where)
        _only(count, {"id", "label", "digits", "at"}, where)
        at = count.get("at")
        if not (isinstance(at, list) and len(at) == 2):
            raise FormError(f"{where}: at must be [x, y] in mm from the frame's top-left corner, got {at!r}")
        digits = count.get("digits")
        if isinstance(digits, bool) or not isinstance(digits, int):
            raise FormError(f"{where}: digits must be a whole number, got {digits!r}")
        count_id = count.get("id")
        if not isinstance(count_id, str):
            raise FormError(f"{where}: id must be text, got {count_id!r}")
        parsed_counts.append(Count(id=count_id, label=str(count.get("label", count_id)), digits=digits,
                                   x=_number(at[0], f"{where}: at[0]"), y=_number(at[1], f"{where}: at[1]")))
    parsed_checks = []
    for index, check in enumerate(document.get("checks") or []):
        where = f"{source}: checks[{index}]"
        check = _mapping(check, where)
        _only(check, {"name", "sum", "equals"}, where)
        terms, total = check.get("sum"), check.get("equals")
        if not (isinstance(terms, list) and all(isinstance(term, str) for term in terms)):
            raise FormError(f"{where}: sum must be a list of count ids, got {terms!r}")
        if not isinstance(total, str):
            raise FormError(f"{where}: equals must be a count id, got {total!r}")
        name = str(check.get("name", f"{' + '.join(terms)} = {total}"))
        parsed_checks.append(Check(name=name, terms=tuple(terms), total=total))
    try:
        return Form(
            name=str(document.get("name", "form")),
            title=str(document.get("title", "")),
            frame_width=_number(frame.get("width"), f"{source}: frame width"),
            frame_height=_number(frame.get("height"), f"{source}: frame height"),
            box_width=_number(box.get("width"), f"{source}: box width"),
            box_height=_number(box.get("height"), f"{source}: box height"),
            box_gap=_number(box.get("gap", 0), f"{source}: box gap"),
            empty_box=str(document.get("empty_box", EMPTY_BLANK)),
            counts=tuple(parsed_counts),
            checks=tuple(parsed_checks),
        )
    except FormError as error:
        raise FormError(f"{source}: {error}") from None


def load(path: Path | str) -> Form:
    """Reads a form description (.yaml, .yml or .json)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise FormError(f"{path}: a form description is at most {MAX_FILE_BYTES // 1024} KiB")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormError(f"{path}: no such form description") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FormError(f"{path}: cannot read it ({type(error).__name__})") from None
    try:
        if path.suffix.lower() == ".json":
            document = json.loads(text)
        else:
            import yaml

            document = yaml.safe_load(text)
    except ValueError as error:  # json.JSONDecodeError
        raise FormError(f"{path}: not JSON ({error})") from None
    except Exception as error:  # yaml.YAMLError, without importing yaml for JSON files
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise FormError(f"{path}: not YAML{where}") from None
    return from_dict(document, str(path))


def tally_form() -> Form:
    """The project's example: a polling station's tally (forms/tally.yaml), the form the benchmark fills."""
    return load(Path(__file__).with_name("tally.yaml"))
