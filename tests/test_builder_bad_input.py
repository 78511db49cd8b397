"""The builder on a messy mnist-png tree: every bad file is rejected with its reason, every good one written.

One corpus holds every kind of bad input at once beside real digits; the API build
and the real CLI must account for each file (seen == written + rejected), and every
failure of the CLI must be one `error:` line, exit code 1 (2 for bad options), no
traceback, and no output or staging directory left behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_digits
from tfrecord_builder import manifest as manifest_io
from tfrecord_builder.builder import BuildError, build
from tfrecord_builder.config import BuildConfig
from tfrecord_builder.tfrecord import read_records

TRAIN_PER_CLASS = 10
TEST_PER_CLASS = 4

# Valid files the corpus adds to the copied digits: (part, label) -> files.
EXTRA_VALID = Counter({("training", 5): 1, ("training", 6): 1, ("training", 7): 1, ("testing", 8): 1})
CONVERTED = {"RGB 8-bit": 1, "gray 16-bit": 1, "palette 8-bit": 1}
WRONG_SIZE_FILE = "testing/3/big.png"


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_bad_corpus(root: Path) -> dict[str, str]:
    """Adds every kind of bad input (and a few convertible PNGs) to a mnist-png tree.

    Returns {path relative to root: expected reject reason}.
    """
    def digit(part: str, label: int) -> Image.Image:
        with Image.open(sorted((root / part / str(label)).glob("*.png"))[0]) as image:
            return image.copy()

    def put(relative: str, data: bytes) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    good = next((root / "training" / "1").glob("*.png")).read_bytes()
    expected = {}

    def bad(relative: str, reason: str, data: bytes | None = None) -> None:
        if data is not None:
            put(relative, data)
        expected[relative] = reason

    # Valid, converted to 8-bit gray or kept: RGB, 16-bit gray, palette, an upper-case extension.
    put("training/6/rgb.png", png_bytes(digit("training", 6).convert("RGB")))
    wide = np.asarray(digit("training", 7), dtype=np.uint16) * 257  # 16-bit, scaled back to the same digit
    put("training/7/gray16.png", png_bytes(Image.fromarray(wide)))
    put("testing/8/palette.png", png_bytes(digit("testing", 8).convert("P")))
    put("training/5/UPPER.PNG", good)

    # Bad content in the right place.
    bad("training/0/empty.png", "empty_file", b"")
    bad("training/1/truncated.png", "truncated", good[: len(good) // 2])
    bad("training/1/notes.png", "not_an_image", b"these are my notes, not a digit\n")
    bad("training/8/photo.png", "wrong_format", png_bytes(digit("training", 8), "JPEG"))
    crc = bytearray(good)
    crc[50] ^= 0xFF  # inside the IDAT data: the chunk's CRC no longer matches
    bad("training/5/crc.png", "corrupt", bytes(crc))
    bad("training/9/rgba.png", "has_alpha", png_bytes(digit("training", 9).convert("RGBA")))
    bad(WRONG_SIZE_FILE, "wrong_size", png_bytes(digit("testing", 3).resize((32, 32))))
    bad("training/2/huge.png", "too_large", good)
    with open(root / "training/2/huge.png", "r+b") as stream:
        stream.truncate(11 * 1024 * 1024)  # sparse: over the 10 MiB limit without using the disk

    # Good PNGs in the wrong place, or files that are not PNGs at all.
    bad("training/10/a.png", "bad_label", good)
    bad("training/abc/b.png", "bad_label", good)
    bad("testing/03/c.png", "bad_label", good)
    bad(".DS_Store", "hidden", b"\x00\x00\x00\x01Bud1")
    bad("training/.DS_Store", "hidden", b"\x00\x00\x00\x01Bud1")
    bad("testing/1/._1.png", "hidden", b"\x00\x05\x16\x07AppleDouble")
    bad("training/2/.ipynb_checkpoints/3-checkpoint.png", "hidden", good)
    bad("README.txt", "not_in_layout", b"MNIST as PNGs\n")
    bad("training/stray.png", "not_in_layout", good)
    bad("training/3/sub/x.png", "not_in_layout", good)
    bad("training/4/notes.jpg", "wrong_extension", png_bytes(digit("training", 4), "JPEG"))

    # Not regular files: a dangling symlink, symlink loops, a FIFO (reading it would hang).
    os.symlink("does-not-exist.png", root / "training/2/dangling.png")
    expected["training/2/dangling.png"] = "unreadable"
    os.symlink("loop.png", root / "training/2/loop.png")
    expected["training/2/loop.png"] = "symlink_loop"
    os.symlink("..", root / "training/4/up", target_is_directory=True)
    expected["training/4/up"] = "symlink_loop"
    os.symlink("../../testing/7", root / "training/7/again", target_is_directory=True)  # testing/ is walked first
    expected["training/7/again"] = "symlink_loop"
    os.mkfifo(root / "training/5/fifo.png")
    expected["training/5/fifo.png"] = "not_regular_file"
    return expected


def expected_per_class(part: str, base: int, extra: Counter = EXTRA_VALID) -> dict[str, int]:
    return {str(label): base + extra[(part, label)] for label in range(10)}


def read_rejects(out: Path) -> dict[str, dict]:
    rejects = {}
    for line in (out / manifest_io.REJECTS_NAME).read_text().splitlines():
        record = json.loads(line)
        assert set(record) == {"path", "reason", "detail"} and record["detail"], record
        assert record["path"] not in rejects, f"{record['path']} is listed twice"
        rejects[record["path"]] = record
    return rejects


def assert_accounts_for_every_file(out: Path, expected: dict[str, str], extra_valid: Counter = EXTRA_VALID):
    manifest = json.loads((out / manifest_io.MANIFEST_NAME).read_text())
    counts = manifest["counts"]
    written = 10 * (TRAIN_PER_CLASS + TEST_PER_CLASS) + sum(extra_valid.values())
    assert counts["written"] == written
    assert counts["rejected"] == len(expected)
    assert counts["not_selected"] == 0
    assert counts["seen"] == written + len(expected)
    assert counts["seen"] == counts["written"] + counts["rejected"] + counts["not_selected"]

    assert manifest["rejects"]["by_reason"] == dict(Counter(expected.values()))
    rejects = read_rejects(out)
    assert {path: r["reason"] for path, r in rejects.items()} == expected

    splits = manifest["splits"]
    train_eval = {
        label: splits["train"]["per_class"][label] + splits["eval"]["per_class"][label] for label in map(str, range(10))
    }
    assert train_eval == expected_per_class("training", TRAIN_PER_CLASS, extra_valid)
    assert splits["test"]["per_class"] == expected_per_class("testing", TEST_PER_CLASS, extra_valid)
    assert all(splits["eval"]["per_class"][str(label)] >= 1 for label in range(10))

    # The shards hold exactly the written examples, and match their checksums.
    manifest_io.verify(out)
    records = sum(1 for shard in manifest_io.all_shards(manifest) for _ in read_records(out / shard["file"]))
    assert records == written
    return manifest, rejects


# --- the whole corpus at once ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_build_rejects_every_bad_file_with_its_reason_and_writes_the_rest(small_tree, tmp_path):
    root = small_tree(TRAIN_PER_CLASS, TEST_PER_CLASS)
    expected = make_bad_corpus(root)
    out = tmp_path / "out"

    result = build(BuildConfig(source=root, output=out, workers=2))

    manifest, rejects = assert_accounts_for_every_file(out, expected)
    assert result.manifest == manifest
    assert manifest["converted"] == CONVERTED
    assert manifest["counts"]["converted"] == sum(CONVERTED.values())
    # Every reason code of the builder appears, so the corpus really covers them all.
    assert set(manifest["rejects"]["by_reason"]) == {
        "empty_file", "truncated", "not_an_image", "wrong_format", "corrupt", "has_alpha", "wrong_size",
        "too_large", "bad_label", "hidden", "not_in_layout", "wrong_extension", "unreadable", "symlink_loop",
        "not_regular_file",
    }
    assert "32x32" in rejects[WRONG_SIZE_FILE]["detail"]
    assert "JPEG" in rejects["training/8/photo.png"]["detail"]
    assert "CRC" in rejects["training/5/crc.png"]["detail"]
    assert "'10'" in rejects["training/10/a.png"]["detail"]
    assert not list(tmp_path.glob(".out.tmp-*")), "the staging directory must be renamed into place"


@pytest.mark.timeout(120)
def test_cli_builds_the_same_corpus(small_tree, tmp_path):
    root = small_tree(TRAIN_PER_CLASS, TEST_PER_CLASS)
    expected = make_bad_corpus(root)
    out = tmp_path / "out"

    result = run_digits("data", "build", root, "--out", out, "--workers", "2")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    manifest, _ = assert_accounts_for_every_file(out, expected)
    assert manifest["converted"] == CONVERTED
    assert f"rejected {len(expected)}" in result.stdout  # the summary's balance line


@pytest.mark.timeout(120)
def test_cli_expected_size_any_writes_the_32x32_digit(small_tree, tmp_path):
    root = small_tree(TRAIN_PER_CLASS, TEST_PER_CLASS)
    expected = make_bad_corpus(root)
    del expected[WRONG_SIZE_FILE]
    out = tmp_path / "out"

    result = run_digits("data", "build", root, "--out", out, "--expected-size", "any", "--workers", "2", "--quiet")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    manifest, rejects = assert_accounts_for_every_file(out, expected, EXTRA_VALID + Counter({("testing", 3): 1}))
    assert WRONG_SIZE_FILE not in rejects
    assert manifest["options"]["expected_size"] is None


# --- failures: one clear line, nothing left behind ------------------------------------------------


def assert_clean_failure(result, out: Path, *words: str, code: int = 1, output_existed: bool = False) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if code == 1:
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ")
        assert result.stdout == ""
        message = lines[0]
    else:  # click's usage error: Usage: ..., Try ..., Error: ...
        errors = [line for line in lines if line.startswith("Error: ")]
        assert len(errors) == 1, result.stderr
        message = errors[0]
    for word in words:
        assert word in message, message
    if not output_existed:
        assert not out.exists(), "a failed build must not leave an output directory"
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a failed build must remove its staging directory"
    return message


def make_missing_root(tmp_path, small_tree):
    return tmp_path / "no-such-tree"


def make_file_root(tmp_path, small_tree):
    path = tmp_path / "mnist.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    return path


def make_root_without_testing(tmp_path, small_tree):
    root = small_tree(3, 2)
    shutil.rmtree(root / "testing")
    return root


def make_empty_root(tmp_path, small_tree):
    root = tmp_path / "empty"
    (root / "training").mkdir(parents=True)
    (root / "testing").mkdir()
    return root


@pytest.mark.parametrize("make_root, words", [
    (make_missing_root, ("no-such-tree", "does not exist")),
    (make_file_root, ("mnist.png", "is not a directory")),
    (make_root_without_testing, ("no testing/ directory",)),
    (make_empty_root, ("no valid digits", "0 files seen", "nothing written")),
], ids=["missing-root", "root-is-a-file", "no-testing-dir", "empty-tree"])
def test_cli_bad_root_is_one_error_line(tmp_path, small_tree, make_root, words):
    out = tmp_path / "out"
    result = run_digits("data", "build", make_root(tmp_path, small_tree), "--out", out, "--workers", "1")
    assert_clean_failure(result, out, *words)


@pytest.mark.timeout(120)
def test_cli_tree_of_only_bad_files_names_the_reasons(tmp_path):
    root = tmp_path / "bad"
    for part in ("training", "testing"):
        for label in range(10):
            (root / part / str(label)).mkdir(parents=True)
    (root / "training/0/empty.png").write_bytes(b"")
    (root / "training/1/notes.png").write_text("not a digit\n")
    (root / "training/2/a.png").write_bytes(b"")
    (root / "testing/3/x.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    os.mkfifo(root / "testing/4/fifo.png")
    out = tmp_path / "out"

    result = run_digits("data", "build", root, "--out", out, "--workers", "2")

    message = assert_clean_failure(result, out, "no valid digits", "5 files seen", "0 valid", "5 rejected")
    for reason in ("empty_file 2", "not_an_image 1", "wrong_extension 1", "not_regular_file 1"):
        assert reason in message


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_cli_existing_output_without_overwrite_is_left_untouched(small_tree, tmp_path):
    root = small_tree(3, 2)
    out = tmp_path / "out"
    build(BuildConfig(source=root, output=out, workers=1))
    before = snapshot(out)
    assert "manifest.json" in before

    (root / "training/0/new.png").write_bytes(next((root / "training/1").glob("*.png")).read_bytes())
    result = run_digits("data", "build", root, "--out", out, "--workers", "1")

    assert_clean_failure(result, out, "already exists", "--overwrite", output_existed=True)
    assert snapshot(out) == before


@pytest.mark.parametrize("option, value, words", [
    ("--eval-fraction", "0", ("eval fraction",)),
    ("--workers", "0", ("workers", "at least 1")),
    ("--per-class", "-3", ("per-class", "-3")),
    ("--expected-size", "abc", ("abc", "expected-size")),
], ids=["eval-fraction-0", "workers-0", "per-class-negative", "expected-size-abc"])
def test_cli_bad_option_value_is_a_usage_error(small_tree, tmp_path, option, value, words):
    root = small_tree(3, 2)
    out = tmp_path / "out"
    result = run_digits("data", "build", root, "--out", out, option, value)
    assert_clean_failure(result, out, *words, code=2)


# --- the output's parent directory ----------------------------------------------------------------


def test_unrelated_hidden_file_beside_the_output_does_not_crash_the_build(small_tree, tmp_path):
    """Stale-staging cleanup globs `.out.*-*`; a user's `.out.backup-2024.tar` must not break every build."""
    root = small_tree(3, 2)
    backup = tmp_path / ".out.backup-2024.tar"
    backup.write_bytes(b"user data")
    out = tmp_path / "out"

    result = run_digits("data", "build", root, "--out", out, "--workers", "1", "--quiet")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert backup.read_bytes() == b"user data"


def test_users_hidden_backup_beside_the_output_is_not_deleted(small_tree, tmp_path):
    """Only the builder's own `.out.tmp-<pid>-*` / `.out.old-<pid>` leftovers may be removed."""
    root = small_tree(3, 2)
    backup = tmp_path / ".out.backup-20240101"
    backup.mkdir()
    (backup / "keep.txt").write_text("precious")
    out = tmp_path / "out"

    build(BuildConfig(source=root, output=out, workers=1))

    assert (backup / "keep.txt").read_text() == "precious"


def test_api_failure_is_a_build_error_and_leaves_nothing(tmp_path):
    root = tmp_path / "empty"
    (root / "training/0").mkdir(parents=True)
    (root / "testing/0").mkdir(parents=True)
    (root / "training/0/empty.png").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=r"no valid digits .* empty_file 1"):
        build(BuildConfig(source=root, output=out, workers=1))
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
