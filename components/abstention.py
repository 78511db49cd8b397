"""Knowing when not to answer: an out-of-distribution score, a calibrated confidence and a decision.

Fitted by the Trainer once the model is trained, exported inside the SavedModel as graph constants
(core TensorFlow ops only, so TF Serving, `digits serve` and every client get the same decision):

- **Not a digit**: the energy score of the logits, -logsumexp(logits) (Liu et al., 2020). The model
  is trained with outlier exposure (components/model.py): non-digits are taught a uniform answer, so
  every logit stays low on them, while a digit, even one the model hesitates on, has one or two high
  logits. Large: the image is unlike any digit, whatever the softmax's top class says.
- **Calibrated confidence**: the top-class probability of the logits divided by a temperature fitted
  on the eval split by likelihood (Guo et al., 2017).
- **Decision**, per image: `accepted` (0), `unsure` (1: a digit, but a person should look: the
  calibrated confidence is below its threshold) or `not_a_digit` (2: the energy is above its
  threshold, or there is no ink at all). Both thresholds are chosen on the eval split for a stated
  share of its digits kept (TrainerConfig's abstention_* settings).

`benchmarks/abstention.py` measured this against the alternatives side by side (the top-class
probability, temperature scaling, Mahalanobis distance and k nearest neighbours on the features,
combinations; docs/abstention.md). This module owns the decision codes, the fitted constants and the
file the run report reads them from. Fitting is numpy; TensorFlow is imported only by `outputs` and `write`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from data.contract import ASSETS_EXTRA_DIR, DECISIONS

ACCEPTED, UNSURE, NOT_A_DIGIT = (DECISIONS.index(name) for name in ("accepted", "unsure", "not_a_digit"))

FEATURE_LAYER = "dense_2"  # the penultimate layer: what the classifier's last Dense reads
LOGITS_LAYER = "probabilities"  # the Dense(10, softmax) whose pre-softmax values are the logits

FILE = "abstention.json"
FORMAT = 1

TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass(frozen=True)
class Abstention:
    """The fitted constants and the operating point: everything the exported graph needs."""

    temperature: float
    ood_threshold: float  # energy score above which an image is not a digit
    confidence_threshold: float  # calibrated top-class probability below which a digit is unsure
    ood_keep: float  # the eval share kept by ood_threshold (the stated target)
    confident_keep: float  # of the eval digits kept by ood_threshold, the share kept by confidence_threshold
    eval_examples: int

    def summary(self) -> dict[str, Any]:
        """The operating point, as the run report and the file state it."""
        return {
            "format": FORMAT,
            "method": "energy score of the logits (outlier exposure in training), temperature-scaled confidence",
            "temperature": self.temperature,
            "ood_threshold": self.ood_threshold,
            "confidence_threshold": self.confidence_threshold,
            "ood_keep": self.ood_keep,
            "confident_keep": self.confident_keep,
            "eval_examples": self.eval_examples,
        }


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp(logits) [N]: low on digits, high where every logit is low."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of `labels` (golden-section search in log T)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)

    def nll(log_t: float) -> float:
        probabilities = softmax(logits, math.exp(log_t))
        return -float(np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-300, None))))

    low, high = (math.log(bound) for bound in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return float(math.exp((low + high) / 2))


def _upper_quantile(values: np.ndarray, keep: float) -> float:
    """The value at or below which the share `keep` of `values` lies (linear interpolation)."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), keep))


def fit(eval_logits: np.ndarray, eval_labels: np.ndarray, ood_keep: float, confident_keep: float) -> Abstention:
    """The temperature and both thresholds, from the eval split's logits: `ood_keep` of its digits are
    under the energy threshold, and `confident_keep` of those over the confidence threshold."""
    if not (0.5 <= ood_keep <= 1.0 and 0.5 <= confident_keep <= 1.0):
        raise ValueError(f"the shares kept must be in [0.5, 1], got {ood_keep} and {confident_keep}")
    logits = np.asarray(eval_logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] != len(eval_labels) or not len(eval_labels):
        raise ValueError(f"expected eval logits [N, classes] for N labels, got {list(logits.shape)} for {len(eval_labels)}")
    temperature = fit_temperature(logits, eval_labels)
    scores = energy(logits)
    ood_threshold = _upper_quantile(scores, ood_keep)
    confidence = softmax(logits, temperature).max(axis=1)[scores <= ood_threshold]
    confidence_threshold = _upper_quantile(confidence, 1.0 - confident_keep)
    return Abstention(temperature=temperature, ood_threshold=ood_threshold, confidence_threshold=confidence_threshold,
                      ood_keep=ood_keep, confident_keep=confident_keep, eval_examples=int(len(eval_labels)))


def decide(scores: np.ndarray, confidence: np.ndarray, ink_fraction: np.ndarray, abstention: Abstention) -> np.ndarray:
    """The decision codes [N] from energy scores and calibrated confidences, as the exported graph
    computes them (numpy, for the Trainer's measurements, tests and benchmarks)."""
    not_a_digit = (np.asarray(scores) > abstention.ood_threshold) | (np.asarray(ink_fraction) <= 0.0)
    unsure = np.asarray(confidence) < abstention.confidence_threshold
    return np.where(not_a_digit, NOT_A_DIGIT, np.where(unsure, UNSURE, ACCEPTED)).astype(np.int64)


def outputs(logits, ink_fraction, abstention: Abstention) -> dict:
    """The exported graph's abstention outputs from a batch's logits [N, 10] and ink fraction [N]: core
    ops only (ReduceLogSumExp's parts, Softmax, comparisons), the constants baked in."""
    import tensorflow as tf

    from data import contract

    logits = tf.cast(logits, tf.float32)
    score = -tf.reduce_logsumexp(logits, axis=-1)
    confidence = tf.reduce_max(tf.nn.softmax(logits / abstention.temperature, axis=-1), axis=-1)
    not_a_digit = tf.logical_or(score > abstention.ood_threshold, ink_fraction <= 0.0)
    unsure = confidence < abstention.confidence_threshold
    decision = tf.where(not_a_digit, tf.constant(NOT_A_DIGIT, tf.int64),
                        tf.where(unsure, tf.constant(UNSURE, tf.int64), tf.constant(ACCEPTED, tf.int64)))
    return {
        contract.OOD_SCORE_OUTPUT: score,
        contract.CONFIDENCE_OUTPUT: confidence,
        contract.DECISION_OUTPUT: decision,
        contract.ACCEPTED_OUTPUT: tf.equal(decision, ACCEPTED),
    }


def measure(scores: np.ndarray, confidence: np.ndarray, correct: np.ndarray, abstention: Abstention,
            points: int = 41) -> dict[str, Any]:
    """What the operating point does on labelled digits (the eval split, in the Trainer): the shares of
    each decision, the error among accepted answers, and the risk-coverage curve (the error among the
    answers kept as the confidence threshold rises, the out-of-distribution threshold fixed)."""
    decisions = decide(scores, confidence, np.ones(len(confidence)), abstention)
    correct = np.asarray(correct, dtype=bool)
    accepted = decisions == ACCEPTED
    in_distribution = np.asarray(scores) <= abstention.ood_threshold
    order = np.argsort(-np.where(in_distribution, confidence, -1.0), kind="mergesort")
    curve = []
    for coverage in np.linspace(0.5, 1.0, points):
        kept = order[:max(1, int(round(coverage * len(order))))]
        curve.append([round(float(coverage), 4), round(float(1.0 - correct[kept].mean()), 6)])
    return {
        "examples": int(len(correct)),
        "decision_share": {DECISIONS[code]: float(np.mean(decisions == code)) for code in range(len(DECISIONS))},
        "error_among_accepted": float(1.0 - correct[accepted].mean()) if accepted.any() else None,
        "error_all": float(1.0 - correct.mean()),
        "risk_coverage": curve,
    }


def path(saved_model_dir: str) -> str:
    return os.path.join(saved_model_dir, ASSETS_EXTRA_DIR, FILE)


def write(saved_model_dir: str, abstention: Abstention, measured: dict[str, Any] | None = None) -> str:
    """The operating point beside the SavedModel (the report reads it; the graph holds the constants)."""
    import tensorflow as tf

    target = path(saved_model_dir)
    tf.io.gfile.makedirs(os.path.dirname(target))
    content = {**abstention.summary(), "measured": measured or {}}
    with tf.io.gfile.GFile(target, "w") as stream:
        stream.write(json.dumps(content, sort_keys=True, indent=1) + "\n")
    return target


def read(saved_model_dir: str) -> dict[str, Any] | None:
    """The operating point written beside a SavedModel, or None if the model has none. Through
    tf.io.gfile, as written: a Vertex run's model lives under gs://."""
    import tensorflow as tf

    target = path(saved_model_dir)
    if not tf.io.gfile.exists(target):
        return None
    with tf.io.gfile.GFile(target) as stream:
        return json.load(stream)

