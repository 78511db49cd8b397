"""The TFRecord builder on real digit trees: splits, round trip, determinism, manifest, atomicity."""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_digits
from tfrecord_builder import manifest as manifest_io
from tfrecord_builder.builder import BuildError, build
from tfrecord_builder.config import BuildConfig
from tfrecord_builder.tfrecord import read_records


def _read_split(output: Path, split: str) -> list[tuple[bytes, int]]:
    """(PNG bytes, label) of every example in a split, through TensorFlow's own reader and parser."""
    import tensorflow as tf

    files = sorted(str(p) for p in (output / split).glob("*.tfrecord.gz"))
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").map(
        lambda record: tf.io.parse_single_example(record, spec)
    )
    return [(row["image"].numpy(), int(row["label"])) for row in dataset]


@pytest.fixture(scope="module")
def built(sample_tree, tmp_path_factory):
    output = tmp_path_factory.mktemp("built") / "tfrecords"
    result = build(BuildConfig(source=sample_tree, output=output, workers=2, shards=3))
    return result


def test_splits_are_stratified_and_test_comes_only_from_testing(built):
    splits = built.manifest["splits"]
    assert {s: splits[s]["examples"] for s in splits} == {"train": 3600, "eval": 400, "test": 1000}
    assert set(splits["train"]["per_class"].values()) == {360}
    assert set(splits["eval"]["per_class"].values()) == {40}
    assert set(splits["test"]["per_class"].values()) == {100}
    counts = built.manifest["counts"]
    assert counts == {"seen": 5000, "written": 5000, "rejected": 0, "not_selected": 0, "converted": 0}
    assert (built.output / "rejects.jsonl").read_text() == ""


def test_png_bytes_and_labels_round_trip_exactly(built, sample_tree):
    def digests(pairs):
        return collections.Counter((hashlib.sha256(png).hexdigest(), label) for png, label in pairs)

    source = {
        part: digests((p.read_bytes(), int(p.parent.name)) for p in (sample_tree / part).glob("*/*.png"))
        for part in ("training", "testing")
    }
    train, eval_, test = (digests(_read_split(built.output, s)) for s in ("train", "eval", "test"))
    assert test == source["testing"]
    assert train + eval_ == source["training"]
    assert not set(train) & set(eval_)  # no digit in both train and eval


def test_shards_mix_classes_and_match_the_manifest(built):
    shards = built.manifest["splits"]["train"]["shards"]
    assert [s["file"] for s in shards] == [f"train/data-{i:05d}-of-00003.tfrecord.gz" for i in range(3)]
    for shard in shards:
        records = list(read_records(built.output / shard["file"]))
        assert len(records) == shard["examples"] > 1000
    labels = [label for _, label in _read_split(built.output, "train")[:200]]
    assert len(set(labels)) == 10  # shuffled: the first 200 examples cover every class


def test_manifest_verifies_and_detects_tampering(built, tmp_path):
    manifest = manifest_io.verify(built.output)
    assert manifest["source_root"] == str(built.manifest["source_root"])
    assert manifest["options"]["seed"] == 42 and manifest["builder_version"]
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(built.output), str(copy)], check=True)
    shard = copy / manifest["splits"]["eval"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(manifest_io.ManifestError, match="does not match its checksum"):
        manifest_io.verify(copy)


def test_output_does_not_depend_on_worker_count_but_on_seed(small_tree, tmp_path):
    root = small_tree(train_per_class=30, test_per_class=5)

    def checksum(workers, seed=42):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        return build(BuildConfig(source=root, output=out, workers=workers, shards=4, seed=seed)).manifest["checksum"]

    assert checksum(1) == checksum(2)
    assert checksum(2, seed=7) != checksum(2)


def test_per_class_subsample_is_balanced_and_accounted_for(sample_tree, tmp_path):
    config = BuildConfig(source=sample_tree, output=tmp_path / "o", per_class=50, test_per_class=10, eval_fraction=0.2)
    manifest = build(config).manifest
    assert set(manifest["splits"]["train"]["per_class"].values()) == {40}
    assert set(manifest["splits"]["eval"]["per_class"].values()) == {10}
    assert set(manifest["splits"]["test"]["per_class"].values()) == {10}
    counts = manifest["counts"]
    assert counts["not_selected"] == 5000 - 600
    assert counts["seen"] == counts["written"] + counts["rejected"] + counts["not_selected"]


def test_existing_output_needs_overwrite_and_is_replaced_whole(small_tree, tmp_path):
    root = small_tree()
    out = tmp_path / "out"
    first = build(BuildConfig(source=root, output=out, shards=2))
    with pytest.raises(BuildError, match="--overwrite"):
        build(BuildConfig(source=root, output=out))
    assert manifest_io.verify(out)["checksum"] == first.manifest["checksum"]
    second = build(BuildConfig(source=root, output=out, shards=1, overwrite=True))
    assert sorted(p.name for p in (out / "train").iterdir()) == ["data-00000-of-00001.tfrecord.gz"]
    assert manifest_io.verify(out)["checksum"] == second.manifest["checksum"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _big_tree(sample_tree: Path, root: Path, copies: int) -> Path:
    """`copies` hard links of every sample digit: a tree big enough to interrupt mid-build."""
    for png in sample_tree.glob("*/*/*.png"):
        target = root / png.relative_to(sample_tree).parent
        target.mkdir(parents=True, exist_ok=True)
        for copy in range(copies):
            os.link(png, target / f"{png.stem}-{copy}.png")
    return root


def _start_build(source: Path, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "digits", "data", "build", str(source), "--out", str(output), "--workers", "2",
         *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # A test run started in the background (`cmd &` in a script) inherits SIGINT ignored, and so
        # would the build, which then rightly cannot be interrupted: give it the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_staging(output: Path, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        staged = list(output.parent.glob(f".{output.name}.tmp-*/*/*.tfrecord.gz"))
        if staged:
            return staged[0]
        time.sleep(0.02)
    raise AssertionError("the build never started writing shards")


def _interrupt_build(source: Path, output: Path, interrupt, *extra: str) -> tuple[int, str]:
    """Starts `digits data build`, calls interrupt(process) once shards are being written; (exit code, stderr)."""
    process = _start_build(source, output, *extra)
    try:
        _wait_for_staging(output)
        interrupt(process)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_interrupted_build_leaves_previous_output_and_nothing_half_written(sample_tree, small_tree, tmp_path, how):
    out = tmp_path / "out"
    previous = build(BuildConfig(source=small_tree(), output=out)).manifest["checksum"]
    big = _big_tree(sample_tree, tmp_path / "big", copies=12)  # 60,000 files
    returncode, stderr = _interrupt_build(big, out, lambda process: os.kill(process.pid, getattr(signal, how)),
                                          "--overwrite", "--shards", "8")
    assert returncode == 130
    assert stderr.strip().splitlines() == ["error: interrupted; nothing was written (any previous output is unchanged)"]
    assert manifest_io.verify(out)["checksum"] == previous
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_killed_build_leaves_only_a_hidden_staging_dir_that_the_next_build_removes(sample_tree, tmp_path):
    out = tmp_path / "out"
    big = _big_tree(sample_tree, tmp_path / "big", copies=12)
    # The builder and its workers, with no chance to clean up.
    _interrupt_build(big, out, lambda process: os.killpg(process.pid, signal.SIGKILL), "--shards", "8")
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers and all(not (p / "manifest.json").exists() for p in leftovers)
    with pytest.raises(manifest_io.ManifestError):
        manifest_io.read_manifest(leftovers[0])

    result = run_digits("data", "build", big, "--out", out, "--per-class", "20", "--test-per-class", "5", timeout=300)
    assert result.returncode == 0, result.stderr
    assert manifest_io.verify(out)["counts"]["written"] == 250
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_a_worker_killed_mid_build_fails_the_build_cleanly_instead_of_hanging(sample_tree, tmp_path):
    import psutil

    out = tmp_path / "out"
    big = _big_tree(sample_tree, tmp_path / "big", copies=12)
    def kill_one_worker(process) -> None:
        workers = psutil.Process(process.pid).children(recursive=True)
        victims = [w for w in workers if "multiprocessing" in " ".join(w.cmdline())
                   and "resource_tracker" not in " ".join(w.cmdline())]
        assert victims, [w.cmdline() for w in workers]
        victims[0].kill()

    returncode, stderr = _interrupt_build(big, out, kill_one_worker, "--shards", "8")
    assert returncode == 1
    assert stderr.strip().splitlines() == ["error: a worker process died (killed or out of memory); nothing was written"]
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _on_disk(directory: Path) -> dict[str, tuple[int, int, str]]:
    """(inode, mtime in ns, SHA-256) of the directory and of every file under it, by relative path."""
    found = {".": (directory.stat().st_ino, directory.stat().st_mtime_ns, "")}
    for path in sorted(directory.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(directory))] = (stat.st_ino, stat.st_mtime_ns, digest)
    return found


def test_if_changed_keeps_a_matching_build_and_rebuilds_when_tree_or_options_change(small_tree, tmp_path):
    root = small_tree()
    out = tmp_path / "out"
    first = build(BuildConfig(source=root, output=out, if_changed=True))
    before = _on_disk(out)
    again = build(BuildConfig(source=root, output=out, if_changed=True))
    assert again.up_to_date and again.manifest["checksum"] == first.manifest["checksum"]
    assert _on_disk(out) == before  # not rewritten, not even with the same bytes

    reseeded = build(BuildConfig(source=root, output=out, seed=7, if_changed=True))
    assert not reseeded.up_to_date and reseeded.manifest["options"]["seed"] == 7

    extra = next((root / "training" / "5").iterdir())
    extra.with_name("new.png").write_bytes(extra.read_bytes())
    grown = build(BuildConfig(source=root, output=out, seed=7, if_changed=True))
    assert not grown.up_to_date and grown.manifest["counts"]["written"] == reseeded.manifest["counts"]["written"] + 1
    assert grown.manifest["source_fingerprint"] != reseeded.manifest["source_fingerprint"]
