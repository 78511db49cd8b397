"""The reference profile: computed from probabilities, written beside the model, read back, refused when
broken, and exported by `digits serve` as gauges of the versions it has loaded."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from components.reference import (
    PROFILE_DIR, PROFILE_FILE, profile_path, read_reference_profile, reference_profile, to_json,
    write_reference_profile,
)
from conftest import REPO
from data import contract
from serving_clients import scrape

LE = ("0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.99", "0.999")  # what Prometheus prints for the buckets
MODEL_LABELS = ("model_name", "model_version")


def _rows(*rows: tuple[int, float]) -> np.ndarray:
    """Probabilities with the given (top class, top probability) per row, the rest spread evenly."""
    probabilities = np.empty((len(rows), contract.NUM_CLASSES))
    for row, (top, confidence) in zip(probabilities, rows):
        row[:] = (1 - confidence) / (contract.NUM_CLASSES - 1)
        row[top] = confidence
    return probabilities


@pytest.fixture
def placeholder_model(tmp_path) -> Path:
    """A directory that looks like a SavedModel version: enough to write and read a profile."""
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"")
    return tmp_path / "1"


# -- the profile of hand-made probabilities ----------------------------------------------------------------

def test_shares_mean_and_cumulative_confidence_of_hand_made_probabilities():
    profile = reference_profile(_rows((3, 0.55), (3, 0.95), (7, 0.5), (0, 0.999), (3, 1.0)))
    assert profile == {
        "format": 1, "source": "eval split", "examples": 5,
        "class_share": {"0": 0.2, "1": 0.0, "2": 0.0, "3": 0.6, "4": 0.0, "5": 0.0, "6": 0.0, "7": 0.2, "8": 0.0,
                        "9": 0.0},
        "confidence_mean": pytest.approx((0.55 + 0.95 + 0.5 + 0.999 + 1.0) / 5, abs=1e-12),
        # <= le, as a Prometheus bucket counts: 0.5 is in le="0.5", 0.999 in le="0.999", 1.0 only in +Inf.
        "confidence_cumulative_share": {"0.5": 0.2, "0.6": 0.4, "0.7": 0.4, "0.8": 0.4, "0.9": 0.4, "0.95": 0.6,
                                        "0.99": 0.6, "0.999": 0.8, "+Inf": 1.0},
    }


def test_every_example_on_one_class():
    profile = reference_profile(_rows(*[(7, 1.0)] * 4))
    assert profile["class_share"] == {name: (1.0 if name == "7" else 0.0) for name in contract.CLASS_NAMES}
    assert profile["confidence_mean"] == 1.0
    assert profile["confidence_cumulative_share"] == {**{le: 0.0 for le in LE}, "+Inf": 1.0}


def test_a_tie_goes_to_the_first_class_as_the_serving_signature_argmax_does():
    profile = reference_profile(np.full((2, contract.NUM_CLASSES), 0.1))
    assert profile["class_share"]["0"] == 1.0
    assert profile["confidence_cumulative_share"]["0.5"] == 1.0


def test_cumulative_shares_equal_servings_live_confidence_histogram_on_the_same_predictions():
    # The point of the profile: live traffic like the eval split gives the same bucket shares.
    from serving.metrics import CONFIDENCE, ServingMetrics

    logits = np.random.default_rng(0).normal(scale=4, size=(500, contract.NUM_CLASSES))
    probabilities = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    probabilities[:3] = _rows((1, 0.9), (2, 0.5), (3, 0.99)).astype(np.float32)  # on the bounds, in float32
    profile = reference_profile(probabilities)
    metrics = ServingMetrics()
    metrics.record_predictions("digits", 1, probabilities.argmax(axis=1), probabilities.max(axis=1))
    buckets = {sample.labels["le"]: sample.value for family in text_string_to_metric_families(metrics.render())
               if family.name == CONFIDENCE for sample in family.samples if sample.name.endswith("_bucket")}
    assert sorted(buckets) == sorted([*LE, "+Inf"])
    assert {le: count / len(probabilities) for le, count in buckets.items()} == profile["confidence_cumulative_share"]
    assert len(set(profile["confidence_cumulative_share"].values())) > 3  # the data spreads over the buckets


def test_probabilities_that_cannot_be_profiled_are_refused():
    with pytest.raises(ValueError, match=r"shape \[N, 10\], got \[4, 3\]"):
        reference_profile(np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="at least one example"):
        reference_profile(np.empty((0, contract.NUM_CLASSES)))
    nan = _rows((1, 0.9))
    nan[0, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reference_profile(nan)


# -- the file ----------------------------------------------------------------------------------------------

def test_write_then_read_round_trip_beside_the_warmup_file(placeholder_model):
    from components.warmup import warmup_path

    probabilities = _rows((3, 0.55), (8, 0.97), (8, 0.6))
    path = write_reference_profile(str(placeholder_model), probabilities)
    assert path == str(placeholder_model / "assets.extra" / "reference_profile.json") == profile_path(
        str(placeholder_model))
    assert Path(path).parent == Path(warmup_path(str(placeholder_model))).parent  # TF Serving ignores the rest
    text = Path(path).read_text()
    assert text == to_json(reference_profile(probabilities))
    assert list(json.loads(text)) == sorted(json.loads(text))  # keys sorted
    assert read_reference_profile(str(placeholder_model)) == reference_profile(probabilities)


def test_a_model_without_a_profile_reads_as_none_and_writing_needs_a_saved_model(tmp_path, placeholder_model):
    assert read_reference_profile(str(placeholder_model)) is None
    with pytest.raises(ValueError, match="not a SavedModel directory"):
        write_reference_profile(str(tmp_path / "nowhere"), _rows((1, 0.9)))


def _broken(profile: dict, change) -> str:
    change(profile)
    return json.dumps(profile)


MALFORMED = {
    "not JSON": ("{'format': 1,", "not JSON"),
    "not UTF-8": (b"{\"format\": \"\x80\x81\"}", "not JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "format 2": (lambda p: p.update(format=2), r"unsupported format 2 \(expected 1\)"),
    "no format": (lambda p: p.pop("format"), "unsupported format None"),
    "missing key": (lambda p: p.pop("confidence_mean"), r"missing keys \['confidence_mean'\]"),
    "unknown key": (lambda p: p.update(extra=1), r"unexpected keys \['extra'\]"),
    "examples zero": (lambda p: p.update(examples=0), "examples must be a positive integer"),
    "shares sum to 0.9": (lambda p: p["class_share"].update({"3": p["class_share"]["3"] - 0.1}), r"sums to 0\.9, not 1"),
    "a class missing": (lambda p: p["class_share"].pop("9"), "exactly the classes"),
    "share above 1": (lambda p: p["class_share"].update({"1": 1.5, "3": -0.5}), r"values must be numbers in \[0, 1\]"),
    "mean as text": (lambda p: p.update(confidence_mean="0.8"), "confidence_mean must be a number"),
    "no +Inf": (lambda p: p["confidence_cumulative_share"].pop("+Inf"), "'\\+Inf' share is 1"),
    "not cumulative": (lambda p: p["confidence_cumulative_share"].update({"0.9": 0.1}), "not cumulative"),
    "bad le": (lambda p: p["confidence_cumulative_share"].update({"high": 1.0}), "keys must be bucket bounds"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_profile_is_refused_with_the_file_and_the_problem(placeholder_model, case):
    content, message = MALFORMED[case]
    valid = reference_profile(_rows((3, 0.7), (5, 0.92), (3, 0.85)))
    data = content if isinstance(content, (str, bytes)) else _broken(valid, content)
    path = placeholder_model / PROFILE_DIR / PROFILE_FILE
    path.parent.mkdir()
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(ValueError, match=message) as raised:
        read_reference_profile(str(placeholder_model))
    assert str(raised.value).startswith(f"{path}: ")


def test_reading_a_profile_imports_no_tensorflow(placeholder_model):
    # Serving and web processes read profiles; importing this module must not cost a TensorFlow import.
    path = placeholder_model / PROFILE_DIR / PROFILE_FILE
    path.parent.mkdir()
    path.write_text(to_json(reference_profile(_rows((2, 0.8)))))
    code = ("import sys; from components.reference import read_reference_profile as read; "
            f"assert read({str(placeholder_model)!r})['examples'] == 1; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- serving: the gauges of the loaded versions ------------------------------------------------------------

def _gauges(metrics) -> dict[str, dict[tuple, float]]:
    return {family.name: {tuple(sorted(sample.labels.items())): sample.value for sample in family.samples}
            for family in text_string_to_metric_families(metrics.render())}


def _reference_gauges(samples: dict) -> dict[str, dict]:
    from serving.metrics import (REFERENCE_CLASS_SHARE, REFERENCE_CONFIDENCE_BUCKET_SHARE, REFERENCE_CONFIDENCE_MEAN,
                                 REFERENCE_EXAMPLES)

    names = (REFERENCE_CLASS_SHARE, REFERENCE_CONFIDENCE_BUCKET_SHARE, REFERENCE_CONFIDENCE_MEAN, REFERENCE_EXAMPLES)
    return {name: samples[name] for name in names if samples.get(name)}


def _expected_gauges(model_name: str, version: str, profile: dict) -> dict[str, dict]:
    """What the metrics page must show for one version's profile, built from the file's own content."""
    from serving.metrics import (REFERENCE_CLASS_LABEL, REFERENCE_CLASS_SHARE, REFERENCE_CONFIDENCE_BUCKET_SHARE,
                                 REFERENCE_CONFIDENCE_MEAN, REFERENCE_EXAMPLES)

    model = (("model_name", model_name), ("model_version", version))

    def key(*extra):
        return tuple(sorted((*model, *extra)))

    return {
        REFERENCE_CLASS_SHARE: {key((REFERENCE_CLASS_LABEL, name)): share
                                for name, share in profile["class_share"].items()},
        REFERENCE_CONFIDENCE_BUCKET_SHARE: {key(("le", le)): share
                                            for le, share in profile["confidence_cumulative_share"].items()},
        REFERENCE_CONFIDENCE_MEAN: {key(): profile["confidence_mean"]},
        REFERENCE_EXAMPLES: {key(): profile["examples"]},
    }


def _merge(*gauges: dict) -> dict:
    merged: dict[str, dict] = {}
    for part in gauges:
        for name, samples in part.items():
            merged.setdefault(name, {}).update(samples)
    return merged


def test_metrics_show_the_profiles_given_and_drop_the_ones_left_out():
    from serving.metrics import ServingMetrics

    first, second = reference_profile(_rows((1, 0.8), (2, 0.6))), reference_profile(_rows((4, 0.99)))
    metrics = ServingMetrics()
    metrics.set_reference_profiles("digits", {3: first, 5: second})
    assert _reference_gauges(_gauges(metrics)) == _merge(_expected_gauges("digits", "3", first),
                                                         _expected_gauges("digits", "5", second))
    metrics.set_reference_profiles("digits", {5: second})
    assert _reference_gauges(_gauges(metrics)) == _expected_gauges("digits", "5", second)
    metrics.set_reference_profiles("digits", {})
    assert "reference" not in metrics.render()  # no family left, not even an empty one


class _FakeServable:
    """Stands in for a loaded SavedModel: the manager's life cycle without TensorFlow's load."""

    def __init__(self, config, version, path, metrics):
        self.version = version

    def warm_up(self) -> int:
        return 0

    def wait_idle(self, timeout=None) -> bool:
        return True

    def release(self) -> None:
        pass


def test_versions_without_or_with_a_broken_profile_serve_with_a_warning_and_no_reference_gauges(
        tmp_path, monkeypatch, caplog):
    from serving import models
    from serving.config import ServerConfig
    from serving.metrics import LOADED_VERSIONS, ServingMetrics

    monkeypatch.setattr(models, "Servable", _FakeServable)
    monkeypatch.setattr(models.runtime, "lower_compute_priority", lambda: 0)  # not this test process's threads
    for version in (1, 2, 3):
        (tmp_path / str(version)).mkdir()
        (tmp_path / str(version) / "saved_model.pb").write_bytes(b"")
    (tmp_path / "2" / PROFILE_DIR).mkdir()
    (tmp_path / "2" / PROFILE_DIR / PROFILE_FILE).write_text('{"format": 1, "class_share": ')
    good = reference_profile(_rows((6, 0.93), (0, 0.41)))
    write_reference_profile(str(tmp_path / "3"), _rows((6, 0.93), (0, 0.41)))

    metrics = ServingMetrics()
    manager = models.ModelManager(ServerConfig(model_base_path=tmp_path, num_versions=3), metrics)
    with caplog.at_level(logging.INFO, logger="serving.models"):
        manager.load_existing()

    assert manager.available_versions() == [1, 2, 3]  # all three serve
    samples = _gauges(metrics)
    assert sorted(dict(key)["model_version"] for key in samples[LOADED_VERSIONS]) == ["1", "2", "3"]
    assert _reference_gauges(samples) == _expected_gauges("digits", "3", good)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(record.exc_info is None for record in warnings)
    missing, broken = sorted(warnings, key=lambda record: record.getMessage())
    assert missing.getMessage() == (f"digits version 1 has no reference profile ({tmp_path / '1' / PROFILE_DIR / PROFILE_FILE}"
                                    " missing): no reference gauges")
    assert broken.getMessage().startswith(
        f"digits version 2: reference profile ignored, no reference gauges: {tmp_path / '2' / PROFILE_DIR / PROFILE_FILE}"
        ": not JSON")
    assert "\n" not in broken.getMessage()

    # Version 3 leaves the base path: unloaded, and its reference gauges with it.
    shutil.rmtree(tmp_path / "3")
    manager.poll(settle=False)
    assert manager.available_versions() == [1, 2]
    assert _reference_gauges(_gauges(metrics)) == {}


# -- the real pipeline's model, and the real server ----------------------------------------------------------

@pytest.mark.slow
def test_the_pushed_model_carries_the_profile_of_its_predictions_on_the_whole_eval_split(pushed_model, tiny_records):
    import tensorflow as tf

    (version,) = pushed_model.iterdir()
    profile = read_reference_profile(str(version))
    assert profile is not None, f"no {profile_path(str(version))}"
    assert sorted(profile["class_share"]) == list(contract.CLASS_NAMES)
    assert sum(profile["class_share"].values()) == pytest.approx(1.0, abs=1e-9)
    assert list(profile["confidence_cumulative_share"]) == ["+Inf", *LE]  # sorted keys, as written

    # Every eval example, unaugmented, through the exported model itself, gives the same profile.
    files = sorted(str(path) for path in (tiny_records / contract.EVAL_SPLIT).iterdir())
    examples = list(tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator())
    assert profile["examples"] == len(examples) > 0
    signature = tf.saved_model.load(str(version)).signatures[contract.EXAMPLES_SIGNATURE]
    probabilities = signature(examples=tf.constant(examples))[contract.PROBABILITIES_OUTPUT].numpy()
    recomputed = reference_profile(probabilities)
    assert profile["class_share"] == recomputed["class_share"]
    assert profile["confidence_cumulative_share"] == recomputed["confidence_cumulative_share"]
    assert profile["confidence_mean"] == pytest.approx(recomputed["confidence_mean"], abs=1e-5)


@pytest.mark.slow
def test_the_server_exports_the_served_versions_profile_as_gauges(model_server, pushed_model):
    (version,) = pushed_model.iterdir()
    profile = read_reference_profile(str(version))
    assert _reference_gauges(scrape(model_server.rest_url)) == _expected_gauges("digits", version.name, profile)
    assert not [line for line in model_server.output if "reference profile" in line]  # no warning for it
