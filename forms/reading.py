"""From the model's answers for a sheet's cells to counts, arithmetic checks and a verdict.

Plain logic on `serving.answers.Answer`s: no image and no server here. A count is read only from boxes
the model accepted; an arithmetic check that fails is never corrected silently: the readings that
would satisfy every check, made from the model's other choices for the cells it was unsure of, are
offered to a person as suggestions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from forms.layout import EMPTY_ZERO, Form
from serving.answers import Answer

# Alternatives considered for an uncertain cell: its most probable digits, down to this share of the top
# one's probability (a 3/8 confusion, not every digit), at most MAX_CHOICES of them.
MAX_CHOICES = 3
MIN_RELATIVE_PROBABILITY = 0.01
# Readings of one count kept for the search (most probable first) and combinations tried at most: a
# sheet's counts x their readings. Enough for several unsure cells per count on a form of 7-20 counts.
MAX_READINGS_PER_COUNT = 8
MAX_COMBINATIONS = 200_000
MAX_SUGGESTIONS = 3


@dataclass(frozen=True)
class CellReading:
    """One box: blank (no ink found on the sheet), or the model's answer for its digit."""

    answer: Answer | None  # None for a blank box

    @property
    def blank(self) -> bool:
        return self.answer is None

    @property
    def accepted(self) -> bool:
        """The model stands by its digit. A model exported without abstention outputs never does."""
        return self.answer is not None and self.answer.accepted is True

    def choices(self) -> list[tuple[int, float]]:
        """(digit, probability), most probable first: the digit alone when accepted, else the close ones."""
        if self.answer is None:
            return []
        if self.accepted:
            return [(self.answer.digit, self.answer.confidence)]
        ranked = sorted(enumerate(self.answer.probabilities), key=lambda item: item[1], reverse=True)
        top = ranked[0][1]
        return [(digit, p) for digit, p in ranked[:MAX_CHOICES] if p >= top * MIN_RELATIVE_PROBABILITY]

    def describe(self) -> str:
        return "blank" if self.answer is None else self.answer.describe()


@dataclass(frozen=True)
class CountReading:
    count_id: str
    label: str
    cells: tuple[CellReading, ...]
    value: int | None  # None when no number can be read without a person
    problems: tuple[str, ...]  # why a person must look at this count; empty when accepted
    review_cells: tuple[int, ...]  # the boxes (0 = leftmost) a person should look at

    @property
    def accepted(self) -> bool:
        return self.value is not None and not self.problems

    def readings(self, empty_box: str) -> list[tuple[int, float]]:
        """(value, probability) of the count's possible readings, most probable first."""
        digit_choices = []
        for cell in self.cells:
            if cell.blank:
                digit_choices.append([(None, 1.0)])
            else:
                digit_choices.append(cell.choices())
        readings: dict[int, float] = {}
        for combination in itertools.product(*digit_choices):
            value = assemble([digit for digit, _ in combination], empty_box)[0]
            if value is None:
                continue
            probability = math.prod(p for _, p in combination)
            readings[value] = max(readings.get(value, 0.0), probability)
        return sorted(readings.items(), key=lambda item: item[1], reverse=True)[:MAX_READINGS_PER_COUNT]


def assemble(digits: list[int | None], empty_box: str) -> tuple[int | None, str | None]:
    """The number the boxes spell, or None and why: an empty box inside a number, or no digit at all."""
    if empty_box == EMPTY_ZERO:
        return int("".join(str(d or 0) for d in digits)), None
    written = [index for index, digit in enumerate(digits) if digit is not None]
    if not written:
        return None, "no digit written"
    first, last = written[0], written[-1]
    if last != len(digits) - 1:
        return None, "the units box is empty (a number is written to the right)"
    if len(written) != last - first + 1:
        return None, "an empty box between digits"
    return int("".join(str(digits[index]) for index in written)), None


def read_count(count_id: str, label: str, cells: list[CellReading], empty_box: str) -> CountReading:
    problems, review = [], []
    for index, cell in enumerate(cells):
        if cell.blank:
            continue
        if cell.answer.decision == "not_a_digit":
            problems.append(f"box {index + 1}: not a digit")
            review.append(index)
        elif not cell.accepted:
            problems.append(f"box {index + 1}: {cell.describe()}")
            review.append(index)
    value, why = assemble([None if cell.blank else cell.answer.digit for cell in cells], empty_box)
    if why is not None:
        problems.append(why)
        review.extend(index for index, cell in enumerate(cells) if cell.blank and index not in review)
    return CountReading(count_id, label, tuple(cells), value if not problems else None,
                        tuple(problems), tuple(sorted(set(review))))


@dataclass(frozen=True)
class CheckResult:
    name: str
    equation: str  # "candidate_a + candidate_b = valid"
    holds: bool | None  # None: a count it needs could not be read
    left: int | None = None  # the sum of the terms as read
    right: int | None = None  # the total as read


@dataclass(frozen=True)
class Suggestion:
    """Readings that satisfy every check, made from the model's other choices: for a person to confirm."""

    values: dict[str, int]
    changes: dict[str, tuple[int | None, int]]  # count id -> (as read, suggested)
    probability: float  # of the cells' readings, relative among the suggestions


@dataclass
class SheetReading:
    form: Form
    counts: dict[str, CountReading]
    checks: list[CheckResult] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        """Accepted without a person: every count read from accepted boxes and every check holds."""
        return all(count.accepted for count in self.counts.values()) and all(c.holds for c in self.checks)

    @property
    def inconsistent(self) -> bool:
        """A check fails on counts read without doubt: the numbers written on the form do not add up."""
        return any(check.holds is False for check in self.checks)

    def to_review(self) -> dict[str, tuple[int, ...]]:
        """The boxes a person should look at, by count: those the count needs, and every written box of
        the counts in a check that fails (one of them is wrong, or the form itself is)."""
        failing = {count_id for rule, result in zip(self.form.checks, self.checks) if result.holds is False
                   for count_id in (*rule.terms, rule.total)}
        return {count_id: tuple(sorted(set(count.review_cells) | (
                    {i for i, cell in enumerate(count.cells) if not cell.blank} if count_id in failing else set())))
                for count_id, count in self.counts.items()}

    def values(self) -> dict[str, int | None]:
        return {count_id: count.value for count_id, count in self.counts.items()}

    def to_dict(self) -> dict:
        review = self.to_review()
        return {
            "form": self.form.name,
            "accepted": self.accepted,
            "counts": {count_id: {
                "label": count.label, "value": count.value, "accepted": count.accepted,
                "problems": list(count.problems), "review_boxes": [i + 1 for i in review[count_id]],
                "boxes": [None if cell.blank else {
                    "digit": cell.answer.digit, "confidence": round(cell.answer.confidence, 4),
                    "decision": cell.answer.decision, "runner_up": cell.answer.runner_up,
                } for cell in count.cells]} for count_id, count in self.counts.items()},
            "checks": [{"name": check.name, "equation": check.equation, "holds": check.holds, "sum": check.left,
                        "total": check.right} for check in self.checks],
            "suggestions": [{"values": s.values, "changes": {k: list(v) for k, v in s.changes.items()},
                             "probability": round(s.probability, 4)} for s in self.suggestions],
        }


def check(form: Form, values: dict[str, int | None]) -> list[CheckResult]:
    results = []
    for rule in form.checks:
        needed = [*rule.terms, rule.total]
        if any(values.get(count_id) is None for count_id in needed):
            results.append(CheckResult(rule.name, rule.describe(), None))
            continue
        left = sum(values[term] for term in rule.terms)
        results.append(CheckResult(rule.name, rule.describe(), left == values[rule.total], left, values[rule.total]))
    return results


def suggest(form: Form, counts: dict[str, CountReading]) -> list[Suggestion]:
    """The most probable readings that satisfy every check, changing only what the model was unsure of.

    Counts read without doubt keep their value; the others range over their possible readings (each
    uncertain cell's close alternatives). Nothing is suggested when the checks already hold as read,
    when no combination satisfies them (then the form itself does not add up), or when the search
    would be too large to be exhaustive (better no suggestion than the wrong one).
    """
    involved = sorted({count_id for rule in form.checks for count_id in (*rule.terms, rule.total)},
                      key=[c.id for c in form.counts].index)
    options: dict[str, list[tuple[int, float]]] = {}
    for count_id in involved:
        count = counts[count_id]
        options[count_id] = ([(count.value, 1.0)] if count.accepted else count.readings(form.empty_box))
        if not options[count_id]:
            return []
    if math.prod(len(choices) for choices in options.values()) > MAX_COMBINATIONS:
        return []
    found = []
    for combination in itertools.product(*(options[count_id] for count_id in involved)):
        values = dict(zip(involved, (value for value, _ in combination)))
        if all(result.holds for result in check(form, values)):
            found.append((math.prod(p for _, p in combination), values))
    if not found:
        return []
    found.sort(key=lambda item: item[0], reverse=True)
    total = sum(probability for probability, _ in found)
    suggestions = []
    for probability, values in found[:MAX_SUGGESTIONS]:
        changes = {count_id: (counts[count_id].value, value) for count_id, value in values.items()
                   if counts[count_id].value != value}
        if changes:
            suggestions.append(Suggestion(values, changes, probability / total))
    return suggestions


def read_sheet(form: Form, cells: dict[str, list[CellReading]]) -> SheetReading:
    """Counts, checks and suggestions for one sheet from its cells' readings (every count of the form)."""
    missing = [count.id for count in form.counts if count.id not in cells]
    if missing:
        raise ValueError(f"no cells for count {missing[0]!r}")
    counts = {count.id: read_count(count.id, count.label, cells[count.id], form.empty_box) for count in form.counts}
    sheet = SheetReading(form, counts, check(form, {k: c.value for k, c in counts.items()}))
    if not all(result.holds for result in sheet.checks):
        sheet.suggestions = suggest(form, counts)
    return sheet
