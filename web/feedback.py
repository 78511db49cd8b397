"""People's corrections, kept as proposals until a reviewer decides, then as training data.

    <feedback-dir>/pending/<digit>/<id>.png    a person said "this is a <digit>"; nobody has reviewed it
    <feedback-dir>/training/<digit>/<id>.png   accepted by a reviewer: what the next build trains on
    <feedback-dir>/rejected/<digit>/<id>.png   rejected by a reviewer, kept so that it is not queued again
    <feedback-dir>/feedback.jsonl              one JSON object per correction received (who, when, what)
    <feedback-dir>/reviews.jsonl               one JSON object per review decision (who, when, which)

`<id>` is the first 24 hex digits of the SHA-256 of the stored PNG. The web page is public, so what a
stranger says is not training data until a person trusted with it says so: `digits data build
--extra-source <feedback-dir>` reads training/ only and counts pending/ and rejected/ in its manifest;
`digits feedback review` and the token-protected review page (`digits web --review-token-file`) move
proposals on. Agreement of several reporters is not taken as review: on a public page, "independent"
reporters cannot be told apart from one person with many addresses.

The image stored is the one the model classified: its own `normalized_image` output (ink light on
black, the ink's box scaled to 20 pixels and centred by mass in 28x28, as MNIST was made), as an
8-bit grayscale PNG. So the tree is a real mnist-png tree that the TFRecord builder takes as it
takes MNIST, whatever the person drew or uploaded, and the normalisation in the graph leaves it as it
is when the next model trains on it.

Only a correction (a person saying "it is a 3" about an answer that was not 3) is stored; an answer
nobody corrects, and an answer confirmed as right, leave no file. The same image corrected twice is
stored once, where it was first proposed: a later proposal of another digit is logged and shown to
the reviewer, never moves the file (so nobody can change what a reviewer is about to accept), and
once reviewed, an image stays where the reviewer put it. The queue is capped, in total, per client
and in the log's size, so that a flood fills a bounded queue for a reviewer to reject, not the disk.

Every change is a file written atomically (a temporary file, then a rename, then the directory
fsynced) or moved, plus one log line, and neither is left without the other when a step fails. The
web app and a reviewer's `digits feedback review` may run at once: changes are serialised by a lock
file. Paths are made only from a digit 0-9 and a hex digest, never from anything a request says, and
must resolve to exactly themselves: a symlinked state or digit directory, or a symlink in place of an
image, is refused, so nothing is read from or written to outside the directory. The builder trains
only on images in training/ that reviews.jsonl accepted (tfrecord_builder/builder.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from data import contract

LOG_NAME = contract.FEEDBACK_LOG
REVIEW_LOG_NAME = contract.REVIEW_LOG
HASH_CHARS = 24  # 96 bits: no two different images share a name in any realistic feedback tree
LOCK_NAME = contract.FEEDBACK_LOCK

PENDING, ACCEPTED, REJECTED = "pending", contract.REVIEW_ACCEPTED, contract.REVIEW_REJECTED
STATE_DIRS = {PENDING: contract.PENDING_DIR, ACCEPTED: contract.ACCEPTED_DIR, REJECTED: contract.REJECTED_DIR}
_ID = re.compile(rf"[0-9a-f]{{{HASH_CHARS}}}")


@dataclass(frozen=True)
class Correction:
    time: str  # ISO 8601, UTC
    model_name: str
    model_version: int
    predicted: int
    corrected: int
    confidence: float  # the model's probability of `predicted`
    image: str  # path of the stored PNG, relative to the feedback directory
    sha256: str  # of the stored PNG
    duplicate: bool  # this image was already stored (under this or another digit, in any state)
    # The model's own verdict on the answer corrected (contract.DECISIONS: a correction of an "unsure"
    # answer is the model asking, one of an "accepted" answer a confident mistake); None from models
    # without abstention outputs.
    decision: str | None = None
    client: str = ""  # who sent it: the address the web app saw
    state: str = PENDING  # where the image is after this correction: pending, or where a reviewer put it

    @property
    def id(self) -> str:
        return self.sha256[:HASH_CHARS]


@dataclass(frozen=True)
class Review:
    time: str
    id: str
    verdict: str  # accepted or rejected
    digit: int  # the label it is trained as (accepted) or was proposed as (rejected)
    proposed: int  # the digit the person proposed
    reviewer: str


@dataclass(frozen=True)
class Proposal:
    """A pending correction as a reviewer sees it: the newest report of the image, and how many came."""

    id: str
    digit: int  # proposed
    image: str  # relative path
    time: str  # of the newest report
    client: str
    predicted: int | None
    confidence: float | None
    model_version: int | None
    decision: str | None
    reports: int  # corrections received of this image, to any digit
    clients: int  # distinct addresses among them
    also: tuple[int, ...] = ()  # other digits proposed for it since, which did not move it


class QueueFull(Exception):
    """The review queue takes no more now: in total (`per_client` False) or from this client."""

    def __init__(self, message: str, per_client: bool):
        super().__init__(message)
        self.per_client = per_client


class NotPending(Exception):
    """A review of an id that is not waiting for one (unknown, or already reviewed)."""


def digit_png(normalized_image) -> bytes:
    """The model's 28x28 normalized_image (floats in [0, 1], ink light) as an 8-bit grayscale PNG."""
    import numpy as np
    from PIL import Image

    pixels = np.clip(np.rint(np.asarray(normalized_image, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    size = contract.NORMALIZED_IMAGE_SIZE
    if pixels.shape != (size, size):
        raise ValueError(f"the normalised image is {pixels.shape}, not {size}x{size}")
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_digit(digit, what: str = "the corrected digit") -> int:
    if isinstance(digit, bool) or not (isinstance(digit, int) and 0 <= digit < contract.NUM_CLASSES):
        raise ValueError(f"{what} must be 0-{contract.NUM_CLASSES - 1}, got {digit!r}")
    return digit


class FeedbackStore:
    """Reader and writer of one feedback directory. Thread-safe, and safe beside another process
    writing the same directory (the web app and a reviewer): every change holds a lock file."""

    def __init__(self, root: Path, *, max_pending: int = 10_000, pending_per_client: int = 100,
                 max_log_bytes: int = 64 * 1024 * 1024):
        self.root = Path(root)
        self.max_pending = max_pending
        self.pending_per_client = pending_per_client
        self.max_log_bytes = max_log_bytes
        self._lock = threading.Lock()
        # id -> the client who first proposed it (an image never moves while pending, so this never
        # changes), for the per-client cap; ids this process has not seen are read from the log.
        self._owners: dict[str, str] = {}

    @property
    def log_path(self) -> Path:
        return self.root / LOG_NAME

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if self.root.resolve() not in resolved.parents:
            raise ValueError(f"refusing to write {path}: outside the feedback directory {self.root}")
        return resolved

    def _path(self, state: str, digit: int, image_id: str) -> Path:
        return self.root / STATE_DIRS[state] / str(digit) / f"{image_id}.png"

    def _exact(self, state: str, digit: int, image_id: str) -> Path:
        """The path of an image, checked to resolve to exactly itself inside the directory: no
        symlinked state or digit directory and no symlink in place of the image."""
        path = self._path(state, digit, image_id)
        expected = self.root.resolve() / STATE_DIRS[state] / str(digit) / f"{image_id}.png"
        if path.resolve() != expected or path.is_symlink():
            raise ValueError(f"refusing {path}: it leads outside the feedback directory {self.root} (a symlink)")
        return expected

    @contextmanager
    def _locked(self):
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self._inside(self.root / LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                yield
            finally:
                os.close(descriptor)  # releases the lock

    def find(self, image_id: str) -> tuple[str, int] | None:
        """(state, digit) of a stored image, or None. An image reached through a symlink is not one."""
        if not isinstance(image_id, str) or not _ID.fullmatch(image_id):
            return None
        for state in STATE_DIRS:
            for digit in range(contract.NUM_CLASSES):
                path = self._path(state, digit, image_id)
                if path.is_file():
                    try:
                        self._exact(state, digit, image_id)
                    except ValueError:
                        continue
                    return state, digit
        return None

    # -- corrections in ------------------------------------------------------------------------------

    def add(self, normalized_image, *, predicted: int, corrected: int, confidence: float, model_name: str,
            model_version: int, decision: str | None = None, client: str = "") -> Correction:
        """Queues the image the model classified as a proposed `corrected` digit, with the log line.
        Raises QueueFull when the queue, or this client's share of it, is full."""
        check_digit(corrected)
        png = digit_png(normalized_image)
        with self._locked():
            return self._store(png, predicted=predicted, corrected=corrected, confidence=confidence,
                               model_name=model_name, model_version=model_version, decision=decision, client=client,
                               capped=True)

    def add_reviewed(self, normalized_image, *, predicted: int, digit: int, confidence: float, model_name: str,
                     model_version: int, reviewer: str, decision: str | None = None, client: str = "") -> Correction:
        """A digit a trusted person read (a tally sheet's box confirmed on the token-protected review page):
        stored as a correction and accepted as `digit` at once, with its line in both logs, under one hold
        of the lock. Not capped: only a reviewer reaches it. An image stored already stays where a reviewer
        put it; if it is still pending (proposed by someone else), this review accepts it as `digit`."""
        check_digit(digit)
        png = digit_png(normalized_image)
        with self._locked():
            record = self._store(png, predicted=predicted, corrected=digit, confidence=confidence,
                                 model_name=model_name, model_version=model_version, decision=decision, client=client,
                                 capped=False)
            if record.state == PENDING:
                self._review(record.id, ACCEPTED, reviewer=reviewer, digit=digit)
        return record

    def _store(self, png: bytes, *, predicted: int, corrected: int, confidence: float, model_name: str,
               model_version: int, decision: str | None, client: str, capped: bool) -> Correction:
        """With the lock held: the PNG stored as pending (unless stored already) and its log line."""
        digest = hashlib.sha256(png).hexdigest()
        image_id = digest[:HASH_CHARS]
        target = self._exact(PENDING, corrected, image_id)
        self._check_log()
        found = self.find(image_id)
        if found is None:
            if capped:
                self._check_room(client)
            _write_atomically(target, png)
            state = PENDING
        else:  # stored already: it stays where it is (first proposal, or the reviewer's decision)
            state, digit = found
            target = self._exact(state, digit, image_id)
        record = Correction(
            time=_now(), model_name=model_name, model_version=int(model_version), predicted=int(predicted),
            corrected=corrected, confidence=round(float(confidence), 6),
            image=target.relative_to(self.root.resolve()).as_posix(), sha256=digest,
            duplicate=found is not None, decision=decision, client=client, state=state)
        try:
            append_line(self._log(LOG_NAME), json.dumps(asdict(record), sort_keys=True))
        except BaseException:
            if found is None:  # neither without the other: an image no log line accounts for is undone
                target.unlink(missing_ok=True)
            raise
        if found is None:
            self._owners[image_id] = client
        return record

    def _log(self, name: str) -> Path:
        path = self.root / name
        if path.is_symlink():
            raise ValueError(f"refusing {path}: a symlink")
        return self._inside(path)

    def _check_log(self) -> None:
        """Every correction adds a line, a repeated one too: past the cap, none is taken."""
        try:
            size = self.log_path.stat().st_size
        except FileNotFoundError:
            return
        if size >= self.max_log_bytes:
            raise QueueFull(f"the feedback log has reached its cap of {self.max_log_bytes} bytes (rotate it: "
                            "docs/web.md)", per_client=False)

    def _check_room(self, client: str) -> None:
        """Room for one more pending image from `client` (called with the lock held). The pending
        images are listed each time, so reviews and removals by anyone are seen at once."""
        pending = [path.stem for path in self._state_files(PENDING)]
        if len(pending) >= self.max_pending:
            raise QueueFull(f"the review queue is full ({len(pending)} corrections wait for a reviewer)",
                            per_client=False)
        if any(image_id not in self._owners for image_id in pending):  # added by another process
            for line in read_lines(self.log_path):
                self._owners.setdefault(line.get("sha256", "")[:HASH_CHARS], line.get("client", ""))
        mine = sum(1 for image_id in pending if self._owners.get(image_id, "") == client)
        if mine >= self.pending_per_client:
            raise QueueFull(f"{mine} corrections from this address already wait for a reviewer", per_client=True)

    # -- review --------------------------------------------------------------------------------------

    def review(self, image_id: str, verdict: str, *, reviewer: str, digit: int | None = None) -> Review:
        """Moves a pending image to training/ (accepted, as `digit` or as proposed) or rejected/, with
        its line in the review log. NotPending if the id waits for no review."""
        if verdict not in (ACCEPTED, REJECTED):
            raise ValueError(f"a verdict is {ACCEPTED} or {REJECTED}, got {verdict!r}")
        if digit is not None:
            check_digit(digit, "the reviewed digit")
        with self._locked():
            return self._review(image_id, verdict, reviewer=reviewer, digit=digit)

    def _review(self, image_id: str, verdict: str, *, reviewer: str, digit: int | None) -> Review:
        """With the lock held: the move and its review line, or neither."""
        found = self.find(image_id)
        if found is None:
            raise NotPending(f"no correction {image_id!r} is stored here")
        state, proposed = found
        if state != PENDING:
            raise NotPending(f"correction {image_id} was already reviewed ({state})")
        label = proposed if digit is None or verdict == REJECTED else digit
        source = self._exact(PENDING, proposed, image_id)
        target = self._exact(verdict, label, image_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        sync_directory(target.parent)
        record = Review(time=_now(), id=image_id, verdict=verdict, digit=label, proposed=proposed,
                        reviewer=reviewer)
        try:
            append_line(self._log(REVIEW_LOG_NAME), json.dumps(asdict(record), sort_keys=True))
        except BaseException:
            os.replace(target, source)
            raise
        return record

    def pending(self, limit: int | None = None) -> list[Proposal]:
        """The proposals waiting for review, oldest first."""
        files = {path.stem: int(path.parent.name) for path in self._state_files(PENDING)
                 if _ID.fullmatch(path.stem) and self.find(path.stem) == (PENDING, int(path.parent.name))}
        first: dict[str, dict] = {}
        reports: Counter = Counter()
        clients: dict[str, set] = {}
        others: dict[str, set] = {}
        for line in read_lines(self.log_path):
            image_id = line.get("sha256", "")[:HASH_CHARS]
            if image_id in files:
                first.setdefault(image_id, line)
                reports[image_id] += 1
                clients.setdefault(image_id, set()).add(line.get("client", ""))
                if line.get("corrected") != files[image_id] and isinstance(line.get("corrected"), int):
                    others.setdefault(image_id, set()).add(line["corrected"])
        proposals = []
        for image_id, digit in files.items():
            line = first.get(image_id, {})  # the proposal that stored it: who, when, what the model said
            proposals.append(Proposal(
                id=image_id, digit=digit, image=f"{contract.PENDING_DIR}/{digit}/{image_id}.png",
                time=line.get("time", ""), client=line.get("client", ""), predicted=line.get("predicted"),
                confidence=line.get("confidence"), model_version=line.get("model_version"),
                decision=line.get("decision"), reports=reports[image_id], clients=len(clients.get(image_id, ())),
                also=tuple(sorted(others.get(image_id, ())))))
        proposals.sort(key=lambda proposal: (proposal.time, proposal.id))
        return proposals if limit is None else proposals[:limit]

    def image(self, image_id: str) -> bytes:
        found = self.find(image_id)
        if found is None:
            raise NotPending(f"no correction {image_id!r} is stored here")
        try:
            return self._exact(*found, image_id).read_bytes()
        except FileNotFoundError:  # reviewed meanwhile by another process
            raise NotPending(f"correction {image_id} was reviewed meanwhile") from None

    def counts(self) -> dict[str, int]:
        """Images stored now in each state (after duplicates and moves)."""
        return {state: sum(1 for _ in self._state_files(state)) for state in STATE_DIRS}

    def _state_files(self, state: str):
        return (self.root / STATE_DIRS[state]).glob("[0-9]/*.png")


def read_lines(path: Path):
    """The log's JSON objects; a line that is not one (cut by a crash, edited by hand) is skipped."""
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with handle:
        for text in handle:
            try:
                document = json.loads(text)
            except ValueError:
                continue
            if isinstance(document, dict):
                yield document


def append_line(path: Path, line: str) -> None:
    """One whole line, flushed to disk, or none: a failed write or flush takes back what it wrote
    (a crash loses at most the line being written). Appends are serialised by the store's lock."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        try:
            payload = (line + "\n").encode()
            while payload:  # os.write may write less than it is given
                payload = payload[os.write(descriptor, payload):]
            os.fsync(descriptor)
        except BaseException:
            os.ftruncate(descriptor, size)  # no half line, and no line whose image is undone
            raise
    finally:
        os.close(descriptor)


def _write_atomically(target: Path, payload: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".incoming-", suffix=".png", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
        sync_directory(target.parent)  # the rename itself survives a crash
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
