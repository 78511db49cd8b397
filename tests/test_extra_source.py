"""`digits data build --extra-source`: people's corrections (the web app's feedback tree) join the train
split once a reviewer accepted them; pending and rejected ones are counted and never read."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import run_digits
from data import contract
from test_builder import _read_split
from tfrecord_builder import manifest as manifest_io
from tfrecord_builder.builder import BuildError, build
from tfrecord_builder.config import BuildConfig
from web.feedback import LOG_NAME, FeedbackStore


def _feedback_tree(root, count: int = 6, accept: bool = True):
    """What `digits web` writes (28x28 normalised digits, queued, and its log), then a reviewer's
    acceptance of each (they move to training/<digit>/)."""
    store = FeedbackStore(root)
    records = []
    for index in range(count):
        picture = [[1.0 if 8 <= x <= 19 and y == 4 + index else 0.0 for x in range(28)] for y in range(28)]
        record = store.add(picture, predicted=1, corrected=index % 10, confidence=0.6, model_name="digits",
                           model_version=7, client="10.0.0.1")
        if accept:
            store.review(record.id, "accepted", reviewer="test")
            record = dataclasses.replace(record, image=f"training/{record.corrected}/{record.id}.png")
        records.append(record)
    return records


def test_corrections_join_the_train_split_only(small_tree, tmp_path):
    tree = small_tree(train_per_class=10, test_per_class=4)
    feedback = tmp_path / "feedback"
    records = _feedback_tree(feedback)
    plain = build(BuildConfig(source=tree, output=tmp_path / "plain", workers=1)).manifest
    with_feedback = build(BuildConfig(source=tree, output=tmp_path / "out", workers=1,
                                      extra_sources=(feedback,))).manifest
    assert with_feedback["splits"]["train"]["examples"] == plain["splits"]["train"]["examples"] + len(records)
    for split in (contract.EVAL_SPLIT, contract.TEST_SPLIT):  # model choice and the held-out test are unchanged
        assert _read_split(tmp_path / "out", split) == _read_split(tmp_path / "plain", split)
    train = _read_split(tmp_path / "out", contract.TRAIN_SPLIT)
    for record in records:  # each correction, byte for byte, with the person's label
        assert ((feedback / record.image).read_bytes(), record.corrected) in train
    assert with_feedback["extra_sources"] == [{"path": str(feedback.resolve()), "training_files": len(records),
                                               "corrections": {"accepted": len(records), "pending": 0,
                                                               "rejected": 0}}]
    assert with_feedback["options"]["extra_sources"] == [str(feedback)]
    # The logs and the lock file are not digits: not counted, not rejected.
    assert with_feedback["counts"]["rejected"] == plain["counts"]["rejected"] == 0
    manifest_io.verify(tmp_path / "out")


def test_a_testing_dir_in_an_extra_source_is_reported_not_used(small_tree, tmp_path):
    tree = small_tree(train_per_class=10, test_per_class=4)
    feedback = tmp_path / "feedback"
    _feedback_tree(feedback, count=2)
    (feedback / "testing" / "3").mkdir(parents=True)
    stray = next((tree / "testing" / "3").iterdir())
    (feedback / "testing" / "3" / "x.png").write_bytes(stray.read_bytes())
    (feedback / "notes.txt").write_text("hello")
    manifest = build(BuildConfig(source=tree, output=tmp_path / "out", workers=1, extra_sources=(feedback,))).manifest
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == ["extra_testing", "not_in_layout"]
    assert manifest["splits"]["test"]["examples"] == 40


def test_if_changed_rebuilds_when_corrections_are_accepted(small_tree, tmp_path):
    tree = small_tree(train_per_class=10, test_per_class=4)
    feedback = tmp_path / "feedback"
    _feedback_tree(feedback, count=2)
    config = BuildConfig(source=tree, output=tmp_path / "out", workers=1, if_changed=True, extra_sources=(feedback,))
    assert not build(config).up_to_date
    assert build(config).up_to_date
    store = FeedbackStore(feedback)
    record = store.add([[0.0] * 28] * 27 + [[1.0] * 28], predicted=2, corrected=5, confidence=0.5,
                       model_name="digits", model_version=8)
    assert build(config).up_to_date  # a proposal changes no training data
    store.review(record.id, "accepted", reviewer="test")
    rebuilt = build(config)
    assert not rebuilt.up_to_date and rebuilt.manifest["extra_sources"][0]["training_files"] == 3
    # Without the extra source, the same output is a different build.
    assert not build(BuildConfig(source=tree, output=tmp_path / "out", workers=1, if_changed=True)).up_to_date


def test_bad_extra_sources_are_one_line_errors(small_tree, tmp_path):
    tree = small_tree(train_per_class=4, test_per_class=2)
    with pytest.raises(BuildError, match="does not exist"):
        build(BuildConfig(source=tree, output=tmp_path / "out", extra_sources=(tmp_path / "missing",)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="has no training/ directory"):
        build(BuildConfig(source=tree, output=tmp_path / "out", extra_sources=(tmp_path / "empty",)))
    with pytest.raises(ValueError, match="given once"):
        BuildConfig(source=tree, output=tmp_path / "out", extra_sources=(tmp_path / "a", tmp_path / "a"))
    result = run_digits("data", "build", tree, "--out", tmp_path / "cli", "--extra-source", tmp_path / "empty",
                        "--quiet")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "has no training/ directory" in result.stderr


def test_a_training_image_no_reviewer_accepted_is_reported_not_trained_on(small_tree, tmp_path):
    """In a feedback tree, training/ holds what reviews.jsonl accepted; anything else there (written by a
    version without review, copied in by hand, moved by a crash before its review line, or accepted as
    another digit) is reported as `unreviewed` and never reaches the train split."""
    tree = small_tree(train_per_class=10, test_per_class=4)
    feedback = tmp_path / "feedback"
    [reviewed] = _feedback_tree(feedback, count=1)
    legacy = feedback / "training" / "4" / f"{'c' * 24}.png"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_bytes((feedback / reviewed.image).read_bytes())
    relabelled = feedback / "training" / "9" / (feedback / reviewed.image).name
    relabelled.parent.mkdir(parents=True, exist_ok=True)
    relabelled.write_bytes((feedback / reviewed.image).read_bytes())
    manifest = build(BuildConfig(source=tree, output=tmp_path / "out", workers=1, extra_sources=(feedback,))).manifest
    assert manifest["extra_sources"][0]["training_files"] == 1
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["reason"], r["path"].rsplit("/", 2)[-2]) for r in rejects) == [("unreviewed", "4"),
                                                                                     ("unreviewed", "9")]
    train = _read_split(tmp_path / "out", contract.TRAIN_SPLIT)
    assert ((feedback / reviewed.image).read_bytes(), reviewed.corrected) in train
    assert sum(1 for image, _ in train if image == legacy.read_bytes()) == 1  # the reviewed copy only
