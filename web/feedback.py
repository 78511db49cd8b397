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
stored once; corrected to another digit while pending, it moves (the newest proposal wins, the log
keeps both); once reviewed, it stays where the reviewer put it. The queue is capped, in total and per
client, so that a flood fills a bounded queue for a reviewer to reject, not the disk.

Every change is a file written atomically (a temporary file, then a rename, then the directory
fsynced) or moved, plus one log line, and neither is left without the other when a step fails. The
web app and a reviewer's `digits feedback review` may run at once: changes are serialised by a lock
file. Paths are made only from a digit 0-9 and a hex digest, never from anything a request says, and
checked to be inside the directory.
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
LOCK_NAME = ".lock"

PENDING, ACCEPTED, REJECTED = "pending", "accepted", "rejected"
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
        # id -> client of each pending image, for the caps; rebuilt when another process reviewed.
        self._pending_clients: dict[str, str] | None = None
        self._reviews_seen: tuple | None = None

    @property
    def log_path(self) -> Path:
        return self.root / LOG_NAME

    @property
    def review_log_path(self) -> Path:
        return self.root / REVIEW_LOG_NAME

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if self.root.resolve() not in resolved.parents:
            raise ValueError(f"refusing to write {path}: outside the feedback directory {self.root}")
        return resolved

    def _path(self, state: str, digit: int, image_id: str) -> Path:
        return self.root / STATE_DIRS[state] / str(digit) / f"{image_id}.png"

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
        """(state, digit) of a stored image, or None."""
        if not _ID.fullmatch(image_id):
            return None
        for state in STATE_DIRS:
            for digit in range(contract.NUM_CLASSES):
                if self._path(state, digit, image_id).is_file():
                    return state, digit
        return None

    # -- corrections in ------------------------------------------------------------------------------

    def add(self, normalized_image, *, predicted: int, corrected: int, confidence: float, model_name: str,
            model_version: int, decision: str | None = None, client: str = "") -> Correction:
        """Queues the image the model classified as a proposed `corrected` digit, with the log line.
        Raises QueueFull when the queue, or this client's share of it, is full."""
        check_digit(corrected)
        png = digit_png(normalized_image)
        digest = hashlib.sha256(png).hexdigest()
        image_id = digest[:HASH_CHARS]
        target = self._inside(self._path(PENDING, corrected, image_id))
        with self._locked():
            found = self.find(image_id)
            written, moved_from, state = False, None, PENDING
            if found is not None and found[0] != PENDING:  # a reviewer decided: it stays
                state = found[0]
                target = self._inside(self._path(state, found[1], image_id))
            elif found is not None and found[1] != corrected:  # pending as another digit: the newest wins
                moved_from = self._path(PENDING, found[1], image_id)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(moved_from, target)
                _sync_directory(target.parent)
            elif found is None:
                self._check_room(client)
                _write_atomically(target, png)
                written = True
            record = Correction(
                time=_now(), model_name=model_name, model_version=int(model_version), predicted=int(predicted),
                corrected=corrected, confidence=round(float(confidence), 6),
                image=target.relative_to(self.root.resolve()).as_posix(), sha256=digest,
                duplicate=found is not None, decision=decision, client=client, state=state)
            try:
                _append(self._inside(self.log_path), json.dumps(asdict(record), sort_keys=True))
            except BaseException:
                # Neither without the other: an image no log line accounts for is undone.
                if written:
                    target.unlink(missing_ok=True)
                elif moved_from is not None:
                    os.replace(target, moved_from)
                raise
            if state == PENDING and self._pending_clients is not None:
                self._pending_clients[image_id] = client
        return record

    def _check_room(self, client: str) -> None:
        if self.log_path.exists() and self.log_path.stat().st_size >= self.max_log_bytes:
            raise QueueFull(f"the feedback log has reached its cap of {self.max_log_bytes} bytes", per_client=False)
        clients = self._clients()
        if len(clients) >= self.max_pending:
            raise QueueFull(f"the review queue is full ({len(clients)} corrections wait for a reviewer)",
                            per_client=False)
        mine = sum(1 for owner in clients.values() if owner == client)
        if mine >= self.pending_per_client:
            raise QueueFull(f"{mine} corrections from this address already wait for a reviewer", per_client=True)

    def _clients(self) -> dict[str, str]:
        """id -> client of every pending image (called with the lock held)."""
        stamp = _stamp(self.review_log_path)
        if self._pending_clients is None or stamp != self._reviews_seen:
            pending = {path.stem for path in self._state_files(PENDING)}
            owners = {}
            for line in _lines(self.log_path):
                image_id = line.get("sha256", "")[:HASH_CHARS]
                if image_id in pending:
                    owners[image_id] = line.get("client", "")
            self._pending_clients = {image_id: owners.get(image_id, "") for image_id in pending}
            self._reviews_seen = stamp
        return self._pending_clients

    # -- review --------------------------------------------------------------------------------------

    def review(self, image_id: str, verdict: str, *, reviewer: str, digit: int | None = None) -> Review:
        """Moves a pending image to training/ (accepted, as `digit` or as proposed) or rejected/, with
        its line in the review log. NotPending if the id waits for no review."""
        if verdict not in (ACCEPTED, REJECTED):
            raise ValueError(f"a verdict is {ACCEPTED} or {REJECTED}, got {verdict!r}")
        if digit is not None:
            check_digit(digit, "the reviewed digit")
        with self._locked():
            found = self.find(image_id)
            if found is None:
                raise NotPending(f"no correction {image_id!r} is stored here")
            state, proposed = found
            if state != PENDING:
                raise NotPending(f"correction {image_id} was already reviewed ({state})")
            label = proposed if digit is None or verdict == REJECTED else digit
            source = self._path(PENDING, proposed, image_id)
            target = self._inside(self._path(verdict, label, image_id))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            _sync_directory(target.parent)
            record = Review(time=_now(), id=image_id, verdict=verdict, digit=label, proposed=proposed,
                            reviewer=reviewer)
            try:
                _append(self._inside(self.review_log_path), json.dumps(asdict(record), sort_keys=True))
            except BaseException:
                os.replace(target, source)
                raise
            if self._pending_clients is not None:
                self._pending_clients.pop(image_id, None)
                self._reviews_seen = _stamp(self.review_log_path)
        return record

    def pending(self, limit: int | None = None) -> list[Proposal]:
        """The proposals waiting for review, oldest report first."""
        files = {path.stem: int(path.parent.name) for path in self._state_files(PENDING)}
        newest: dict[str, dict] = {}
        reports: Counter = Counter()
        clients: dict[str, set] = {}
        for line in _lines(self.log_path):
            image_id = line.get("sha256", "")[:HASH_CHARS]
            if image_id in files:
                newest[image_id] = line
                reports[image_id] += 1
                clients.setdefault(image_id, set()).add(line.get("client", ""))
        proposals = []
        for image_id, digit in files.items():
            line = newest.get(image_id, {})
            proposals.append(Proposal(
                id=image_id, digit=digit, image=f"{contract.PENDING_DIR}/{digit}/{image_id}.png",
                time=line.get("time", ""), client=line.get("client", ""), predicted=line.get("predicted"),
                confidence=line.get("confidence"), model_version=line.get("model_version"),
                decision=line.get("decision"), reports=reports[image_id], clients=len(clients.get(image_id, ()))))
        proposals.sort(key=lambda proposal: (proposal.time, proposal.id))
        return proposals if limit is None else proposals[:limit]

    def image(self, image_id: str) -> bytes:
        found = self.find(image_id)
        if found is None:
            raise NotPending(f"no correction {image_id!r} is stored here")
        return self._path(found[0], found[1], image_id).read_bytes()

    def counts(self) -> dict[str, int]:
        """Images stored now in each state (after duplicates and moves)."""
        return {state: sum(1 for _ in self._state_files(state)) for state in STATE_DIRS}

    def _state_files(self, state: str):
        return (self.root / STATE_DIRS[state]).glob("[0-9]/*.png")


def _stamp(path: Path) -> tuple | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_size, info.st_mtime_ns, info.st_ino


def _lines(path: Path):
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


def _append(path: Path, line: str) -> None:
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
        _sync_directory(target.parent)  # the rename itself survives a crash
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
