"""The blessing gates' configuration and the Pusher's duplicate check, without running the pipeline
(tests/test_pipeline_e2e.py runs them through the real Evaluator and Pusher)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

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


def test_eval_config_gates_accuracy_overall_and_on_every_digits_slice():
    import tensorflow_model_analysis as tfma

    from pipeline.pipeline import eval_config, label_slice

    gates = BlessingGates(min_accuracy=0.98, max_accuracy_drop=0.004, min_class_recall=0.93, max_class_recall_drop=0.06)
    config = eval_config(gates)
    metrics = config.metrics_specs[0].metrics
    [accuracy] = [m for m in metrics if m.per_slice_thresholds]
    assert json.loads(accuracy.config)["name"] == contract.ACCURACY_METRIC
    found = {}
    for threshold in accuracy.per_slice_thresholds:
        [spec] = threshold.slicing_specs
        found[spec.SerializeToString()] = (threshold.threshold.value_threshold.lower_bound.value,
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
        return [(f.metric_key.is_diff, round(f.metric_value.double_value.value, 4))
                for s in result.metric_validations_per_slice for f in s.failures]

    assert failures((), 0.99) == [] and failures((), 0.98) == [(False, 0.98)]
    assert failures((), 0.99, drop=0.004) == [] and failures((), 0.99, drop=0.006) == [(True, -0.006)]
    digit_8 = ((contract.LABEL_KEY, 8),)
    assert failures(digit_8, 0.96) == []  # 0.96 is under the overall bar, above the digit's
    assert failures(digit_8, 0.91) == [(False, 0.91)]
    assert failures(digit_8, 0.96, drop=0.04) == [] and failures(digit_8, 0.96, drop=0.06) == [(True, -0.06)]


def test_a_gate_allowing_no_drop_still_tolerates_rounding():
    from pipeline.pipeline import eval_config

    accuracy = next(m for m in eval_config(BlessingGates(max_accuracy_drop=0)).metrics_specs[0].metrics
                    if m.per_slice_thresholds)
    assert accuracy.per_slice_thresholds[0].threshold.change_threshold.absolute.value == -1e-10


@pytest.mark.parametrize("digit, is_diff, value, expected", [
    (8, False, 0.91, "digit 8: recall 0.9100, below the bar of 0.95"),
    (0, True, -0.07, "digit 0: recall -0.0700 against the latest blessed model, a drop larger than the 0.05 allowed"),
    (None, False, 0.984, "accuracy 0.9840, below the bar of 0.985"),
    (None, True, -0.006, "accuracy -0.0060 against the latest blessed model, a drop larger than the 0.005 allowed"),
])
def test_failures_are_described_in_words(digit, is_diff, value, expected):
    from pipeline.report import describe_failure

    bound, drop = (0.985, 0.005) if digit is None else (0.95, 0.05)
    threshold = SimpleNamespace(value_threshold=SimpleNamespace(lower_bound=SimpleNamespace(value=bound)),
                                change_threshold=SimpleNamespace(absolute=SimpleNamespace(value=-drop)))
    assert describe_failure(contract.ACCURACY_METRIC, is_diff, value, threshold, digit) == expected


def test_the_gates_read_back_from_the_evaluators_configuration_are_the_ones_it_was_given():
    from pipeline.pipeline import eval_config, gates_from_eval_config

    for gates in (BlessingGates(), BlessingGates(min_accuracy=0.9, max_accuracy_drop=0.0, min_class_recall=0.8,
                                                 max_class_recall_drop=0.1)):
        assert gates_from_eval_config(eval_config(gates)) == gates
    import tensorflow_model_analysis as tfma

    assert gates_from_eval_config(tfma.EvalConfig()) is None


def test_the_report_shows_every_training_setting_in_a_group_and_the_gates():
    import dataclasses

    from components.config import NOT_SHOWN_AS_SETTINGS, SETTING_GROUPS, TrainerConfig
    from pipeline.report import settings_table

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
                "<td>held-out accuracy at least</td><td class=n>0.985</td>",
                "<td>any digit's recall drop against the latest blessed model at most</td><td class=n>0.05</td>"):
        assert row in page, row
    assert "code fingerprint" not in page and "base weights warning" not in page
    assert "<caption>gates</caption>" not in settings_table(config, None)  # the Evaluator did not run
