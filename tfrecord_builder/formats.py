"""Digits that arrive as MNIST's IDX files or Kaggle's CSV, turned into the mnist-png layout the builder reads.

    IDX (MNIST, Fashion-MNIST, KMNIST, EMNIST): a directory holding
        train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]   -> training/<label>/<index>.png
        t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]    -> testing/<label>/<index>.png
    Kaggle "Digit Recognizer": a labelled CSV, `label,pixel0,...,pixel783`, one digit a row. It has no
        held-out part: every TEST_EVERY-th row (by row number) goes to testing/, the rest to training/.

Each record is read as it is written (an IDX image is 784 bytes; a CSV row one line), so a 60,000
image file is never decoded whole. A record that breaks a rule of its own (a label of 300, a row of
783 pixels, a pixel of 256) is rejected with its reason and the file goes on; a file that breaks the
format (a wrong magic number, images and labels that do not agree in count, a file shorter than its
header says, no header) stops the build with one line, before anything is written.

Images are written as 8-bit grayscale PNGs, whose decoded pixels are the file's bytes exactly.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data import contract

IDX_UBYTE = 0x08
CSV_SUFFIXES = (".csv", ".csv.gz")  # Kaggle's files, told from IDX files (found by their magic number) by name
IDX_FILES = {  # part -> (images, labels), each with or without .gz
    contract.TRAINING_DIR: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    contract.TESTING_DIR: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TEST_EVERY = 7  # a Kaggle CSV's rows that go to testing/: one in seven, as MNIST's 10,000 of 70,000
LABEL_COLUMN = "label"


class FormatError(Exception):
    """The source cannot be read as its format at all; the message is one line for the user."""


@dataclass
class Converted:
    """What a conversion wrote and refused."""

    format: str
    files: list[str]  # the source files read
    written: int = 0
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (where, reason, detail)


def detect(source: Path) -> str:
    """'png' (an mnist-png tree), 'idx' (a directory of IDX files) or 'csv' (a CSV file)."""
    if source.is_file():
        if is_csv(source):
            return "csv"
        raise FormatError(f"{source} is not a directory (a mnist-png tree, or MNIST's IDX files) nor a .csv "
                          "file (Kaggle's train.csv)")
    if source.is_dir() and any(_idx_path(source, name) for name, _ in IDX_FILES.values()):
        return "idx"
    return "png"


def _idx_path(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    # Some copies use a dot: train-images.idx3-ubyte
    dotted = name.replace("-idx", ".idx")
    for candidate in (directory / dotted, directory / f"{dotted}.gz"):
        if candidate.is_file():
            return candidate
    return None


def open_bytes(path: Path):
    """The file's bytes, gunzipped if it is gzip (by its magic number, not its name)."""
    if _is_gzip(path):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_exactly(stream, size: int, path: Path, what: str) -> bytes:
    try:
        data = stream.read(size)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise FormatError(f"{path}: cannot read {what}: {error}") from None
    if len(data) != size:
        raise FormatError(f"{path} is truncated: it ends inside {what}")
    return data


def is_csv(path: Path) -> bool:
    return path.name.lower().endswith(CSV_SUFFIXES)


def idx_dimensions(path: Path) -> int | None:
    """The number of dimensions an IDX file of unsigned bytes announces (3: images, 1: labels), gzipped
    or not; None for a file that is not one (or cannot be read)."""
    try:
        with open_bytes(path) as stream:
            magic = stream.read(4)
    except (OSError, EOFError):
        return None
    return magic[3] if len(magic) == 4 and magic[:2] == b"\x00\x00" and magic[2] == IDX_UBYTE else None


def idx_header(stream, path: Path, dimensions: int) -> tuple[int, ...]:
    """The sizes an IDX header announces, checked: ubyte data and the expected number of dimensions."""
    magic = _read_exactly(stream, 4, path, "the header")
    if magic[:2] != b"\x00\x00" or magic[2] != IDX_UBYTE or magic[3] != dimensions:
        raise FormatError(f"{path} is not an IDX file of {dimensions}-dimensional unsigned bytes "
                          f"(magic number {magic.hex()}, expected 0000080{dimensions})")
    return struct.unpack(f">{dimensions}I", _read_exactly(stream, 4 * dimensions, path, "the header"))


def _check_size(path: Path, size: int) -> None:
    if not _is_gzip(path) and path.stat().st_size != size:
        raise FormatError(f"{path} is {path.stat().st_size:,} bytes where its header announces "
                          f"{size:,}: truncated or not this file's data")


def idx_images_shape(path: Path) -> tuple[int, int, int]:
    """(count, rows, cols) of an IDX image file, its header and (uncompressed) size checked."""
    with open_bytes(path) as stream:
        count, rows, cols = idx_header(stream, path, 3)
    if rows < 1 or cols < 1:
        raise FormatError(f"{path} announces images of {rows}x{cols} pixels")
    _check_size(path, 16 + count * rows * cols)
    return count, rows, cols


def iter_idx_images(path: Path) -> Iterator[tuple[int, bytes]]:
    """(index, rows x cols pixel bytes) for each image of an IDX image file, read one at a time."""
    count, rows, cols = idx_images_shape(path)
    with open_bytes(path) as images:
        idx_header(images, path, 3)
        for index in range(count):
            yield index, _read_exactly(images, rows * cols, path, f"image {index}")
        if images.read(1):
            raise FormatError(f"{path} has data after its {count:,} images")


def iter_idx(images_path: Path, labels_path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(index, label, rows x cols pixel bytes) for each record, read one at a time; the headers and
    the file sizes are checked first, so that a mismatch stops before anything is yielded."""
    count, _, _ = idx_images_shape(images_path)
    with open_bytes(labels_path) as labels:
        (label_count,) = idx_header(labels, labels_path, 1)
        if count != label_count:
            raise FormatError(f"{images_path.name} holds {count:,} images but {labels_path.name} "
                              f"{label_count:,} labels: they must agree")
        _check_size(labels_path, 8 + count)
        all_labels = _read_exactly(labels, count, labels_path, "the labels")  # one byte each: 60 KB
        if labels.read(1):
            raise FormatError(f"{labels_path} has data after its {count:,} labels")
    for index, pixels in iter_idx_images(images_path):
        yield index, all_labels[index], pixels


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


class CsvDigits:
    """A Kaggle CSV of digits, one a row: `label,pixel0,...,pixel783` (train.csv) or, with
    `labelled=False` allowed, `pixel0,...,pixel783` (test.csv). The header is read and checked
    when it is opened; the rows are read one at a time."""

    def __init__(self, path: Path, allow_unlabelled: bool = False):
        self.path = path
        self._raw = open_bytes(path)
        text = io.TextIOWrapper(self._raw, encoding="utf-8", errors="replace", newline="")
        self._reader = csv.reader(text)
        try:
            try:
                header = next(self._reader)
            except StopIteration:
                raise FormatError(f"{path} is empty") from None
            except csv.Error as error:
                raise FormatError(f"{path}: not CSV: {error}") from None
            self.labelled, self.pixels = _csv_header(path, [name.strip().lower() for name in header],
                                                     allow_unlabelled)
        except BaseException:
            self._raw.close()
            raise
        self.side = math.isqrt(self.pixels)

    def __enter__(self) -> CsvDigits:
        return self

    def __exit__(self, *_) -> None:
        self._raw.close()

    def __iter__(self) -> Iterator[tuple[int, int | None, bytes | None, str | None, str | None]]:
        """(row number, label, pixel bytes, reject reason, detail) for each data row (the header is
        row 1); a bad row has reason and detail set instead of pixels; the label is None unlabelled."""
        path, reader, first = self.path, self._reader, 1 if self.labelled else 0
        row_number = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise FormatError(f"{path} line {reader.line_num}: not CSV: {error}") from None
            row_number += 1
            if not row or row == [""]:
                continue
            if len(row) != self.pixels + first:
                yield row_number, None, None, "row_length", f"{len(row) - first} pixels, not {self.pixels}"
                continue
            try:
                values = [int(value) for value in row]
            except ValueError:
                yield row_number, None, None, "not_a_number", "a value is not a whole number"
                continue
            label, image = (values[0], values[1:]) if self.labelled else (None, values)
            if label is not None and not 0 <= label < contract.NUM_CLASSES:
                yield row_number, None, None, "bad_label", f"label {label} is not a digit 0-9"
                continue
            if min(image) < 0 or max(image) > 255:
                yield row_number, None, None, "pixel_range", "a pixel is outside 0-255"
                continue
            yield row_number, label, bytes(image), None, None


def _csv_header(path: Path, header: list[str], allow_unlabelled: bool) -> tuple[bool, int]:
    """(labelled, pixels a row) from a Kaggle header, or a FormatError saying what is wrong."""
    labelled = bool(header) and header[0] == LABEL_COLUMN
    if not labelled and not allow_unlabelled:
        raise FormatError(f"{path} has no header starting with 'label' (Kaggle's train.csv: "
                          "label,pixel0,...,pixel783); an unlabelled test.csv is for `digits predict`")
    names = header[1:] if labelled else header
    pixels = len(names)
    side = math.isqrt(pixels)
    if pixels < 1 or side * side != pixels or names != [f"pixel{i}" for i in range(pixels)]:
        expected = "label,pixel0,...,pixelN" if labelled else "[label,]pixel0,...,pixelN"
        raise FormatError(f"{path}: the header must be {expected} with a square number of pixels "
                          f"(Kaggle's: 784), got {len(header)} columns starting {','.join(header[:2])[:40]!r}")
    return labelled, pixels


def csv_lines(path: Path) -> int:
    """Lines after the header: the rows, for a progress bar (a CSV row of digits never spans lines;
    blank lines make it an upper bound). Counted in 1 MB blocks: ~0.1 s for Kaggle's 73 MB train.csv."""
    count, last = 0, b""
    with open_bytes(path) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    if count and last != b"\n":
        count += 1
    return max(count - 1, 0)


def iter_csv(path: Path) -> Iterator[tuple[int, int | None, bytes | None, str | None, str | None]]:
    """The rows of a labelled Kaggle CSV (CsvDigits' rows)."""
    with CsvDigits(path) as rows:
        yield from rows


def grayscale_png(pixels: bytes, rows: int, cols: int) -> bytes:
    """The 8-bit grayscale PNG of `rows` x `cols` pixel bytes (the embedded sample's encoder)."""
    import numpy as np

    from data.sample import encode_png

    return encode_png(np.frombuffer(pixels, dtype=np.uint8).reshape(rows, cols))


def _write(tree: Path, part: str, label: int, index: int, png: bytes) -> None:
    directory = tree / part / str(label)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{index:06d}.png", "wb") as handle:
        handle.write(png)


Progress = Callable[[int, int], None]  # (records done, records in all)
PROGRESS_EVERY = 1000  # records between progress calls


def convert(source: Path, kind: str, tree: Path, on_progress: Progress | None = None) -> Converted:
    """Writes `source` (IDX directory or CSV file) as an mnist-png tree under `tree`."""
    report = on_progress or (lambda done, total: None)
    if kind == "idx":
        return _convert_idx(source, tree, report)
    if kind == "csv":
        return _convert_csv(source, tree, report)
    raise ValueError(f"nothing to convert for {kind!r}")


def source_files(source: Path, kind: str) -> list[str]:
    """The files a conversion reads (for --if-changed's fingerprint), checked to be there."""
    if kind == "csv":
        return [str(source)]
    return [str(path) for pair in _idx_pairs(source).values() for path in pair]


def _idx_pairs(source: Path) -> dict[str, tuple[Path, Path]]:
    pairs = {}
    for part, (images, labels) in IDX_FILES.items():
        found = _idx_path(source, images), _idx_path(source, labels)
        if found == (None, None):
            continue
        if None in found:
            missing = images if found[0] is None else labels
            raise FormatError(f"{source} has {found[0] or found[1]} but no {missing}[.gz] beside it")
        pairs[part] = found
    if contract.TRAINING_DIR not in pairs:
        raise FormatError(f"{source} has no train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]")
    if contract.TESTING_DIR not in pairs:
        raise FormatError(f"{source} has no t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
                          "(the held-out test split)")
    return pairs


def _convert_idx(source: Path, tree: Path, report: Progress) -> Converted:
    pairs = _idx_pairs(source)
    total, done = sum(idx_images_shape(images)[0] for images, _ in pairs.values()), 0
    # Every header and size first: a mismatch anywhere stops before one image is written.
    for images, labels in pairs.values():
        with contextlib.closing(iter_idx(images, labels)) as records:
            next(records, None)
    result = Converted("idx", [str(path) for pair in pairs.values() for path in pair])
    for part, (images, labels) in pairs.items():
        _, rows, cols = idx_images_shape(images)
        for index, label, pixels in iter_idx(images, labels):
            done += 1
            if done % PROGRESS_EVERY == 0:
                report(done, total)
            if label >= contract.NUM_CLASSES:
                result.rejects.append((f"{images.name}#{index}", "bad_label", f"label {label} is not a digit 0-9"))
                continue
            _write(tree, part, label, index, grayscale_png(pixels, rows, cols))
            result.written += 1
    report(done, total)
    return result


def _convert_csv(source: Path, tree: Path, report: Progress) -> Converted:
    result = Converted("csv", [str(source)])
    side, total = None, csv_lines(source)
    for row_number, label, pixels, reason, detail in iter_csv(source):
        if (row_number - 1) % PROGRESS_EVERY == 0:
            report(row_number - 1, total)
        if reason is not None:
            result.rejects.append((f"{source.name}:{row_number}", reason, detail))
            continue
        side = side or math.isqrt(len(pixels))
        part = contract.TESTING_DIR if row_number % TEST_EVERY == 0 else contract.TRAINING_DIR
        _write(tree, part, label, row_number, grayscale_png(pixels, side, side))
        result.written += 1
    if result.written == 0:
        raise FormatError(f"{source} holds no valid row ({len(result.rejects)} rejected)")
    report(total, total)
    return result


def source_fingerprint(files: list[str]) -> str:
    """Path, size and modification time of the source files: changes when they do."""
    import hashlib

    lines = []
    for path in sorted(files):
        info = os.stat(path)
        lines.append(f"{path} {info.st_size} {info.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
