"""The run report built inside the pipeline (pipeline/report_component.py) from artifacts alone: no MLMD.

The artifacts are those of one real, tiny pipeline run (the session fixture `pushed_run`), copied away
from its pipeline root and its sqlite store; the RunReport step's own executor writes the page, as it
does on Vertex AI, where there is no local metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data import contract

pytestmark = [pytest.mark.slow]

NOT_MLMD = "Each component's state and wall time are not in this page"


def _latest(directory: Path) -> Path:
    return max(directory.iterdir(), key=lambda path: int(path.name))


@pytest.fixture
def run_artifacts(pushed_run, tmp_path) -> tuple[dict, Path]:
    """(role -> TFX artifact of the pushed run, copied under tmp_path; the pushed version's directory)."""
    from pipeline.report import ROLES
    from pipeline.report_component import RunReport

    model_dir, _ = pushed_run
    root = model_dir.parent.parent / "root"
    [version] = model_dir.iterdir()
    signature = RunReport.SPEC_CLASS.INPUTS
    assert set(signature) == set(ROLES)  # the step reads every role the page knows
    artifacts = {}
    for role, (node, key) in ROLES.items():
        copy = tmp_path / "artifacts" / node / key
        # The SavedModel's weights are not read by the page (its operating point is, in assets.extra).
        shutil.copytree(_latest(root / node / key), copy, ignore=shutil.ignore_patterns("variables"))
        artifact = signature[role].type()
        artifact.uri = str(copy)
        artifacts[role] = artifact
    # What TFX's Pusher records on the artifact (MLMD here; JSON metadata on Vertex AI).
    artifacts["pushed_model"].set_int_custom_property("pushed", 1)
    artifacts["pushed_model"].set_string_custom_property("pushed_version", version.name)
    artifacts["pushed_model"].set_string_custom_property("pushed_destination", str(version))
    assert not list(tmp_path.rglob("*.sqlite"))
    return artifacts, version


def _run_step(artifacts: dict, tmp_path: Path, data_root: str = "") -> str:
    """The RunReport step's executor, called as TFX calls it; the page it wrote."""
    from pipeline.report_component import HtmlReport, RunReport

    report = HtmlReport()
    report.uri = str(tmp_path / "RunReport" / "report" / "1")
    executor = RunReport.EXECUTOR_SPEC.executor_class()
    executor.Do({role: [artifact] for role, artifact in artifacts.items()}, {"report": [report]},
                {"pipeline_name": "digits", "data_root": data_root})
    return (Path(report.uri) / "index.html").read_text()


def test_the_page_is_built_from_the_run_artifacts_alone(run_artifacts, tmp_path):
    artifacts, version = run_artifacts
    build = tmp_path / "build"  # the build the run read: its manifest names people's corrections
    build.mkdir()
    (build / "manifest.json").write_text(json.dumps({"extra_sources": [
        {"path": "/data/feedback", "training_files": 12, "corrections": {"accepted": 12, "pending": 3}}]}))
    page = _run_step(artifacts, tmp_path, data_root=str(build))

    assert NOT_MLMD in page and "<th>wall time</th>" not in page  # no MLMD, so no component times
    assert f"RunReport artifact: <code>{tmp_path / 'RunReport' / 'report' / '1'}</code>" in page
    for expected in (
            # data and anomalies
            f"<tr><td>{contract.TRAIN_SPLIT}</td><td class=n>180</td>", "none: every split matches",
            "12 digits added to the train split from /data/feedback",
            # training, with the gates read back from the EvalConfig TFMA wrote beside its metrics
            "random initialisation", "alt='training curves'", "<caption>gates</caption>",
            "<tr><td>every digit's recall at least</td><td class=n>0</td></tr>", "alt='risk-coverage curve'",
            # evaluation, blessing, push
            "examples: <b>50</b>", "alt='confusion matrix'", "<b>BLESSED</b>", "(no blessed model yet to compare with)",
            f"pushed version <b>{version.name}</b> to <code>{version}</code>"):
        assert expected in page, expected
    assert "could not be read" not in page


def test_a_not_blessed_run_says_why_and_that_nothing_was_pushed(run_artifacts, tmp_path):
    """The Evaluator's NOT_BLESSED and its validation failure, then the Pusher's pushed=0: a verdict on
    the page, not an error."""
    import tensorflow as tf
    from tensorflow_model_analysis.proto import validation_result_pb2

    artifacts, _ = run_artifacts
    blessing = Path(artifacts["blessing"].uri)
    (blessing / "BLESSED").unlink()
    (blessing / "NOT_BLESSED").write_text("")
    result = validation_result_pb2.ValidationResult(validation_ok=False)
    per_slice = result.metric_validations_per_slice.add()
    per_slice.slice_key.single_slice_keys.add(column=contract.LABEL_KEY, int64_value=8)
    failure = per_slice.failures.add()
    failure.metric_key.name = contract.ACCURACY_METRIC
    failure.metric_value.double_value.value = 0.6
    failure.metric_threshold.value_threshold.lower_bound.value = 0.93 - 1e-6
    [validations] = Path(artifacts["evaluation"].uri).glob("validations*")
    with tf.io.TFRecordWriter(str(validations)) as writer:
        writer.write(result.SerializeToString())
    pushed = artifacts["pushed_model"]
    pushed.set_int_custom_property("pushed", 0)  # what TFX's Pusher records for a model not blessed
    pushed.set_string_custom_property("pushed_version", "")
    pushed.set_string_custom_property("pushed_destination", "")

    page = _run_step(artifacts, tmp_path)
    assert "<b>NOT BLESSED</b>" in page and "<li>digit 8: recall 0.6000, below the bar of 0.93</li>" in page
    assert "not pushed (the model was not blessed)" in page and "pushed version" not in page
    assert "examples: <b>50</b>" in page and "could not be read" not in page


def test_an_artifact_that_cannot_be_read_costs_its_section_not_the_page(run_artifacts, tmp_path):
    artifacts, version = run_artifacts
    for stats in Path(artifacts["statistics"].uri).rglob("FeatureStats.pb"):
        stats.write_bytes(b"not a protocol buffer")
    (Path(artifacts["model_run"].uri) / "history.json").write_text("{ cut short")

    page = _run_step(artifacts, tmp_path)
    assert "<h2>Data</h2><p class=bad>could not be read: DecodeError" in page
    assert "<h2>Training</h2><p class=bad>could not be read: JSONDecodeError" in page
    assert "<b>BLESSED</b>" in page and f"pushed version <b>{version.name}</b>" in page
