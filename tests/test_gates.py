"""The blessing gates' configuration and the Pusher's duplicate check, without running the pipeline
(tests/test_pipeline_e2e.py runs them through the real Evaluator and Pusher)."""

from __future__ import annotations

import json
import re

import pytest

from data import contract
from pipeline.config import BlessingGates


def _model(root, name: str, weights: bytes = b"w" * 1000, extra: dict | None = None):
    path = root / name
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"graph")
    (path / "variables" / "variables.data-00000-of-00001").write_bytes(weights)
    for relative, data in (extra or {}).items():
        (path / relative).parent.mkdir(parents=True, exist_ok=True)
        (path / relative).write_bytes(data)
    return path


def test_identical_version_finds_the_byte_identical_copy(tmp_path):
    from pipeline.pusher import identical_version

    candidate = _model(tmp_path, "candidate")
    served = tmp_path / "serving"
    _model(served, "1700000000", weights=b"x" * 1000)  # same files and sizes, other bytes
    _model(served, "1700000100")  # the same model
    _model(served, "1700000200", extra={"assets.extra/reference_profile.json": b"{}"})  # one file more
    (served / "notes").mkdir()
    assert identical_version(str(candidate), str(served)) == "1700000100"


@pytest.mark.parametrize("change", ["weights", "file", "nothing served"])
def test_a_changed_model_is_not_a_duplicate(tmp_path, change):
    from pipeline.pusher import identical_version

    candidate = _model(tmp_path, "candidate")
    served = tmp_path / "serving"
    if change == "weights":
        _model(served, "1700000000", weights=b"w" * 999 + b"v")
    elif change == "file":
        _model(served, "1700000000", extra={"assets.extra/tf_serving_warmup_requests": b"r"})
    assert identical_version(str(candidate), str(served)) is None


def test_gates_are_validated():
    with pytest.raises(ValueError, match="min class recall must be between 0 and 1"):
        BlessingGates(min_class_recall=1.5)
    with pytest.raises(ValueError, match="max accuracy drop must be between 0 and 1"):
        BlessingGates(max_accuracy_drop=-0.01)
    with pytest.raises(ValueError, match="max selective error must be between 0 and 1"):
        BlessingGates(max_selective_error=2)


def test_eval_config_gates_accuracy_overall_and_on_every_digits_slice():
    import tensorflow_model_analysis as tfma

    from pipeline.pipeline import eval_config, label_slice

    gates = BlessingGates(min_accuracy=0.98, max_accuracy_drop=0.004, min_class_recall=0.93, max_class_recall_drop=0.06)
    config = eval_config(gates)
    metrics = config.metrics_specs[0].metrics
    [accuracy] = [m for m in metrics if m.class_name == "SparseCategoricalAccuracy"]
    assert json.loads(accuracy.config)["name"] == contract.ACCURACY_METRIC
    found = {}
    for threshold in accuracy.per_slice_thresholds:
        [spec] = threshold.slicing_specs
        found[spec.SerializeToString()] = (round(threshold.threshold.value_threshold.lower_bound.value, 5),
                                           -threshold.threshold.change_threshold.absolute.value)
        assert threshold.threshold.change_threshold.direction == tfma.MetricDirection.HIGHER_IS_BETTER
    assert found == {tfma.SlicingSpec().SerializeToString(): (0.98, 0.004),
                     **{label_slice(d).SerializeToString(): (0.93, 0.06) for d in range(10)}}
    # Every gated slice is one the Evaluator computes (overall and per label).
    assert {spec.SerializeToString() for spec in config.slicing_specs} == {
        tfma.SlicingSpec().SerializeToString(),
        tfma.SlicingSpec(feature_keys=[contract.LABEL_KEY]).SerializeToString()}


def test_the_gates_apply_to_their_own_slices_only():
    """TFMA's own validator: the overall bar is not applied to a digit's slice, nor a digit's to another."""
    from tensorflow_model_analysis.evaluators import metrics_validator
    from tensorflow_model_analysis.metrics import metric_types

    from pipeline.pipeline import eval_config

    config = eval_config(BlessingGates(min_accuracy=0.985, min_class_recall=0.95))
    key = metric_types.MetricKey(name=contract.ACCURACY_METRIC, example_weighted=False)
    change = metric_types.MetricKey(name=contract.ACCURACY_METRIC, example_weighted=False, is_diff=True)

    def failures(slice_key, value, drop=0.0):
        result = metrics_validator.validate_metrics((slice_key, {key: value, change: -drop}), config)
        # (the selective gates' metrics are missing here: TFMA counts that as their failure)
        return [(f.metric_key.is_diff, round(f.metric_value.double_value.value, 4))
                for s in result.metric_validations_per_slice for f in s.failures
                if f.metric_key.name == contract.ACCURACY_METRIC]

    assert failures((), 0.99) == [] and failures((), 0.98) == [(False, 0.98)]
    assert failures((), 0.99, drop=0.004) == [] and failures((), 0.99, drop=0.006) == [(True, -0.006)]
    digit_8 = ((contract.LABEL_KEY, 8),)
    assert failures(digit_8, 0.96) == []  # 0.96 is under the overall bar, above the digit's
    assert failures(digit_8, 0.91) == [(False, 0.91)]
    assert failures(digit_8, 0.96, drop=0.04) == [] and failures(digit_8, 0.96, drop=0.06) == [(True, -0.06)]


def test_a_value_exactly_at_the_bar_passes_in_tfmas_float32():
    """95 of 100 digits right is 0.95 in words and 0.94999999 in TFMA's float32: at a bar of 0.95 it
    passes; one digit fewer does not. Likewise at a ceiling."""
    import numpy as np
    from tensorflow_model_analysis.evaluators import metrics_validator
    from tensorflow_model_analysis.metrics import metric_types

    from pipeline.pipeline import eval_config

    config = eval_config(BlessingGates(min_accuracy=0.95, min_class_recall=0.95, max_selective_error=0.01))

    def failed(name, value):
        key = metric_types.MetricKey(name=name, example_weighted=False)
        result = metrics_validator.validate_metrics(((), {key: value}), config)
        return any(f.metric_key.name == name and not f.metric_key.is_diff  # (no baseline given here)
                   for s in result.metric_validations_per_slice for f in s.failures)

    assert float(np.float32(95) / np.float32(100)) < 0.95
    assert not failed(contract.ACCURACY_METRIC, float(np.float32(95) / np.float32(100)))
    assert failed(contract.ACCURACY_METRIC, float(np.float32(94) / np.float32(100)))
    assert not failed(contract.SELECTIVE_ERROR_METRIC, float(np.float32(1) / np.float32(100)))
    assert failed(contract.SELECTIVE_ERROR_METRIC, float(np.float32(2) / np.float32(100)))


def test_a_gate_allowing_no_drop_still_tolerates_rounding():
    from pipeline.pipeline import eval_config

    accuracy = next(m for m in eval_config(BlessingGates(max_accuracy_drop=0)).metrics_specs[0].metrics
                    if m.per_slice_thresholds)
    assert accuracy.per_slice_thresholds[0].threshold.change_threshold.absolute.value == -1e-10


def test_the_selective_gates_bound_coverage_from_below_and_the_error_among_accepted_answers_from_above():
    """TFMA's own validator on the overall slice, with the metric keys the selective metrics produce."""
    from tensorflow_model_analysis.evaluators import metrics_validator
    from tensorflow_model_analysis.metrics import metric_types

    from pipeline.pipeline import eval_config

    config = eval_config(BlessingGates(min_coverage=0.95, max_coverage_drop=0.03, max_selective_error=0.015,
                                       max_selective_error_rise=0.007))
    names = {contract.COVERAGE_METRIC: "coverage", contract.SELECTIVE_ERROR_METRIC: "error"}

    def failures(slice_key=(), coverage=0.97, error=0.005, coverage_change=0.0, error_change=0.0):
        metrics = {}
        for name, value, change in ((contract.COVERAGE_METRIC, coverage, coverage_change),
                                    (contract.SELECTIVE_ERROR_METRIC, error, error_change)):
            metrics[metric_types.MetricKey(name=name, example_weighted=False)] = value
            metrics[metric_types.MetricKey(name=name, example_weighted=False, is_diff=True)] = change
        result = metrics_validator.validate_metrics((slice_key, metrics), config)
        return sorted((names[f.metric_key.name], f.metric_key.is_diff)
                      for s in result.metric_validations_per_slice for f in s.failures if f.metric_key.name in names)

    assert failures() == []
    assert failures(coverage=0.94) == [("coverage", False)]
    assert failures(coverage_change=-0.02) == [] and failures(coverage_change=-0.04) == [("coverage", True)]
    assert failures(error=0.016) == [("error", False)]
    assert failures(error_change=0.006) == [] and failures(error_change=0.008) == [("error", True)]
    assert failures(error_change=-0.5, coverage_change=0.5) == []  # better is never a failure
    # Overall only: a digit's slice (100 test digits) is too small to bar each digit's coverage.
    assert failures(((contract.LABEL_KEY, 8),), coverage=0.5, error=0.5) == []


def _threshold(metric: str):
    from pipeline.pipeline import eval_config

    config = eval_config(BlessingGates())
    class_name = {contract.ACCURACY_METRIC: "SparseCategoricalAccuracy", contract.COVERAGE_METRIC: "Coverage",
                  contract.SELECTIVE_ERROR_METRIC: "SelectiveError"}[metric]
    return lambda digit: next(
        gate.threshold for m in config.metrics_specs[0].metrics if m.class_name == class_name
        for gate in m.per_slice_thresholds
        if bool(gate.slicing_specs[0].feature_values) == (digit is not None))


@pytest.mark.parametrize("metric, digit, is_diff, value, expected", [
    (contract.ACCURACY_METRIC, 8, False, 0.91, "digit 8: recall 0.9100, below the bar of 0.93"),
    (contract.ACCURACY_METRIC, 0, True, -0.07,
     "digit 0: recall -0.0700 against the latest blessed model, a drop larger than the 0.05 allowed"),
    (contract.ACCURACY_METRIC, None, False, 0.975, "accuracy 0.9750, below the bar of 0.98"),
    (contract.ACCURACY_METRIC, None, True, -0.006,
     "accuracy -0.0060 against the latest blessed model, a drop larger than the 0.005 allowed"),
    (contract.COVERAGE_METRIC, None, False, 0.93, "answered without a person 0.9300, below the bar of 0.95"),
    (contract.COVERAGE_METRIC, None, True, -0.04,
     "answered without a person -0.0400 against the latest blessed model, a drop larger than the 0.03 allowed"),
    (contract.SELECTIVE_ERROR_METRIC, None, False, 0.02,
     "error among the answers given without a person 0.0200, above the bar of 0.015"),
    (contract.SELECTIVE_ERROR_METRIC, None, True, 0.01,
     "error among the answers given without a person +0.0100 against the latest blessed model, a rise larger "
     "than the 0.007 allowed"),
])
def test_failures_are_described_in_words(metric, digit, is_diff, value, expected):
    from pipeline.report import describe_failure

    assert describe_failure(metric, is_diff, value, _threshold(metric)(digit), digit) == expected


def test_selective_counts_read_the_decision_and_answer_everything_without_one():
    import numpy as np

    from pipeline.selective_metrics import answer_counts

    probabilities = np.eye(contract.NUM_CLASSES)[[3, 5, 8, 8]]  # answers 3, 5, 8, 8
    labels = np.array([3, 5, 3, 8])  # the third answer is wrong
    accepted, unsure, not_a_digit = range(3)
    assert [contract.DECISIONS[code] for code in (accepted, unsure, not_a_digit)] == [
        "accepted", "unsure", "not_a_digit"]
    outputs = {contract.PROBABILITIES_OUTPUT: probabilities}
    # examples, accepted, accepted and wrong
    assert answer_counts({**outputs, contract.DECISION_OUTPUT: np.array([0, 0, 1, 2])}, labels) == (4, 2, 0)
    assert answer_counts({**outputs, contract.DECISION_OUTPUT: np.array([0, 1, 0, 1])}, labels) == (4, 2, 1)
    assert answer_counts(outputs, labels) == (4, 4, 1)  # no decision output: it answers everything
    assert answer_counts({contract.PROBABILITIES_OUTPUT: probabilities[:1]}, np.array([[3]])) == (1, 1, 0)
    with pytest.raises(ValueError, match="3 labels for 4 predictions"):
        answer_counts(outputs, labels[:3])
    with pytest.raises(ValueError, match="outputs by name"):
        answer_counts(probabilities, labels)


def test_the_gates_read_back_from_the_evaluators_configuration_are_the_ones_it_was_given():
    from pipeline.pipeline import eval_config, gates_from_eval_config

    for gates in (BlessingGates(), BlessingGates(min_accuracy=0.9, max_accuracy_drop=0.0, min_class_recall=0.8,
                                                 max_class_recall_drop=0.1, min_coverage=0.9, max_coverage_drop=0.0,
                                                 max_selective_error=0.02, max_selective_error_rise=0.0)):
        assert gates_from_eval_config(eval_config(gates)) == gates
    import tensorflow_model_analysis as tfma

    assert gates_from_eval_config(tfma.EvalConfig()) is None
    # An Evaluator configured before the selective gates existed had no such bars, and says so.
    older = eval_config(BlessingGates())
    kept = [m for m in older.metrics_specs[0].metrics if m.class_name not in ("Coverage", "SelectiveError")]
    del older.metrics_specs[0].metrics[:]
    older.metrics_specs[0].metrics.extend(kept)
    read = gates_from_eval_config(older)
    assert (read.min_coverage, read.max_coverage_drop, read.max_selective_error, read.max_selective_error_rise) == (
        0.0, 1.0, 1.0, 1.0)


def test_the_report_shows_every_training_setting_in_a_group_and_the_gates():
    import dataclasses

    from components.config import NOT_SHOWN_AS_SETTINGS, SETTING_GROUPS, TrainerConfig
    from pipeline.report import NOT_COMPARED, settings_table

    fields = [field.name for field in dataclasses.fields(TrainerConfig)]
    grouped = [name for names in SETTING_GROUPS.values() for name in names] + list(NOT_SHOWN_AS_SETTINGS)
    assert sorted(grouped) == sorted(fields), "every setting in exactly one group"

    config = {**TrainerConfig(steps_per_epoch=None).to_custom_config(), "code_fingerprint": "abc",
              "a_setting_from_newer_code": 3}
    page = settings_table(config, BlessingGates())
    captions = re.findall(r"<caption>(\w+)</caption>", page)
    assert captions == ["data", "model", "optimiser", "augmentation", "abstention", "other", "gates"]
    for row in ("<td>learning rate</td><td class=n>0.001</td>", "<td>dense units</td><td class=n>64, 64</td>",
                "<td>steps per epoch</td><td class=n>one pass over the train split</td>",
                "<td>base weights sha256</td><td class=n>none</td>",
                "<td>a setting from newer code</td><td class=n>3</td>",
                "<td>held-out accuracy at least</td><td class=n>0.98</td>",
                "<td>any digit's recall drop against the latest blessed model at most</td><td class=n>0.05</td>",
                "<td>share answered without a person at least</td><td class=n>0.95</td>",
                "<td>rise of that error against the latest blessed model at most</td><td class=n>0.007</td>"):
        assert row in page, row
    assert "code fingerprint" not in page and "base weights warning" not in page
    assert "<caption>gates</caption>" not in settings_table(config, None)  # the Evaluator did not run
    # A first run has no blessed model: the gates against it did not apply (TFMA drops them, read back as 0).
    first = settings_table(config, BlessingGates(max_accuracy_drop=0.0), compared=False)
    assert "<td>held-out accuracy at least</td><td class=n>0.98</td>" in first
    assert first.count(f"<td class=n>{NOT_COMPARED}</td>") == 4
    assert "against the latest blessed model at most</td><td class=n>0<" not in first


def test_the_report_says_how_many_corrections_were_trained_on_and_how_many_left_out(tmp_path):
    """The build's manifest read back: accepted corrections trained on, pending and rejected ones not;
    nothing for a build without corrections, or a directory that is not a build."""
    import json

    from pipeline.report import _corrections

    (tmp_path / "manifest.json").write_text(json.dumps({"extra_sources": [
        {"path": "/data/feedback", "training_files": 12,
         "corrections": {"accepted": 12, "pending": 360, "rejected": 5}}]}))
    text = _corrections(str(tmp_path))
    assert "12 digits added to the train split from /data/feedback" in text
    assert "360 waiting for review and 5 rejected were not used" in text and "recall" in text
    (tmp_path / "manifest.json").write_text(json.dumps({"extra_sources": []}))
    assert _corrections(str(tmp_path)) == ""
    assert _corrections(str(tmp_path / "nowhere")) == "" and _corrections(None) == ""
    (tmp_path / "manifest.json").write_text("not json")
    assert _corrections(str(tmp_path)) == ""
