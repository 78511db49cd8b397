"""People's corrections, kept as training data: an mnist-png tree plus an append-only log.

    <feedback-dir>/training/<digit>/<sha256 of the PNG, 24 hex>.png   the image, labelled by its directory
    <feedback-dir>/feedback.jsonl                                     one JSON object per correction

The image stored is the one the model classified: its own `normalized_image` output (ink light on
black, the ink's box scaled to 20 pixels and centred by mass in 28x28, as MNIST was made), as an
8-bit grayscale PNG. So the tree is a real mnist-png tree that the TFRecord builder takes as it
takes MNIST, whatever the person drew or uploaded (a 280x280 canvas, a JPEG photo, a transparent
PNG), and the normalisation in the graph leaves it as it is when the next model trains on it.

Only a correction (a person saying "it is a 3" about an answer that was not 3) is stored; an
answer nobody corrects, and an answer confirmed as right, leave no file. Images are written
atomically (a temporary file in the same directory, then a rename), named by the hash of their
PNG bytes, so the same image corrected twice is stored once; corrected to a different digit
later, it moves to that digit (the newest correction wins, and the log keeps both). Paths are made
only from a digit 0-9 and a hex digest, never from anything a request says, and checked to be
inside the directory. `digits data build --extra-source <feedback-dir>` adds the tree to the
training split of the next build.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from data import contract

LOG_NAME = contract.FEEDBACK_LOG
HASH_CHARS = 24  # 96 bits: no two different images share a name in any realistic feedback tree


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
    duplicate: bool  # this image was already stored (under this or another digit)
    # The model's own verdict on the answer corrected (contract.DECISIONS: a correction of an "unsure"
    # answer is the model asking, one of an "accepted" answer a confident mistake); None from models
    # without abstention outputs.
    decision: str | None = None


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


class FeedbackStore:
    """Thread-safe writer of one feedback directory (one process writes it: the web app)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()

    @property
    def log_path(self) -> Path:
        return self.root / LOG_NAME

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if self.root.resolve() not in resolved.parents:
            raise ValueError(f"refusing to write {path}: outside the feedback directory {self.root}")
        return resolved

    def add(self, normalized_image, *, predicted: int, corrected: int, confidence: float, model_name: str,
            model_version: int, decision: str | None = None) -> Correction:
        """Stores the image the model classified as a `corrected` digit and appends the log line."""
        if isinstance(corrected, bool) or not (isinstance(corrected, int) and 0 <= corrected < contract.NUM_CLASSES):
            raise ValueError(f"the corrected digit must be 0-{contract.NUM_CLASSES - 1}, got {corrected!r}")
        png = digit_png(normalized_image)
        digest = hashlib.sha256(png).hexdigest()
        name = f"{digest[:HASH_CHARS]}.png"
        target = self._inside(self.root / contract.TRAINING_DIR / str(corrected) / name)
        with self._lock:
            existing = [self.root / contract.TRAINING_DIR / str(digit) / name for digit in range(contract.NUM_CLASSES)]
            existing = [path for path in existing if path.is_file()]
            written, moved_from = False, None
            if target.is_file():
                duplicate = True
            elif existing:
                duplicate = True
                target.parent.mkdir(parents=True, exist_ok=True)
                moved_from = existing[0]
                os.replace(moved_from, target)  # the newest correction wins
                _sync_directory(target.parent)
            else:
                duplicate = False
                _write_atomically(target, png)
                written = True
            record = Correction(
                time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"), model_name=model_name,
                model_version=int(model_version), predicted=int(predicted), corrected=corrected,
                confidence=round(float(confidence), 6), image=target.relative_to(self.root.resolve()).as_posix(),
                sha256=digest, duplicate=duplicate, decision=decision)
            try:
                self._append(json.dumps(asdict(record), sort_keys=True))
            except BaseException:
                # Neither without the other: an image no log line accounts for is undone.
                if written:
                    target.unlink(missing_ok=True)
                elif moved_from is not None:
                    os.replace(target, moved_from)
                raise
            for stale in existing:  # after the log line: a failed one leaves the earlier state whole
                if stale.resolve() != target and stale.is_file():
                    stale.unlink()
        return record

    def _append(self, line: str) -> None:
        """One whole line, flushed to disk, or none: a failed write or flush takes back what it wrote
        (a crash loses at most the line being written). Appends are serialised by the store's lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self._inside(self.log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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

    def count(self) -> int:
        """Images stored now (after duplicates and moves)."""
        return sum(1 for _ in (self.root / contract.TRAINING_DIR).glob("[0-9]/*.png"))


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
