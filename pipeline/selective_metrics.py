"""TFMA metrics of selective prediction: how often the model answers, and how often it is wrong when it does.

The model's `decision` output (data/contract.py: 0 accepted, 1 unsure, 2 not a digit) is decided
inside the SavedModel at its exported operating point (components/abstention.py). On the held-out
test split the Evaluator computes, per slice and per model (candidate and baseline):

- `coverage`: the share of digits the model answers without a person (decision == accepted);
- `selective_error`: among those, the share whose answer (the argmax of `probabilities`) is wrong.

Together they are what a person reading forms cares about: how much is left for them to check,
and how much slips through unchecked. The blessing gates (pipeline/pipeline.py) bound both, and
bound their change against the latest blessed model.

A model without a `decision` output (one exported before the model knew when not to answer)
answers everything: coverage 1 and a selective error equal to its error rate, which is what it does.

TFMA finds the classes by `MetricConfig.module` (this module's dotted name), so Beam workers need
only the installed package.
"""

from __future__ import annotations

from typing import Iterable

import apache_beam as beam
import numpy as np
from tensorflow_model_analysis.metrics import metric_types
from tensorflow_model_analysis.utils import util

from data import contract

SELECTIVE_ERROR_METRIC = contract.SELECTIVE_ERROR_METRIC
COVERAGE_METRIC = contract.COVERAGE_METRIC
_ACCEPTED = contract.DECISIONS.index("accepted")


class SelectiveError(metric_types.Metric):
    """Among the test digits the model accepts (answers without a person), the share answered wrong."""

    def __init__(self, name: str = SELECTIVE_ERROR_METRIC):
        super().__init__(_selective_error_computations, name=name)


class Coverage(metric_types.Metric):
    """The share of test digits the model accepts (answers without a person)."""

    def __init__(self, name: str = COVERAGE_METRIC):
        super().__init__(_coverage_computations, name=name)


# TFMA passes a computations function the arguments its signature names (model_names, ...), found
# with inspect.getfullargspec: plain functions, one per metric.
def _selective_error_computations(name: str = SELECTIVE_ERROR_METRIC, model_names: list[str] | None = None,
                                  example_weighted: bool = False) -> metric_types.MetricComputations:
    return _computations(name, SELECTIVE_ERROR_METRIC, model_names, example_weighted)


def _coverage_computations(name: str = COVERAGE_METRIC, model_names: list[str] | None = None,
                           example_weighted: bool = False) -> metric_types.MetricComputations:
    return _computations(name, COVERAGE_METRIC, model_names, example_weighted)


def _computations(name: str, kind: str, model_names: list[str] | None,
                  example_weighted: bool) -> metric_types.MetricComputations:
    computations = []
    for model_name in model_names or [""]:
        key = metric_types.MetricKey(name=name, model_name=model_name, example_weighted=example_weighted)
        computations.append(metric_types.MetricComputation(
            keys=[key],
            preprocessors=[metric_types.StandardMetricInputsPreprocessor(include_default_inputs=True)],
            combiner=_Combiner(key, model_name, kind),
        ))
    return computations


def answer_counts(prediction, label) -> tuple[int, int, int]:
    """(examples, accepted, accepted and wrong) of one batch of predictions: the model's outputs as a
    dict (`probabilities`, and `decision` if it has one) and the true labels."""
    if not isinstance(prediction, dict) or contract.PROBABILITIES_OUTPUT not in prediction:
        raise ValueError(f"selective metrics need the model's outputs by name, with "
                         f"'{contract.PROBABILITIES_OUTPUT}'; got {type(prediction).__name__}")
    probabilities = np.asarray(prediction[contract.PROBABILITIES_OUTPUT], dtype=np.float64)
    probabilities = probabilities.reshape(-1, probabilities.shape[-1])
    labels = np.asarray(label).reshape(-1).astype(np.int64)
    if labels.size != probabilities.shape[0]:
        raise ValueError(f"{labels.size} labels for {probabilities.shape[0]} predictions")
    if contract.DECISION_OUTPUT in prediction:
        accepted = np.asarray(prediction[contract.DECISION_OUTPUT]).reshape(-1) == _ACCEPTED
    else:  # a model that cannot abstain answers everything
        accepted = np.ones(labels.size, dtype=bool)
    wrong = probabilities.argmax(axis=1) != labels
    return int(labels.size), int(accepted.sum()), int((accepted & wrong).sum())


class _Combiner(beam.CombineFn):
    def __init__(self, key: metric_types.MetricKey, model_name: str, kind: str):
        self._key, self._model_name, self._kind = key, model_name, kind

    def create_accumulator(self) -> np.ndarray:
        return np.zeros(3, dtype=np.int64)  # examples, accepted, accepted and wrong

    def add_input(self, accumulator: np.ndarray, element: metric_types.StandardMetricInputs) -> np.ndarray:
        prediction, label = element.prediction, element.label
        if self._model_name:
            prediction = util.get_by_keys(prediction, [self._model_name])
            if isinstance(label, dict) and self._model_name in label:
                label = label[self._model_name]
        return accumulator + np.asarray(answer_counts(prediction, label), dtype=np.int64)

    def merge_accumulators(self, accumulators: Iterable[np.ndarray]) -> np.ndarray:
        return np.sum(list(accumulators), axis=0)

    def extract_output(self, accumulator: np.ndarray) -> dict:
        examples, accepted, wrong = (int(value) for value in accumulator)
        if self._kind == COVERAGE_METRIC:
            value = accepted / examples if examples else float("nan")
        else:  # nothing accepted: no answer was wrong, and the coverage gate is what refuses such a model
            value = wrong / accepted if accepted else 0.0
        return {self._key: value}
