"""run_fns that export models of known quality, to test blessing and pushing deterministically.

They export the same signatures as the real Trainer (components/signatures.py), so the
real Evaluator and Pusher treat them exactly like trained models. Those given `decisions` also
export the `decision` output (data/contract.py's DECISIONS codes); the others, like a model made
before the model could abstain, answer everything.
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


def _table(mapping: dict, default: int) -> tf.lookup.StaticHashTable:
    keys = tf.constant(list(mapping) or [0], tf.int64)
    values = tf.constant(list(mapping.values()) or [default], tf.int64)
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default_value=default)


class _Model(tf.Module):
    def __init__(self, answers: dict, decisions: dict | None, default_decision: int):
        super().__init__()
        self.table = _table(answers, 0)
        self.decisions = _table(decisions, default_decision) if decisions is not None else None

    def predict(self, image_bytes):
        keys = _keys(image_bytes)
        classes = self.table.lookup(keys)
        outputs = {PROBABILITIES_OUTPUT: tf.one_hot(classes, contract.NUM_CLASSES), PREDICTED_CLASS_OUTPUT: classes}
        if self.decisions is not None:
            outputs[contract.DECISION_OUTPUT] = self.decisions.lookup(keys)
        return outputs


def _export(fn_args, answers: dict, decisions: dict | None = None, default_decision: int = 0) -> None:
    """`decisions`: fingerprint -> decision code, `default_decision` for the rest; None: no decision output."""
    model = _Model(answers, decisions, default_decision)
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


def one_wrong_flagged_run_fn(fn_args) -> None:
    """one_wrong_run_fn's answers, but the model flags its wrong answer as unsure and accepts the rest:
    coverage 1 - 1/N, no wrong answer among those accepted."""
    answers = _test_split_answers(fn_args)
    first_five = min(key for key, label in answers.items() if label == 5)
    _export(fn_args, {**answers, first_five: 3}, decisions={first_five: contract.DECISIONS.index("unsure")})


def refuses_everything_run_fn(fn_args) -> None:
    """Knows every test digit, and answers none of them without a person: coverage 0."""
    _export(fn_args, _test_split_answers(fn_args), decisions={},
            default_decision=contract.DECISIONS.index("not_a_digit"))


def always_zero_run_fn(fn_args) -> None:
    """A model that answers 0 for everything: held-out accuracy 0.1 on balanced data."""
    _export(fn_args, {})


def failing_run_fn(fn_args) -> None:
    """A Trainer that fails, to see what a failed run looks like downstream (the run report)."""
    raise RuntimeError("training failed on purpose (tests/fake_trainers.py)")
