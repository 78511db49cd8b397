"""TF Serving warmup requests stored with the SavedModel, so a new version is warm before it serves.

TF Serving replays `<version>/assets.extra/tf_serving_warmup_requests` (a TFRecord of
PredictionLog, at most 1,000 records) when it loads a version, before marking it AVAILABLE.
"""

from __future__ import annotations

import itertools
import os

import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from data import contract
from data.contract import IMAGE_BYTES_INPUT, SERVING_SIGNATURE

WARMUP_DIR = contract.ASSETS_EXTRA_DIR
WARMUP_FILE = "tf_serving_warmup_requests"
# A single image twice (the first call pays one-time initialisation) and a batch of 8, so
# both the unbatched path and a batched shape are warm; TF Serving reads at most 1,000.
WARMUP_BATCH_SIZES = (1, 1, 8)


def warmup_path(saved_model_dir: str) -> str:
    return os.path.join(saved_model_dir, WARMUP_DIR, WARMUP_FILE)


def write_warmup_requests(saved_model_dir: str, images: list[bytes], model_name: str = "digits") -> str:
    """Writes the warmup file for a saved model from encoded images (reused in turn) and returns its path."""
    if not images:
        raise ValueError("warmup needs at least one encoded image")
    if not tf.io.gfile.exists(os.path.join(saved_model_dir, "saved_model.pb")):
        raise ValueError(f"not a SavedModel directory (no saved_model.pb): {saved_model_dir}")
    cycle = itertools.cycle(images)
    path = warmup_path(saved_model_dir)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for batch_size in WARMUP_BATCH_SIZES:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = SERVING_SIGNATURE
            batch = [next(cycle) for _ in range(batch_size)]
            request.inputs[IMAGE_BYTES_INPUT].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(saved_model_dir: str) -> list[predict_pb2.PredictRequest]:
    """The PredictRequests in a saved model's warmup file, in order (ValueError if there is none)."""
    path = warmup_path(saved_model_dir)
    if not tf.io.gfile.exists(path):
        raise ValueError(f"no warmup requests: {path} does not exist")
    requests = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"{path}: expected predict_log records, found {log.WhichOneof('log_type')}")
        requests.append(log.predict_log.request)
    return requests


def warmup_images_from_examples(file_patterns: list[str], count: int) -> list[bytes]:
    """Up to `count` encoded images from GZIP TFRecords of tf.train.Example (the raw `image` feature)."""
    files = sorted({path for pattern in file_patterns for path in tf.io.gfile.glob(pattern)})
    if not files:
        raise ValueError(f"no TFRecord files match {', '.join(file_patterns)}")
    images = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP").take(count).as_numpy_iterator():
        feature = tf.train.Example.FromString(record).features.feature.get(contract.IMAGE_KEY)
        if feature is None or not feature.bytes_list.value:
            raise ValueError(f"an example in {', '.join(files)} has no '{contract.IMAGE_KEY}' bytes feature")
        images.append(feature.bytes_list.value[0])
    return images
