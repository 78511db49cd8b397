"""Warmup requests: written beside the SavedModel, read back, and answered by the pushed model."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.warmup import (
    WARMUP_BATCH_SIZES, read_warmup_requests, warmup_images_from_examples, warmup_path, write_warmup_requests,
)


@pytest.fixture(scope="module")
def pngs(sample_tree) -> list[bytes]:
    """Three held-out digits, encoded as the clients send them."""
    return [sorted((sample_tree / "testing" / digit).iterdir())[0].read_bytes() for digit in ("3", "5", "8")]


@pytest.fixture
def placeholder_model(tmp_path) -> Path:
    """A directory that looks like a SavedModel version: enough to write and read warmup records."""
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"")
    return tmp_path / "1"


def test_write_then_read_round_trip(placeholder_model, pngs):
    import tensorflow as tf

    path = write_warmup_requests(str(placeholder_model), pngs, model_name="digits")
    assert path == str(placeholder_model / "assets.extra" / "tf_serving_warmup_requests")
    requests = read_warmup_requests(str(placeholder_model))
    assert [len(tf.make_ndarray(request.inputs["image_bytes"])) for request in requests] == [1, 1, 8]
    for request in requests:
        assert (request.model_spec.name, request.model_spec.signature_name) == ("digits", "serving_default")
        assert request.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    batch = list(tf.make_ndarray(requests[2].inputs["image_bytes"]))
    assert batch == [pngs[(1 + 1 + i) % 3] for i in range(8)]  # the images are reused in turn


def test_records_are_uncompressed_prediction_logs_within_tf_servings_limit(placeholder_model, pngs):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    write_warmup_requests(str(placeholder_model), pngs)
    records = list(tf.data.TFRecordDataset(warmup_path(str(placeholder_model))).as_numpy_iterator())
    assert 0 < len(records) == len(WARMUP_BATCH_SIZES) <= 1000
    for record in records:
        assert prediction_log_pb2.PredictionLog.FromString(record).WhichOneof("log_type") == "predict_log"


def test_bad_warmup_inputs_are_refused(tmp_path, placeholder_model, pngs):
    with pytest.raises(ValueError, match="at least one encoded image"):
        write_warmup_requests(str(placeholder_model), [])
    with pytest.raises(ValueError, match="not a SavedModel directory"):
        write_warmup_requests(str(tmp_path / "nowhere"), pngs)
    with pytest.raises(ValueError, match="no warmup requests"):
        read_warmup_requests(str(placeholder_model))


def test_images_come_from_the_raw_examples(tiny_records):
    images = warmup_images_from_examples([str(tiny_records / "test" / "*")], count=5)
    assert len(images) == 5
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    with pytest.raises(ValueError, match="no TFRecord files match"):
        warmup_images_from_examples([str(tiny_records / "nothing-*.gz")], count=5)


@pytest.mark.slow
@pytest.mark.e2e
def test_every_warmup_request_is_answered_by_the_pushed_models_serving_signature(pushed_model):
    """The file the Trainer itself wrote beside the pushed SavedModel: requests of 1, 1 and 8 real PNG
    digits, each answered by the model's serving_default with a probability row per image."""
    import numpy as np
    import tensorflow as tf

    [version] = list(pushed_model.iterdir())
    requests = read_warmup_requests(str(version))
    batches = [tf.make_ndarray(request.inputs["image_bytes"]) for request in requests]
    assert [len(images) for images in batches] == list(WARMUP_BATCH_SIZES)
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") for images in batches for image in images)
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    for request, images in zip(requests, batches):
        assert (request.model_spec.name, request.model_spec.signature_name) == ("digits", "serving_default")
        outputs = serve(image_bytes=tf.constant(images))
        probabilities = outputs["probabilities"].numpy()
        assert probabilities.shape == (len(images), 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(outputs["predicted_class"].numpy(), probabilities.argmax(axis=1))
