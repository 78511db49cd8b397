"""The tally sheets' review queue (web/sheet_queue.py): sheets a person must look at, kept whole until a
reviewer confirms every box or rejects the photo; the boxes the reviewer read become training digits through
the feedback store's reviewed path, and a build trains on them and on nothing else of the queue.

Plain files in a temporary directory: no server (tests/test_web_forms.py drives the same queue over HTTP).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from data import contract
from forms import layout, reading
from form_sheets import FORM_YAML
from serving.answers import Answer
from web.feedback import FeedbackStore
from web.sheet_queue import BadReview, NotPending, QueueFull, SheetQueue, sheet_id

REVIEWER = "web review page (127.0.0.1)"


@pytest.fixture
def form(tmp_path) -> layout.Form:
    path = tmp_path / "ballots.yaml"
    path.write_text(FORM_YAML)
    return layout.load(path)


def _picture(seed: int) -> tuple[tuple[float, ...], ...]:
    """A distinct 28x28 image per seed (a bar at row seed % 28), as the model's normalized_image."""
    return tuple(tuple(1.0 if y == seed % 28 + 0 and 4 <= x < 4 + seed // 28 + 6 else 0.0 for x in range(28))
                 for y in range(28))


def _answer(digit: int, seed: int, decision: str = "accepted", confidence: float = 0.99,
            runner_up: int | None = None) -> Answer:
    probabilities = [0.0] * 10
    probabilities[digit] = confidence
    probabilities[runner_up if runner_up is not None else (digit + 1) % 10] = 1 - confidence
    return Answer(digit, confidence, tuple(probabilities), ink_fraction=0.2, normalized_image=_picture(seed),
                  decision=decision, model_version=3)


def _sheet(form: layout.Form, issued: str, counted: str, unsure: dict[tuple[str, int], int] = (),
           seed: int = 0) -> reading.SheetReading:
    """A reading of the ballot form: " 77" is an empty box and two accepted 7s; unsure={("issued", 1): 8}
    makes that box an unsure answer with 8 as its other choice."""
    unsure = dict(unsure)
    cells = {}
    for count_id, text in (("issued", issued), ("counted", counted)):
        cells[count_id] = [
            reading.CellReading(None) if char == " " else reading.CellReading(
                _answer(int(char), seed * 10 + index + (3 if count_id == "counted" else 0), "unsure", 0.55,
                        unsure[(count_id, index)]) if (count_id, index) in unsure
                else _answer(int(char), seed * 10 + index + (3 if count_id == "counted" else 0)))
            for index, char in enumerate(text)]
    return reading.read_sheet(form, cells)


def _queue(tmp_path: Path, form: layout.Form, **caps) -> SheetQueue:
    feedback = FeedbackStore(tmp_path / "feedback")
    return SheetQueue(tmp_path / "feedback" / contract.SHEETS_DIR, form, feedback, **caps)


def _add(queue: SheetQueue, sheet: reading.SheetReading, photo: bytes, client: str = "10.0.0.1"):
    document = {**sheet.to_dict(), "verdict": "needs_review", "marked": "data:..."}
    return queue.add(photo, document, sheet, Image.new("RGB", (40, 30), "white"), client=client, model_name="digits",
                     model_version=3)


def test_a_sheet_waits_whole_and_once(tmp_path, form):
    queue = _queue(tmp_path, form)
    sheet = _sheet(form, " 77", " 77", unsure={("issued", 1): 1})
    first = _add(queue, sheet, b"photo one")
    assert first.new and first.state == "pending" and first.id == sheet_id(b"photo one")
    again = _add(queue, sheet, b"photo one", client="10.0.0.2")
    assert not again.new and again.id == first.id
    directory = queue.root / "pending" / first.id
    assert sorted(path.name for path in directory.iterdir()) == ["cells", "marked.jpg", "sheet.json"]
    # A cell per written box, the 28x28 image the model classified; the empty boxes have none.
    assert sorted(path.name for path in (directory / "cells").iterdir()) == [
        "counted.2.png", "counted.3.png", "issued.2.png", "issued.3.png"]
    with Image.open(directory / "cells" / "issued.2.png") as cell:
        assert cell.size == (28, 28) and cell.mode == "L"
    record = json.loads((directory / "sheet.json").read_text())
    assert record["reading"]["counts"]["issued"]["review_boxes"] == [2] and "marked" not in record["reading"]
    assert queue.counts() == {"pending": 1, "confirmed": 0, "rejected": 0}
    assert [p["id"] for p in queue.pending()] == [first.id] and queue.pending()[0]["boxes_to_check"] == 1
    assert queue.oldest() == record["queued_at"]
    assert not [path for path in queue.root.iterdir() if path.name.startswith(".incoming")]


def test_the_queue_is_capped_in_all_and_per_client(tmp_path, form):
    queue = _queue(tmp_path, form, max_pending=3, pending_per_client=2)
    sheet = _sheet(form, " 77", " 77", unsure={("issued", 1): 1})
    _add(queue, sheet, b"a", client="10.0.0.1")
    _add(queue, sheet, b"b", client="10.0.0.1")
    with pytest.raises(QueueFull, match="2 sheets from this address already wait"):
        _add(queue, sheet, b"c", client="10.0.0.1")
    _add(queue, sheet, b"c", client="10.0.0.2")
    with pytest.raises(QueueFull, match=r"the sheet review queue is full \(3 sheets wait"):
        _add(queue, sheet, b"d", client="10.0.0.3")
    queue.review(sheet_id(b"a"), "rejected", reviewer=REVIEWER)  # a review makes room
    assert _add(queue, sheet, b"d", client="10.0.0.3").new


def test_a_confirmed_sheet_records_the_persons_counts_and_teaches_only_what_the_model_doubted(tmp_path, form):
    """Box 2 of `issued` was unsure (1 or 7) and the person reads 7; box 3 of `counted` the model stood by as 7
    and the person reads 1; the other boxes the model stood by and the person left alone."""
    queue = _queue(tmp_path, form)
    sheet = _sheet(form, " 17", " 77", unsure={("issued", 1): 7})
    queued = _add(queue, sheet, b"photo")
    decision = queue.review(queued.id, "confirmed", reviewer=REVIEWER,
                            boxes={"issued": [None, 7, 7], "counted": [None, 7, 1]})
    assert decision["values"] == {"issued": 77, "counted": 71}
    assert decision["checks"] == [{"name": "every ballot issued is counted", "equation": "counted = issued",
                                   "holds": False, "sum": 71, "total": 77}]  # as written: a person's to escalate
    assert decision["changed"] == [{"count": "issued", "box": 2, "read": 1, "confirmed": 7},
                                   {"count": "counted", "box": 3, "read": 7, "confirmed": 1}]
    feedback = tmp_path / "feedback"
    trained = sorted(path.relative_to(feedback).as_posix() for path in (feedback / "training").rglob("*.png"))
    assert len(trained) == 2 == len(decision["training"])
    assert sorted(path.split("/")[1] for path in trained) == ["1", "7"]
    reviews = [json.loads(line) for line in (feedback / "reviews.jsonl").read_text().splitlines()]
    assert {(r["verdict"], r["digit"], r["reviewer"]) for r in reviews} == {("accepted", 7, REVIEWER),
                                                                             ("accepted", 1, REVIEWER)}
    corrections = [json.loads(line) for line in (feedback / "feedback.jsonl").read_text().splitlines()]
    assert {(c["predicted"], c["corrected"], c["decision"], c["client"]) for c in corrections} == {
        (1, 7, "unsure", f"sheet {queued.id}"), (7, 1, "accepted", f"sheet {queued.id}")}
    # The stored digit is the model's own image of the box, byte for byte the cell kept with the sheet.
    kept = queue.root / "confirmed" / queued.id / "cells" / "issued.2.png"
    assert (feedback / next(p for p in trained if p.startswith("training/7/"))).read_bytes() == kept.read_bytes()
    assert queue.counts() == {"pending": 0, "confirmed": 1, "rejected": 0} and queue.oldest() is None
    assert queue.decisions() == [decision]
    with pytest.raises(NotPending, match="no sheet"):
        queue.review(queued.id, "confirmed", reviewer=REVIEWER, boxes={"issued": [None, 7, 7], "counted": [None, 7, 7]})


def test_a_build_trains_on_the_confirmed_boxes_and_on_nothing_else_of_the_queue(tmp_path, form, small_tree):
    from tfrecord_builder.builder import build
    from tfrecord_builder.config import BuildConfig

    tree = small_tree(train_per_class=4, test_per_class=2)
    queue = _queue(tmp_path, form)
    confirmed = _add(queue, _sheet(form, " 17", " 77", unsure={("issued", 1): 7}), b"one")
    _add(queue, _sheet(form, " 77", " 71", unsure={("counted", 2): 7}, seed=1), b"two")  # still waiting
    queue.review(confirmed.id, "confirmed", reviewer=REVIEWER, boxes={"issued": [None, 7, 7], "counted": [None, 7, 7]})
    plain = build(BuildConfig(source=tree, output=tmp_path / "plain", workers=1)).manifest
    extra = build(BuildConfig(source=tree, output=tmp_path / "extra", workers=1,
                              extra_sources=(tmp_path / "feedback",))).manifest
    assert extra["extra_sources"][0]["corrections"] == {"accepted": 1, "pending": 0, "rejected": 0}
    assert extra["counts"]["rejected"] == 0  # sheets/ is neither read nor reported as bad files
    assert extra["splits"]["train"]["examples"] == plain["splits"]["train"]["examples"] + 1
    assert extra["splits"]["train"]["per_class"]["7"] == plain["splits"]["train"]["per_class"]["7"] + 1


def test_a_rejected_sheet_counts_nothing_and_teaches_nothing(tmp_path, form):
    queue = _queue(tmp_path, form)
    queued = _add(queue, _sheet(form, " 17", " 77", unsure={("issued", 1): 7}), b"photo")
    decision = queue.review(queued.id, "rejected", reviewer=REVIEWER)
    assert decision["verdict"] == "rejected" and "values" not in decision
    assert (queue.root / "rejected" / queued.id / "sheet.json").is_file()
    assert not (tmp_path / "feedback" / "training").exists()
    assert _add(queue, _sheet(form, " 17", " 77"), b"photo").state == "rejected"  # sent again: not queued again


@pytest.mark.parametrize("boxes, message", [
    (None, 'give "boxes"'),
    ({"issued": [None, 7, 7]}, "count 'counted' needs a list of its 3 boxes"),
    ({"issued": [None, 7, 7], "counted": [7, 7]}, "count 'counted' needs a list of its 3 boxes"),
    ({"issued": [None, 7, 7], "counted": [None, 7, 10]}, "a box is a digit 0-9 or null, got 10"),
    ({"issued": [None, 7, 7], "counted": [None, True, 7]}, "a box is a digit 0-9 or null, got True"),
    ({"issued": [None, 7, 7], "counted": [None, "7", 7]}, "a box is a digit 0-9 or null, got '7'"),
    ({"issued": [None, 7, 7], "counted": [None, 7, 7], "spoilt": [1]}, "the form has no count 'spoilt'"),
    ({"issued": [7, None, 7], "counted": [None, 7, 7]}, "Ballots issued: an empty box between digits"),
    ({"issued": [None, 7, None], "counted": [None, 7, 7]}, "Ballots issued: the units box is empty"),
])
def test_a_review_that_does_not_fit_the_form_is_one_line_and_changes_nothing(tmp_path, form, boxes, message):
    queue = _queue(tmp_path, form)
    queued = _add(queue, _sheet(form, " 17", " 77", unsure={("issued", 1): 7}), b"photo")
    with pytest.raises(BadReview, match=message) as raised:
        queue.review(queued.id, "confirmed", reviewer=REVIEWER, boxes=boxes)
    assert "\n" not in str(raised.value)
    assert queue.counts()["pending"] == 1 and not (tmp_path / "feedback" / "training").exists()
    with pytest.raises(BadReview, match="a verdict is confirmed or rejected"):
        queue.review(queued.id, "accepted", reviewer=REVIEWER)


def test_nothing_written_is_recorded_as_nothing_and_its_checks_cannot_be_made(tmp_path, form):
    queue = _queue(tmp_path, form)
    queued = _add(queue, _sheet(form, " 17", " 77", unsure={("issued", 1): 7}), b"photo")
    decision = queue.review(queued.id, "confirmed", reviewer=REVIEWER,
                            boxes={"issued": [None, None, None], "counted": [None, 7, 7]})
    assert decision["values"] == {"issued": None, "counted": 77}
    assert decision["checks"][0]["holds"] is None


def test_a_sheet_read_as_another_form_is_not_reviewed_as_this_one(tmp_path, form):
    queue = _queue(tmp_path, form)
    queued = _add(queue, _sheet(form, " 17", " 77", unsure={("issued", 1): 7}), b"photo")
    other = SheetQueue(queue.root, layout.tally_form(), queue.feedback)
    with pytest.raises(BadReview, match="was read as form 'ballot-account'; this app serves 'polling-station-tally'"):
        other.review(queued.id, "rejected", reviewer=REVIEWER)


def test_a_failed_log_write_puts_the_sheet_back(tmp_path, form):
    queue = _queue(tmp_path, form)
    queued = _add(queue, _sheet(form, " 17", " 77", unsure={("issued", 1): 7}), b"photo")
    (queue.root / "reviews.jsonl").mkdir()  # the log cannot be appended to
    with pytest.raises(OSError):
        queue.review(queued.id, "rejected", reviewer=REVIEWER)
    assert queue.counts() == {"pending": 1, "confirmed": 0, "rejected": 0}


def test_two_reviewers_at_once_decide_a_sheet_once(tmp_path, form):
    queue = _queue(tmp_path, form)
    queued = _add(queue, _sheet(form, " 17", " 77", unsure={("issued", 1): 7}), b"photo")
    # Two processes' queues on one directory: the lock file, not the in-process lock, serialises them.
    queues = [queue, SheetQueue(queue.root, form, FeedbackStore(tmp_path / "feedback"))]
    start, outcomes = threading.Barrier(2), []

    def review(index: int) -> None:
        start.wait()
        try:
            queues[index].review(queued.id, "confirmed", reviewer=f"reviewer {index}",
                                 boxes={"issued": [None, 7, 7], "counted": [None, 7, 7]})
            outcomes.append("saved")
        except NotPending:
            outcomes.append("not pending")

    threads = [threading.Thread(target=review, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["not pending", "saved"]
    assert len(queue.decisions()) == 1
    assert len(list((tmp_path / "feedback" / "training").rglob("*.png"))) == 1


def test_symlinks_lead_nowhere_outside_the_directory(tmp_path, form):
    queue = _queue(tmp_path, form)
    outside = tmp_path / "outside"
    outside.mkdir()
    queue.root.mkdir(parents=True)
    (queue.root / "pending").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="leads outside the sheets directory"):
        _add(queue, _sheet(form, " 17", " 77", unsure={("issued", 1): 7}), b"photo")
    assert list(outside.iterdir()) == []
