"""The real TFX pipeline (LocalDagRunner) on tiny data: end to end, resume, bad data, blessing."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, pipeline_run_args, run_digits
from data import contract

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UPSTREAM_OF_TRAINER = ["ImportExampleGen", "ImportSchemaGen", "StatisticsGen", "ExampleValidator",
                       "AnomaliesGate", "Transform"]


def _states(root: Path) -> dict[str, str]:
    from pipeline.run_history import latest_run

    return {component.node_id: component.state for component in latest_run(root / "metadata.sqlite", "digits")}


def _in_pipeline_report(root: Path) -> str:
    """The page the run's own last step (RunReport) wrote into its output artifact, found through MLMD."""
    from pipeline.run_history import latest_run_outputs

    _, outputs = latest_run_outputs(root / "metadata.sqlite", "digits")
    report = outputs["RunReport"]["report"]
    assert report.type_name == "pipeline.HtmlReport" and Path(report.uri).is_relative_to(root)
    return (Path(report.uri) / "index.html").read_text()


def _versions(serving: Path) -> list[Path]:
    model_dir = serving / "digits"
    return sorted(model_dir.iterdir()) if model_dir.exists() else []


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.timeout(1800)
def test_killed_run_resumes_and_pushes_a_model_that_serves_pngs(tiny_records, sample_tree, tmp_path):
    import tensorflow as tf

    root, serving = tmp_path / "root", tmp_path / "serving"
    args = pipeline_run_args(tiny_records, root, serving)
    # The runs' own temporary directory: what the components leave there must not outlive a run.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    first = subprocess.Popen([sys.executable, "-m", "digits", *args], cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for(lambda: _states(root).get("Trainer") == "RUNNING", 900, "the Trainer to start")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the run dies in the middle of training
        first.wait(timeout=60)
    assert _versions(serving) == []
    # The run's temporary files went to its scratch directory, and with in-process Beam workers TFX
    # built no sdist of itself there (it would have, once per Beam component).
    killed_scratch = root / "_scratch" / str(first.pid)
    assert killed_scratch.is_dir() and not list(killed_scratch.rglob("tfx_ephemeral*"))

    result = run_digits(*args, timeout=1500, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # The second run removed the killed run's scratch and its own; nothing was left in TMPDIR.
    assert list((root / "_scratch").iterdir()) == []
    assert list(temporary.iterdir()) == []
    states = _states(root)
    # Everything the killed run finished is reused; training onwards runs again.
    assert {node: states[node] for node in UPSTREAM_OF_TRAINER} == {node: "CACHED" for node in UPSTREAM_OF_TRAINER}
    assert {node: states[node] for node in ("Trainer", "Evaluator", "Pusher", "RunReport")} == {
        "Trainer": "COMPLETE", "Evaluator": "COMPLETE", "Pusher": "COMPLETE", "RunReport": "COMPLETE"}
    assert "Trainer ..." in result.stdout and "Pusher: done" in result.stdout
    assert "BLESSED, pushed to" in result.stdout

    # The run report: one page a person can read without opening MLMD.
    report = (root / "report" / "index.html").read_text()
    assert f"report: {root / 'report' / 'index.html'}" in result.stdout
    for expected in ("Components", "Trainer", "Anomalies", "none: every split matches", "base weights",
                     "random initialisation", "alt='training curves'", "alt='confusion matrix'",
                     "examples: <b>50</b>", "<b>BLESSED</b>", "pushed version",
                     # the settings in groups, the gates read back from the Evaluator this run configured
                     "<caption>optimiser</caption>", "<tr><td>epochs</td><td class=n>1</td></tr>",
                     "<caption>gates</caption>", "<tr><td>every digit's recall at least</td><td class=n>0</td></tr>",
                     # when the model does not answer: the operating point it was exported with, and its curve
                     "When the model does not answer", "<caption>abstention</caption>", "alt='risk-coverage curve'",
                     "keeps 99.0% of eval digits", "keeps 98.0% of the rest"):
        assert expected in report, expected
    # A first run had no blessed model to compare with: the gates against one did not apply (TFMA drops
    # them from the EvalConfig it writes), and the page says so rather than "at most 0".
    from pipeline.report import NOT_COMPARED

    assert report.count(f"<td class=n>{NOT_COMPARED}</td>") == 4

    # The same page, made by the run's own last step from its artifacts (what a Vertex AI run has), but for
    # the components' states and times, which only the orchestrator knows.
    (version,) = _versions(serving)
    in_pipeline = _in_pipeline_report(root)
    for expected in ("examples: <b>50</b>", "alt='confusion matrix'", "<b>BLESSED</b>",
                     f"pushed version <b>{version.name}</b>", "<caption>gates</caption>", "alt='training curves'"):
        assert expected in in_pipeline, expected
    assert "Each component's state and wall time are not in this page" in in_pipeline
    assert "<td>Trainer</td>" not in in_pipeline and "could not be read" not in in_pipeline

    # Every component left its artifact; the data had no anomalies; the model was blessed.
    for component, output in [("ImportExampleGen", "examples"), ("StatisticsGen", "statistics"),
                              ("ImportSchemaGen", "schema"), ("ExampleValidator", "anomalies"),
                              ("Transform", "transform_graph"), ("Trainer", "model"), ("Trainer", "model_run"),
                              ("Evaluator", "evaluation"), ("Evaluator", "blessing"), ("Pusher", "pushed_model"),
                              ("RunReport", "report")]:
        assert any((root / component / output).rglob("*")), f"{component} produced no {output}"
    from pipeline.anomalies_gate import describe_anomalies

    anomalies_uri = max((root / "ExampleValidator" / "anomalies").iterdir(), key=lambda p: int(p.name))
    assert describe_anomalies(str(anomalies_uri), list(contract.SPLITS)) == []
    assert list((root / "Evaluator" / "blessing").glob("*/BLESSED"))
    history = next((root / "Trainer" / "model_run").glob("*/history.json"))
    assert '"epochs_run": 1' in history.read_text()

    # The pushed model: TF Serving's layout, both signatures, a PNG in, 10 probabilities out.
    assert _versions(serving) == [version]
    assert version.name.isdigit() and (version / "saved_model.pb").exists()
    model = tf.saved_model.load(str(version))
    assert set(model.signatures) == {"serving_default", "serving_examples", "normalized_image"}
    png = next((sample_tree / "testing" / "4").iterdir()).read_bytes()
    by_bytes = model.signatures["serving_default"](image_bytes=tf.constant([png, png]))
    probabilities = by_bytes["probabilities"].numpy()
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert by_bytes["predicted_class"].numpy()[0] == probabilities[0].argmax()
    example = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png]))}))
    by_example = model.signatures["serving_examples"](examples=tf.constant([example.SerializeToString()]))
    np.testing.assert_allclose(by_example["probabilities"].numpy()[0], probabilities[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError):
        model.signatures["serving_default"](image_bytes=tf.constant([b"not an image"]))
    # What the model saw, from its own graph: the same answer, plus the normalised 28x28 image.
    seen = model.signatures["normalized_image"](image_bytes=tf.constant([png]))
    np.testing.assert_allclose(seen["probabilities"].numpy()[0], probabilities[0], rtol=1e-5, atol=1e-6)
    assert seen["normalized_image"].shape == (1, 28, 28) and 0.05 < seen["ink_fraction"].numpy()[0] < 0.5


@pytest.mark.timeout(900)
def test_bad_labels_and_missing_images_stop_the_run_before_transform(tiny_records, sample_tree, tmp_path):
    import tensorflow as tf

    from tfrecord_builder.tfrecord import GzipTFRecordWriter

    records = tmp_path / "records"
    shutil.copytree(tiny_records, records)
    png = next((sample_tree / "training" / "1").iterdir()).read_bytes()
    label_11 = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[11]))}))
    no_image = tf.train.Example(features=tf.train.Features(feature={
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3]))}))
    with GzipTFRecordWriter(records / "train" / "injected.tfrecord.gz") as writer:
        writer.write(label_11.SerializeToString())
        writer.write(no_image.SerializeToString())

    root, serving = tmp_path / "root", tmp_path / "serving"
    result = run_digits(*pipeline_run_args(records, root, serving), timeout=900)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: data anomalies, pipeline stopped before Transform:")
    assert "train: feature 'label'" in error and "Unexpectedly large value: 11" in error
    assert "train: feature 'image'" in error
    assert "Traceback" not in result.stderr
    states = _states(root)
    assert states["ExampleValidator"] == "COMPLETE" and states["AnomaliesGate"] == "FAILED"
    assert "Transform" not in states and "Trainer" not in states
    assert _versions(serving) == []


@pytest.mark.timeout(1800)
def test_the_gates_bless_and_push_only_what_they_should(tiny_records, tmp_path):
    """One pipeline root, models of known quality (tests/fake_trainers.py) through the real Evaluator
    and Pusher: a model bad at one digit, a perfect one, the same again (nothing changed), a slightly
    worse one within the allowed drop, one that regresses, and a failed Trainer."""
    from components.config import TrainerConfig
    from pipeline.config import BlessingGates, PipelineConfig
    from pipeline.runner import run_pipeline

    root, serving = tmp_path / "root", tmp_path / "serving"

    def run(run_fn: str, **gates: float) -> None:
        # The selective gates stay open unless a step is about them: most fake models answer everything.
        selective_open = dict(min_coverage=0.0, max_coverage_drop=1.0, max_selective_error=1.0,
                              max_selective_error_rise=1.0)
        run_pipeline(PipelineConfig(
            data_root=tiny_records, train_examples=180, pipeline_root=root, serving_dir=serving,
            gates=BlessingGates(**{**selective_open, **gates}), run_fn=run_fn,
            trainer=TrainerConfig(epochs=1, steps_per_epoch=1),
        ))

    def blessings() -> list[str]:
        folders = sorted((root / "Evaluator" / "blessing").iterdir(), key=lambda p: int(p.name))
        return [next(p.name for p in folder.iterdir() if p.name in ("BLESSED", "NOT_BLESSED")) for folder in folders]

    def per_class(digit: int, has_baseline: bool) -> tuple[float, float, float]:
        import tensorflow_model_analysis as tfma

        newest = max((root / "Evaluator" / "evaluation").iterdir(), key=lambda p: int(p.name))
        result = tfma.load_eval_result(str(newest), model_name="candidate" if has_baseline else None)
        metrics = result.get_metrics_for_slice(class_id=digit, top_k=1)
        return tuple(round(float(metrics[f"{m}_class_{digit}"]["doubleValue"]), 6)
                     for m in ("precision", "recall", "f1score"))

    from pipeline.report import latest_results, write_report

    # Good overall (45 of 50 test digits) but every 8 read as a 3: the per-digit floor refuses it,
    # and the console line and the report say which digit.
    run("fake_trainers.bad_at_eights_run_fn", min_accuracy=0.85)
    assert blessings() == ["NOT_BLESSED"] and _versions(serving) == []
    _, evaluation = latest_results(root)
    assert evaluation.accuracy == pytest.approx(0.9)
    assert evaluation.failures == ["digit 8: recall 0.0000, below the bar of 0.93"]
    assert "digit 8: recall 0.0000, below the bar of 0.93" in write_report(root).path.read_text()
    # The run's own report step says the same: not blessed, why, and so not pushed.
    in_pipeline = _in_pipeline_report(root)
    assert "<b>NOT BLESSED</b>" in in_pipeline and "digit 8: recall 0.0000, below the bar of 0.93" in in_pipeline
    assert "not pushed (the model was not blessed)" in in_pipeline

    run("fake_trainers.perfect_run_fn", min_accuracy=0.9)  # accuracy 1.0: blessed, pushed
    assert blessings()[-1] == "BLESSED" and len(_versions(serving)) == 1
    assert [per_class(digit, has_baseline=False) for digit in (0, 3, 9)] == [(1.0, 1.0, 1.0)] * 3
    [first] = _versions(serving)
    first_files = sorted(str(path.relative_to(first)) for path in first.rglob("*"))

    # Nothing changed: the cached model is evaluated against itself and blessed, but the serving
    # directory already holds it, so nothing is pushed and the directory stays as it was.
    run("fake_trainers.perfect_run_fn", min_accuracy=0.9)
    assert blessings()[-1] == "BLESSED" and _versions(serving) == [first]
    assert sorted(str(path.relative_to(first)) for path in first.rglob("*")) == first_files
    _, evaluation = latest_results(root)
    assert evaluation.already_served_as == first.name and evaluation.pushed_destination is None
    assert evaluation.summary().endswith(
        f"BLESSED, not pushed: identical to version {first.name}, already in the serving directory")
    assert f"not pushed: identical to version {first.name}" in _in_pipeline_report(root)

    # One of 50 digits worse (accuracy 0.98, digit 5's recall 0.8 instead of 1): with 0.01 allowed
    # the accuracy drop refuses it; with 0.03 allowed, digit 5's drop of 0.2 against 0.1 allowed
    # does, naming the digit; with both allowed, it is as good as the blessed model and ships.
    one_wrong = dict(min_accuracy=0.9, min_class_recall=0.5)
    run("fake_trainers.one_wrong_run_fn", **one_wrong, max_accuracy_drop=0.01, max_class_recall_drop=0.5)
    _, evaluation = latest_results(root)
    assert blessings()[-1] == "NOT_BLESSED" and _versions(serving) == [first]
    assert evaluation.failures == ["accuracy -0.0200 against the latest blessed model, a drop larger than the "
                                   "0.01 allowed"]
    run("fake_trainers.one_wrong_run_fn", **one_wrong, max_accuracy_drop=0.03, max_class_recall_drop=0.1)
    _, evaluation = latest_results(root)
    assert blessings()[-1] == "NOT_BLESSED" and _versions(serving) == [first]
    assert evaluation.failures == ["digit 5: recall -0.2000 against the latest blessed model, a drop larger than "
                                   "the 0.1 allowed"]
    run("fake_trainers.one_wrong_run_fn", **one_wrong, max_accuracy_drop=0.03, max_class_recall_drop=0.5)
    assert blessings()[-1] == "BLESSED" and len(_versions(serving)) == 2

    # Accuracy 0.1 clears an absolute bar of 0 but regresses against the blessed baseline (1.0).
    run("fake_trainers.always_zero_run_fn", min_accuracy=0.0, min_class_recall=0.0)
    assert blessings()[-1] == "NOT_BLESSED"
    assert len(_versions(serving)) == 2
    # TFMA's per-class metrics are at the argmax: everything predicted 0.
    assert per_class(0, has_baseline=True) == (0.1, 1.0, round(2 * 0.1 / 1.1, 6))
    precision_3, recall_3, f1_3 = per_class(3, has_baseline=True)
    assert math.isnan(precision_3) and (recall_3, f1_3) == (0.0, 0.0)  # never predicted: precision is 0/0

    # The report reads the same per-class values from TFMA (no second computation of them).
    _, evaluation = latest_results(root)
    assert evaluation.per_class["precision"][0] == pytest.approx(0.1)
    assert math.isnan(evaluation.per_class["precision"][3]) and evaluation.per_class["f1"][3] == 0.0
    assert "<td>3</td><td class=n>n/a</td>" in write_report(root).path.read_text()

    # Selective prediction, with the default gates (pipeline/selective_metrics.py). The blessed
    # baseline is the one-wrong model, which answers everything (coverage 1, error 1/50 among its
    # answers). The same answers, the wrong one flagged unsure: coverage 0.98, no error among the
    # accepted answers; blessed, and the report says both figures.
    selective_defaults = {name: getattr(BlessingGates, name) for name in (
        "min_coverage", "max_coverage_drop", "max_selective_error", "max_selective_error_rise")}
    lenient = dict(min_accuracy=0.9, min_class_recall=0.5, max_accuracy_drop=0.03, max_class_recall_drop=0.5)
    run("fake_trainers.one_wrong_flagged_run_fn", **lenient, **selective_defaults)
    _, evaluation = latest_results(root)
    assert blessings()[-1] == "BLESSED" and len(_versions(serving)) == 3
    assert (evaluation.coverage, evaluation.selective_error) == (pytest.approx(0.98), 0.0)
    assert "98.0 % answered without a person, 0.00 % of those wrong" in write_report(root).path.read_text()
    # The one-wrong model again: its wrong answer is accepted; error 0.02 among its answers is above
    # the bar and a rise of 0.02 against the flagged model.
    run("fake_trainers.one_wrong_run_fn", **lenient, **selective_defaults)
    _, evaluation = latest_results(root)
    assert blessings()[-1] == "NOT_BLESSED" and len(_versions(serving)) == 3
    assert sorted(evaluation.failures) == [
        "error among the answers given without a person +0.0200 against the latest blessed model, a rise "
        "larger than the 0.007 allowed",
        "error among the answers given without a person 0.0200, above the bar of 0.015"]
    # Right about every digit and answering none without a person: no error among its answers, and no use.
    run("fake_trainers.refuses_everything_run_fn", **lenient, **selective_defaults)
    _, evaluation = latest_results(root)
    assert blessings()[-1] == "NOT_BLESSED" and len(_versions(serving)) == 3
    assert sorted(evaluation.failures) == [
        "answered without a person -0.9800 against the latest blessed model, a drop larger than the 0.03 allowed",
        "answered without a person 0.0000, below the bar of 0.95"]

    # A run whose Trainer fails: its report shows that run, not the previous run's verdict beside it.
    with pytest.raises(Exception, match="training failed on purpose"):
        run("fake_trainers.failing_run_fn", min_accuracy=0.0, min_class_recall=0.0)
    components, evaluation = latest_results(root)
    assert {c.node_id: c.state for c in components}["Trainer"] == "FAILED" and evaluation is None
    assert "RunReport" not in {c.node_id for c in components}  # the run stopped before its report step
    page = write_report(root).path.read_text()
    assert "<td>Trainer</td><td>failed</td>" in page
    assert "BLESSED" not in page and "Evaluation" not in page and "pushed version" not in page
