"""Tally sheets waiting for a person: what POST /api/read-sheet could not accept, until a reviewer confirms
or corrects every box on the token-protected page (/review/sheets), or says the photo cannot be read.

    <feedback-dir>/sheets/pending/<id>/sheet.json     the reading as the app answered it, the form, when, from whom
    <feedback-dir>/sheets/pending/<id>/marked.jpg     the photo with every box outlined (red: look at it)
    <feedback-dir>/sheets/pending/<id>/cells/<count>.<box>.png   the 28x28 image the model classified, per written box
    <feedback-dir>/sheets/confirmed/<id>/...          moved here once a person confirmed every box
    <feedback-dir>/sheets/rejected/<id>/...           moved here when a person said it is not a readable sheet
    <feedback-dir>/sheets/reviews.jsonl               one JSON object per decision: the counts as the person read
                                                      them, the checks on those counts, the boxes changed

`<id>` is the first 24 hex digits of the SHA-256 of the photo as sent: the same photo sent twice waits once.
A sheet is written whole into a hidden directory and renamed into pending/, so a reader never sees half of
one. The queue is capped in total and per client: the page is public, and a flood must fill a bounded queue
for a reviewer to reject, not the disk (a sheet takes about 200 KB).

The boxes a person reads become training digits through the feedback store's reviewed path
(web/feedback.py `add_reviewed`: training/<digit>/, with its lines in feedback.jsonl and reviews.jsonl): every
box the model was unsure of, and every box the person read differently from the model. A box the model stood
by and the person left as it was teaches nothing new and is not stored. The builder never reads sheets/.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from data import contract
from forms import layout, reading
from monitoring import names as n
from web.feedback import FeedbackStore, append_line, digit_png, read_lines, sync_directory

HASH_CHARS = 24
PENDING = "pending"
STATES = (PENDING, n.SHEET_CONFIRMED, n.SHEET_REJECTED)
SHEET_FILE = "sheet.json"
MARKED_FILE = "marked.jpg"
CELLS_DIR = "cells"
LOG_NAME = "reviews.jsonl"
LOCK_NAME = ".lock"
MARKED_JPEG_QUALITY = 85
_ID = re.compile(rf"[0-9a-f]{{{HASH_CHARS}}}")


class QueueFull(Exception):
    """No room for another sheet: in total, or from this client."""


class NotPending(Exception):
    """A review of a sheet that waits for none (unknown, or reviewed already)."""


class BadReview(ValueError):
    """A review that does not fit the sheet's form: one line for the reviewer."""


@dataclass(frozen=True)
class Queued:
    id: str
    state: str  # pending for a sheet just queued; where it is for one sent before
    new: bool


def sheet_id(photo: bytes) -> str:
    return hashlib.sha256(photo).hexdigest()[:HASH_CHARS]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class SheetQueue:
    """One form's sheets in one directory. Thread-safe, and safe beside another process using the same
    directory: every change holds a lock file."""

    def __init__(self, root: Path, form: layout.Form, feedback: FeedbackStore, *, max_pending: int = 1000,
                 pending_per_client: int = 50):
        self.root = Path(root)
        self.form = form
        self.feedback = feedback
        self.max_pending = max_pending
        self.pending_per_client = pending_per_client
        self._lock = threading.Lock()

    @contextmanager
    def _locked(self):
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = self.root / LOCK_NAME
            if lock.is_symlink():
                raise ValueError(f"refusing {lock}: a symlink")
            descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                yield
            finally:
                os.close(descriptor)

    def _dir(self, state: str, image_id: str) -> Path:
        """A sheet's directory, which must be exactly itself: no symlinked state directory or sheet."""
        path = self.root / state / image_id
        if path.is_symlink() or (path.parent.exists() and path.parent.resolve() != self.root.resolve() / state):
            raise ValueError(f"refusing {path}: it leads outside the sheets directory {self.root} (a symlink)")
        return path

    def find(self, image_id: str) -> str | None:
        """The state of a stored sheet, or None."""
        if not isinstance(image_id, str) or not _ID.fullmatch(image_id):
            return None
        for state in STATES:
            if (self._dir(state, image_id) / SHEET_FILE).is_file():
                return state
        return None

    # -- sheets in -------------------------------------------------------------------------------------

    def add(self, photo: bytes, document: dict, sheet: reading.SheetReading, marked, *, client: str,
            model_name: str, model_version: int | None) -> Queued:
        """Queues a sheet read from `photo`: `document` is the reading as answered (without its marked
        image), `marked` the marked photo (a PIL image). A photo queued before is not queued again."""
        image_id = sheet_id(photo)
        cells = {f"{count_id}.{index + 1}": digit_png(cell.answer.normalized_image)
                 for count_id, count in sheet.counts.items() for index, cell in enumerate(count.cells)
                 if cell.answer is not None and cell.answer.normalized_image is not None}
        jpeg = io.BytesIO()
        marked.convert("RGB").save(jpeg, format="JPEG", quality=MARKED_JPEG_QUALITY)
        record = {"id": image_id, "form": self.form.name, "time": _now(), "queued_at": time.time(), "client": client,
                  "model_name": model_name, "model_version": model_version,
                  "reading": {key: value for key, value in document.items() if key != "marked"}}
        with self._locked():
            state = self.find(image_id)
            if state is not None:
                return Queued(image_id, state, new=False)
            waiting = self._pending_records()
            if len(waiting) >= self.max_pending:
                raise QueueFull(f"the sheet review queue is full ({len(waiting)} sheets wait for a person)")
            if sum(1 for other in waiting if other.get("client") == client) >= self.pending_per_client:
                mine = (f"{self.pending_per_client} sheets from this address already wait"
                        if self.pending_per_client > 1 else "a sheet from this address already waits")
                raise QueueFull(f"{mine} for a person")
            (self.root / PENDING).mkdir(parents=True, exist_ok=True)
            target = self._dir(PENDING, image_id)
            incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
            try:
                (incoming / CELLS_DIR).mkdir()
                for name, png in cells.items():
                    _write(incoming / CELLS_DIR / f"{name}.png", png)
                _write(incoming / MARKED_FILE, jpeg.getvalue())
                _write(incoming / SHEET_FILE, json.dumps(record, sort_keys=True).encode())
                sync_directory(incoming / CELLS_DIR)
                sync_directory(incoming)
                os.rename(incoming, target)
                sync_directory(target.parent)
            except BaseException:
                shutil.rmtree(incoming, ignore_errors=True)
                raise
        return Queued(image_id, PENDING, new=True)

    # -- what waits ------------------------------------------------------------------------------------

    def _records(self, state: str) -> list[dict]:
        records = []
        directory = self.root / state
        if not directory.is_dir() or directory.is_symlink():
            return records
        for path in directory.iterdir():
            if not _ID.fullmatch(path.name) or path.is_symlink():
                continue
            try:
                records.append(json.loads((path / SHEET_FILE).read_text()))
            except (OSError, ValueError):  # moved meanwhile by a review, or cut by a crash: not waiting
                continue
        return records

    def _pending_records(self) -> list[dict]:
        return sorted((r for r in self._records(PENDING) if isinstance(r, dict) and isinstance(r.get("id"), str)),
                      key=lambda record: (record.get("queued_at", 0), record["id"]))

    def pending(self, limit: int | None = None) -> list[dict]:
        """The sheets waiting, oldest first: id, when, the verdict and how many boxes to look at."""
        summaries = []
        for record in self._pending_records()[:limit]:
            answer = record.get("reading", {})
            boxes = sum(len(count.get("review_boxes", [])) for count in answer.get("counts", {}).values())
            summaries.append({"id": record["id"], "form": record.get("form"), "time": record.get("time"),
                              "verdict": answer.get("verdict"), "boxes_to_check": boxes})
        return summaries

    def oldest(self) -> float | None:
        """When the oldest waiting sheet was queued (Unix time), None when nothing waits."""
        times = [record.get("queued_at") for record in self._pending_records()]
        return min((t for t in times if isinstance(t, (int, float))), default=None)

    def counts(self) -> dict[str, int]:
        return {state: len(self._records(state)) for state in STATES}

    def get(self, image_id: str) -> tuple[dict, bytes, dict[str, bytes]]:
        """A waiting sheet: its record, its marked photo (JPEG) and its cells' PNGs by "<count>.<box>"."""
        if self.find(image_id) != PENDING:
            raise NotPending(f"no sheet {image_id!r} waits for review")
        directory = self._dir(PENDING, image_id)
        try:
            record = json.loads((directory / SHEET_FILE).read_text())
            marked = (directory / MARKED_FILE).read_bytes()
            cells = {path.stem: path.read_bytes() for path in sorted((directory / CELLS_DIR).glob("*.png"))
                     if not path.is_symlink()}
        except FileNotFoundError:
            raise NotPending(f"sheet {image_id} was reviewed meanwhile") from None
        return record, marked, cells

    # -- a person's decision ---------------------------------------------------------------------------

    def review(self, image_id: str, verdict: str, *, reviewer: str, boxes: dict | None = None) -> dict:
        """Records a person's decision on a waiting sheet and moves it out of pending/.

        confirmed: `boxes` gives every box of every count as the person reads it (a digit 0-9, or None for an
        empty box); the counts, and the form's checks on them, are recorded as the person's. Every box the
        model was unsure of, or read otherwise, becomes a training digit. rejected: nothing is counted."""
        if verdict not in n.SHEET_REVIEW_VERDICTS:
            raise BadReview(f"a verdict is {' or '.join(n.SHEET_REVIEW_VERDICTS)}, got {verdict!r}")
        with self._locked():
            record, _, cells = self.get(image_id)
            if record.get("form") != self.form.name:
                raise BadReview(f"sheet {image_id} was read as form {record.get('form')!r}; this app serves "
                                f"{self.form.name!r}")
            decision = {"time": _now(), "id": image_id, "form": self.form.name, "verdict": verdict,
                        "reviewer": reviewer, "queued_at": record.get("time")}
            if verdict == n.SHEET_CONFIRMED:
                decision.update(self._confirm(record, cells, boxes, reviewer))
            source, target = self._dir(PENDING, image_id), self._dir(verdict, image_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)
            sync_directory(target.parent)
            try:
                log = self.root / LOG_NAME
                if log.is_symlink():
                    raise ValueError(f"refusing {log}: a symlink")
                append_line(log, json.dumps(decision, sort_keys=True))
            except BaseException:
                os.rename(target, source)
                raise
        return decision

    def _confirm(self, record: dict, cells: dict[str, bytes], boxes, reviewer: str) -> dict:
        """The person's counts and checks, and the boxes that become training digits (added before the
        sheet moves: each is stored once whatever happens next, so a review sent again adds nothing twice)."""
        digits = self._boxes(boxes)
        values: dict[str, int | None] = {}
        for count in self.form.counts:
            written = digits[count.id]
            if all(digit is None for digit in written) and self.form.empty_box != layout.EMPTY_ZERO:
                values[count.id] = None  # nothing written: recorded so, and its checks cannot be made
                continue
            value, why = reading.assemble(written, self.form.empty_box)
            if value is None:
                raise BadReview(f"{count.label}: {why}")
            values[count.id] = value
        read = record.get("reading", {}).get("counts", {})
        changed, training = [], []
        for count in self.form.counts:
            model_boxes = read.get(count.id, {}).get("boxes", [])
            for index, digit in enumerate(digits[count.id]):
                model = model_boxes[index] if index < len(model_boxes) else None
                model_digit = model.get("digit") if isinstance(model, dict) else None
                if digit != model_digit:
                    changed.append({"count": count.id, "box": index + 1, "read": model_digit, "confirmed": digit})
                png = cells.get(f"{count.id}.{index + 1}")
                if digit is None or png is None or not isinstance(model, dict):
                    continue  # an empty box, or one the model never saw: no training digit
                if model.get("decision") == "accepted" and digit == model_digit:
                    continue  # the model stood by it and was right: nothing new to learn
                stored = self.feedback.add_reviewed(
                    _pixels(png), predicted=int(model_digit), digit=digit, confidence=float(model.get("confidence", 0)),
                    model_name=str(record.get("model_name", "")), model_version=int(record.get("model_version") or 0),
                    reviewer=reviewer, decision=model.get("decision"), client=f"sheet {record['id']}")
                training.append(stored.id)
        checks = reading.check(self.form, values)
        return {"values": values, "boxes": digits, "changed": changed, "training": training,
                "checks": [{"name": check.name, "equation": check.equation, "holds": check.holds, "sum": check.left,
                            "total": check.right} for check in checks]}

    def _boxes(self, boxes) -> dict[str, list[int | None]]:
        """The reviewer's boxes, checked against the form: every count, each with its number of boxes."""
        if not isinstance(boxes, dict):
            raise BadReview('give "boxes": {"<count id>": [digit or null for each box], ...} for every count')
        expected = {count.id: count.digits for count in self.form.counts}
        unknown = sorted(set(boxes) - set(expected))
        if unknown:
            raise BadReview(f"the form has no count {unknown[0]!r}")
        result = {}
        for count_id, size in expected.items():
            given = boxes.get(count_id)
            if not isinstance(given, list) or len(given) != size:
                raise BadReview(f"count {count_id!r} needs a list of its {size} boxes (a digit 0-9 or null each)")
            for digit in given:
                if digit is not None and (isinstance(digit, bool) or not isinstance(digit, int)
                                          or not 0 <= digit < contract.NUM_CLASSES):
                    raise BadReview(f"count {count_id!r}: a box is a digit 0-9 or null, got {digit!r}")
            result[count_id] = list(given)
        return result

    def decisions(self) -> list[dict]:
        """Every decision recorded, oldest first (the counts people confirmed)."""
        return list(read_lines(self.root / LOG_NAME))


def _pixels(png: bytes):
    """A stored cell PNG back as the model's normalized_image floats (digit_png of it gives the same bytes)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def _write(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
