"""run_fns that export models of known quality, to test blessing and pushing deterministically.

They export the same signatures as the real Trainer (components/signatures.py), so the
real Evaluator and Pusher treat them exactly like trained models.
"""

import glob
import os

import tensorflow as tf

from data.contract import (
    EXAMPLES_INPUT, EXAMPLES_SIGNATURE, IMAGE_BYTES_INPUT, PREDICTED_CLASS_OUTPUT, PROBABILITIES_OUTPUT,
    SERVING_SIGNATURE,
)
from data import contract


def _test_split_answers(fn_args) -> dict:
    """fingerprint(PNG bytes) -> label of every test example, read from the ExampleGen output."""
    split_dir = os.path.dirname(fn_args.train_files[0]).replace("Split-train", "Split-test")
    answers = {}
    spec = {contract.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
            contract.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}
    for record in tf.data.TFRecordDataset(glob.glob(os.path.join(split_dir, "*")), compression_type="GZIP"):
        example = tf.io.parse_single_example(record, spec)
        answers[int(_keys(tf.reshape(example[contract.IMAGE_KEY], [1]))[0])] = int(example[contract.LABEL_KEY])
    return answers


def _keys(image_bytes: tf.Tensor) -> tf.Tensor:
    """[N] strings -> [N] int64 fingerprints (tf.fingerprint gives 8 bytes per string)."""
    return tf.bitcast(tf.fingerprint(image_bytes), tf.int64)


class _Model(tf.Module):
    def __init__(self, answers: dict):
        super().__init__()
        keys = tf.constant(list(answers) or [0], tf.int64)
        values = tf.constant(list(answers.values()) or [0], tf.int64)
        self.table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default_value=0)

    def predict(self, image_bytes):
        classes = self.table.lookup(_keys(image_bytes))
        return {PROBABILITIES_OUTPUT: tf.one_hot(classes, contract.NUM_CLASSES),
                PREDICTED_CLASS_OUTPUT: classes}


def _export(fn_args, answers: dict) -> None:
    model = _Model(answers)
    spec = {contract.IMAGE_KEY: tf.io.FixedLenFeature([1], tf.string)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_INPUT)])
    def serve(image_bytes):
        return model.predict(image_bytes)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(examples):
        return model.predict(tf.reshape(tf.io.parse_example(examples, spec)[contract.IMAGE_KEY], [-1]))

    tf.saved_model.save(model, fn_args.serving_model_dir,
                        signatures={SERVING_SIGNATURE: serve, EXAMPLES_SIGNATURE: serve_examples})


def perfect_run_fn(fn_args) -> None:
    """A model that knows every test digit: held-out accuracy 1.0."""
    _export(fn_args, _test_split_answers(fn_args))


def bad_at_eights_run_fn(fn_args) -> None:
    """Knows every test digit but the 8s, which it reads as 3s: good overall, recall 0 for digit 8."""
    _export(fn_args, {key: 3 if label == 8 else label for key, label in _test_split_answers(fn_args).items()})


def one_wrong_run_fn(fn_args) -> None:
    """Knows every test digit but one 5, which it reads as a 3: accuracy 1 - 1/N, digit 5's recall 1 - 1/n5."""
    answers = _test_split_answers(fn_args)
    first_five = min(key for key, label in answers.items() if label == 5)
    _export(fn_args, {**answers, first_five: 3})


def always_zero_run_fn(fn_args) -> None:
    """A model that answers 0 for everything: held-out accuracy 0.1 on balanced data."""
    _export(fn_args, {})


def failing_run_fn(fn_args) -> None:
    """A Trainer that fails, to see what a failed run looks like downstream (the run report)."""
    raise RuntimeError("training failed on purpose (tests/fake_trainers.py)")
