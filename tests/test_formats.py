"""`digits data build` from MNIST's IDX files and Kaggle's CSV: the same digits as the PNG path, every
record accounted for, and a broken file one line with nothing written. Files are made here from the
embedded digits; nothing is downloaded."""

from __future__ import annotations

import csv
import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_digits
from data import contract
from test_builder import _read_split
from tfrecord_builder.builder import BuildError, build
from tfrecord_builder.config import BuildConfig


def _digits(tree: Path, part: str) -> list[tuple[int, np.ndarray]]:
    """(label, 28x28 pixels) of a part of an mnist-png tree, by label then file name."""
    found = []
    for label in range(contract.NUM_CLASSES):
        for path in sorted((tree / part / str(label)).glob("*.png")):
            with Image.open(path) as image:
                found.append((label, np.asarray(image.convert("L"))))
    return found


def write_idx(directory: Path, prefix: str, digits, compress: bool = True, labels=None) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    images = struct.pack(">4B3I", 0, 0, 8, 3, len(digits), 28, 28) + b"".join(p.tobytes() for _, p in digits)
    labels = labels if labels is not None else bytes(label for label, _ in digits)
    labels = struct.pack(">4BI", 0, 0, 8, 1, len(labels)) + labels
    suffix = ".gz" if compress else ""
    paths = directory / f"{prefix}-images-idx3-ubyte{suffix}", directory / f"{prefix}-labels-idx1-ubyte{suffix}"
    for path, data in zip(paths, (images, labels)):
        path.write_bytes(gzip.compress(data) if compress else data)
    return paths


def write_csv(path: Path, digits, extra_rows=()) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label"] + [f"pixel{i}" for i in range(784)])
        for label, pixels in digits:
            writer.writerow([label, *pixels.ravel().tolist()])
        for row in extra_rows:
            writer.writerow(row)
    return path


def _decoded(output: Path, split: str) -> list[tuple[bytes, int]]:
    return [(np.asarray(Image.open(io.BytesIO(png)).convert("L")).tobytes(), label)
            for png, label in _read_split(output, split)]


@pytest.fixture(scope="module")
def embedded(sample_tree):
    return {part: _digits(sample_tree, part) for part in contract.SOURCE_DIRS}


def test_idx_files_build_the_same_digits_in_the_same_splits_as_the_pngs(sample_tree, embedded, tmp_path):
    """All 5,000 embedded digits as IDX (gzipped training, raw test): every split's decoded pixels and
    labels equal the PNG build's, in order."""
    idx = tmp_path / "idx"
    write_idx(idx, "train", embedded[contract.TRAINING_DIR], compress=True)
    write_idx(idx, "t10k", embedded[contract.TESTING_DIR], compress=False)
    png = build(BuildConfig(source=sample_tree, output=tmp_path / "png", workers=1)).manifest
    progress = []
    from_idx = build(BuildConfig(source=idx, output=tmp_path / "from-idx", workers=1),
                     on_progress=lambda done, total: progress.append((done, total))).manifest
    conversion = progress[:progress.index((5000, 5000)) + 1]  # the conversion's progress, then the build's
    assert conversion == [(done, 5000) for done in range(1000, 5001, 1000)]
    for split in contract.SPLITS:
        assert _decoded(tmp_path / "from-idx", split) == _decoded(tmp_path / "png", split), split
    assert from_idx["splits"]["train"]["per_class"] == png["splits"]["train"]["per_class"]
    assert (from_idx["source_format"], from_idx["source_root"]) == ("idx", str(idx.resolve()))
    assert from_idx["counts"]["seen"] == 5000 == from_idx["counts"]["written"] + from_idx["counts"]["rejected"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the converted tree is gone


def test_a_balanced_subsample_of_idx_files_is_the_pngs_subsample(sample_tree, embedded, tmp_path):
    """--per-class / --test-per-class (as the original project took 5,000 of 60,000) pick the same
    digits from IDX files as from the PNG tree."""
    idx = tmp_path / "idx"
    write_idx(idx, "train", embedded[contract.TRAINING_DIR])
    write_idx(idx, "t10k", embedded[contract.TESTING_DIR])
    for source, name in ((sample_tree, "png"), (idx, "from-idx")):
        build(BuildConfig(source=source, output=tmp_path / name, workers=1, per_class=20, test_per_class=5))
    for split in contract.SPLITS:
        assert _decoded(tmp_path / "from-idx", split) == _decoded(tmp_path / "png", split), split
    assert sorted(label for _, label in _decoded(tmp_path / "png", "test")) == sorted(list(range(10)) * 5)


def test_a_kaggle_csv_builds_the_same_digits(sample_tree, embedded, tmp_path):
    """All 5,000 digits as one labelled CSV: the same pixels and labels over all splits; one row in
    seven is the held-out test split; bad rows are rejected with their reason and row number."""
    rows = embedded[contract.TRAINING_DIR] + embedded[contract.TESTING_DIR]
    source = write_csv(tmp_path / "train.csv", rows, extra_rows=[
        [3] + [0] * 783, [300] + [0] * 784, [4] + [0] * 783 + [256], [5] + ["x"] * 784])
    progress = []
    manifest = build(BuildConfig(source=source, output=tmp_path / "out", workers=1),
                     on_progress=lambda done, total: progress.append((done, total))).manifest
    assert progress[:6] == [(done, 5004) for done in (1000, 2000, 3000, 4000, 5000, 5004)]
    built = sorted(item for split in contract.SPLITS for item in _decoded(tmp_path / "out", split))
    assert built == sorted((pixels.tobytes(), label) for label, pixels in rows)
    assert manifest["splits"]["test"]["examples"] == sum(1 for n in range(2, len(rows) + 2) if n % 7 == 0)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["reason"], r["path"]) for r in rejects) == [
        ("bad_label", "train.csv:5003"), ("not_a_number", "train.csv:5005"), ("pixel_range", "train.csv:5004"),
        ("row_length", "train.csv:5002")]
    assert manifest["counts"]["seen"] == 5004 and manifest["counts"]["rejected"] == 4


def test_if_changed_keeps_an_idx_build_until_the_files_change(embedded, tmp_path):
    idx = tmp_path / "idx"
    write_idx(idx, "train", embedded[contract.TRAINING_DIR][:200])
    write_idx(idx, "t10k", embedded[contract.TESTING_DIR][:50])
    config = BuildConfig(source=idx, output=tmp_path / "out", workers=1, if_changed=True)
    assert not build(config).up_to_date and build(config).up_to_date
    write_idx(idx, "t10k", embedded[contract.TESTING_DIR][:60])
    rebuilt = build(config)
    assert not rebuilt.up_to_date and rebuilt.manifest["splits"]["test"]["examples"] == 60


@pytest.mark.parametrize("case, words", [
    ("labels shorter", "holds 20 images but train-labels-idx1-ubyte.gz 19 labels"),
    ("truncated", "truncated"),
    ("wrong magic", "is not an IDX file of 3-dimensional unsigned bytes"),
    ("no test files", "no t10k-images-idx3-ubyte"),
    ("images without labels", "but no t10k-labels-idx1-ubyte"),
])
def test_a_broken_idx_set_is_one_line_and_writes_nothing(embedded, tmp_path, case, words):
    idx = tmp_path / "idx"
    train = embedded[contract.TRAINING_DIR][:20]
    images, labels = write_idx(idx, "train", train, labels=bytes(d for d, _ in train[:19]) if case == "labels shorter"
                               else None)
    test_images, test_labels = write_idx(idx, "t10k", embedded[contract.TESTING_DIR][:5], compress=False)
    if case == "truncated":
        test_images.write_bytes(test_images.read_bytes()[:-100])
    elif case == "wrong magic":
        images.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + gzip.decompress(images.read_bytes())[4:]))
    elif case == "no test files":
        test_images.unlink()
        test_labels.unlink()
    elif case == "images without labels":
        test_labels.unlink()
    with pytest.raises(BuildError, match=words):
        build(BuildConfig(source=idx, output=tmp_path / "out", workers=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    result = run_digits("data", "build", idx, "--out", tmp_path / "cli", "--workers", "1")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("content, words", [
    ("pixel0,pixel1\n", "no header starting with 'label'"),
    ("", "is empty"),
    ("label,pixel0,pixel1\n1,2,3\n", "square number of pixels"),
    ("label," + ",".join(f"pixel{i}" for i in range(4)) + "\n1,0,0,0,300\n", "no valid row"),
])
def test_a_bad_csv_is_one_line_and_writes_nothing(tmp_path, content, words):
    source = tmp_path / "train.csv"
    source.write_text(content)
    with pytest.raises(BuildError, match=words):
        build(BuildConfig(source=source, output=tmp_path / "out", workers=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv"]
