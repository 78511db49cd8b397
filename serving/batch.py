"""Batch predictions: a file of digits in (Kaggle's test.csv, an IDX image file), a CSV of answers out.

    digits predict test.csv --out submission.csv --submission      # Kaggle's ImageId,Label
    digits predict t10k-images-idx3-ubyte.gz --out answers.csv       # with confidence and decision

The file is read one record at a time, each 28x28 record is sent as a PNG (what `serving_default`
takes: the model does its own preprocessing) in requests of at most the server's max_batch_size,
a few requests in flight so that the server batches while the client encodes. Answers are written
in the file's order. A server that says it is busy (503 / 429, UNAVAILABLE / RESOURCE_EXHAUSTED) is
asked again after a pause; any other refusal, and a bad record (a row of 783 pixels, a value of
300), stop the run with one line. The output is written beside its final name and renamed at the
end: a run that stops leaves no half-written file.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from serving.answers import Answer
from tfrecord_builder import formats

SUBMISSION_COLUMNS = ("ImageId", "Label")  # Kaggle's Digit Recognizer
ANSWER_COLUMNS = ("ImageId", "Label", "confidence", "decision", "runner_up", "runner_up_confidence")
TRUE_LABEL_COLUMN = "true_label"  # when the input is labelled (a train.csv, for an evaluation)
BUSY = frozenset({"HTTP 429", "HTTP 503", "RESOURCE_EXHAUSTED", "UNAVAILABLE"})  # worth asking again
RETRIES = 6  # pauses of up to 0.25, 0.5, 1, 2, 4, 5 s: ~10 s of a busy server before the run stops
MAX_PAUSE = 5.0


class BatchError(Exception):
    """The input cannot be read, or the server refused for good; one line for the user."""


@dataclass(frozen=True)
class BatchInput:
    path: Path
    kind: str  # "csv" or "idx"
    count: int  # records (for the CSV, lines after the header: blank lines make it an upper bound)
    labelled: bool
    rows: int
    cols: int

    def records(self) -> Iterator[tuple[int, int | None, bytes]]:
        """(ImageId from 1, label or None, PNG bytes) in the file's order; a bad record stops with a
        BatchError naming its place."""
        try:
            if self.kind == "idx":
                for index, pixels in formats.iter_idx_images(self.path):
                    yield index + 1, None, formats.grayscale_png(pixels, self.rows, self.cols)
                return
            image_id = 0
            with formats.CsvDigits(self.path, allow_unlabelled=True) as rows:
                for row_number, label, pixels, reason, detail in rows:
                    if reason is not None:
                        raise BatchError(f"{self.path.name} line {row_number}: {detail} ({reason}); "
                                         "every row must be a digit, so that ImageIds stay in step")
                    image_id += 1
                    yield image_id, label, formats.grayscale_png(pixels, rows.side, rows.side)
        except formats.FormatError as error:
            raise BatchError(str(error)) from None


def is_batch_input(path: Path) -> bool:
    """A CSV (by name) or an IDX file (by its magic number, gzipped or not): a file of digits."""
    return formats.is_csv(path) or formats.idx_dimensions(path) is not None


def open_input(path: Path) -> BatchInput:
    """The input's kind and size, its header checked; a BatchError if it is not a file of digits."""
    try:
        if formats.is_csv(path):
            with formats.CsvDigits(path, allow_unlabelled=True) as rows:
                labelled, side = rows.labelled, rows.side
            return BatchInput(path, "csv", formats.csv_lines(path), labelled, side, side)
        if formats.idx_dimensions(path) == 1:
            raise BatchError(f"{path} is an IDX labels file; give the images file (…-images-idx3-ubyte) instead")
        count, rows, cols = formats.idx_images_shape(path)
        return BatchInput(path, "idx", count, False, rows, cols)
    except formats.FormatError as error:
        raise BatchError(str(error)) from None
    except OSError as error:
        raise BatchError(f"cannot read {path}: {error.strerror or error}") from None


@dataclass
class BatchResult:
    output: Path
    rows: int = 0
    requests: int = 0
    retries: int = 0  # requests asked again because the server was busy
    seconds: float = 0.0
    decisions: collections.Counter = field(default_factory=collections.Counter)  # decision -> rows
    labelled: int = 0
    correct: int = 0  # among labelled rows
    accepted_labelled: int = 0
    accepted_correct: int = 0

    @property
    def per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


Predict = Callable[[list[bytes]], list[Answer]]


def per_thread(make: Callable[[], object]) -> Callable[[], object]:
    """`make()` once in each thread that asks: a REST client's requests.Session is not to be shared
    (a gRPC channel is, so gRPC callers need not use this)."""
    local = threading.local()

    def get():
        if not hasattr(local, "value"):
            local.value = make()
        return local.value

    return get


def predict_file(source: BatchInput, output: Path, predict: Predict, batch_size: int, concurrency: int = 2,
                 submission: bool = False, on_progress: Callable[[int, int], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> BatchResult:
    """Answers every record of `source` through `predict` (one call per request of at most
    `batch_size` images, `concurrency` calls in flight) and writes them to `output` as CSV."""
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be at least 1")
    result = BatchResult(output)
    started = time.perf_counter()
    lock = threading.Lock()

    def ask(images: list[bytes]) -> list[Answer]:
        from serving.client import ServerError

        for attempt in range(RETRIES + 1):
            try:
                answers = predict(images)
                break
            except ServerError as error:
                if error.status not in BUSY or attempt == RETRIES or error.message.startswith("cannot reach"):
                    raise BatchError(f"the server refused a request of {len(images)} images: {error}") from None
                with lock:
                    result.retries += 1
                sleep(min(MAX_PAUSE, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0))  # jittered
        if len(answers) != len(images):
            raise BatchError(f"the server answered {len(answers)} of {len(images)} images")
        return answers

    columns = SUBMISSION_COLUMNS if submission else ANSWER_COLUMNS + ((TRUE_LABEL_COLUMN,) if source.labelled else ())
    with _atomic_csv(output) as writer, ThreadPoolExecutor(concurrency, thread_name_prefix="predict") as pool:
        writer.writerow(columns)
        pending: collections.deque[tuple[list[tuple[int, int | None]], Future]] = collections.deque()

        def drain(keep: int) -> None:
            while len(pending) > keep:
                keys, future = pending.popleft()
                for (image_id, label), answer in zip(keys, future.result()):
                    writer.writerow(_row(image_id, label, answer, submission, source.labelled))
                    _count(result, label, answer)
                result.requests += 1
                if on_progress is not None:
                    on_progress(result.rows, max(source.count, result.rows))

        try:
            for chunk in _chunks(source.records(), batch_size):
                keys = [(image_id, label) for image_id, label, _ in chunk]
                pending.append((keys, pool.submit(ask, [png for _, _, png in chunk])))
                drain(keep=2 * concurrency)  # a bounded window: memory stays flat on any file size
            drain(keep=0)
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
    result.seconds = time.perf_counter() - started
    return result


def _chunks(records: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _row(image_id: int, label: int | None, answer: Answer, submission: bool, labelled: bool) -> list:
    if submission:
        return [image_id, answer.digit]
    other = answer.runner_up
    row = [image_id, answer.digit, f"{answer.confidence:.4f}", answer.decision or "", other,
           f"{answer.probabilities[other]:.4f}"]
    return row + [label] if labelled else row


def _count(result: BatchResult, label: int | None, answer: Answer) -> None:
    result.rows += 1
    result.decisions[answer.decision or "none"] += 1
    if label is None:
        return
    result.labelled += 1
    result.correct += answer.digit == label
    if answer.accepted is not False:  # accepted, or a model that does not say
        result.accepted_labelled += 1
        result.accepted_correct += answer.digit == label


@contextlib.contextmanager
def _atomic_csv(output: Path):
    """A csv.writer on a hidden file beside `output`, renamed to it only if the block succeeds."""
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", newline="", dir=output.parent, prefix=f".{output.name}.",
                                         suffix=".part", delete=False)
    try:
        with handle:
            yield csv.writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        raise
