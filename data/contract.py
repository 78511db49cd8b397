"""The data contract: feature names, classes and image geometry shared by every stage.

A leaf module with no TensorFlow import, so that the TFRecord builder, Transform,
Trainer, evaluation config, serving signature and clients all agree on one copy.
"""

from __future__ import annotations

# Raw features, as the TFRecord builder writes them in each tf.train.Example.
IMAGE_KEY = "image"  # bytes: the original encoded PNG
LABEL_KEY = "label"  # int64: the digit, 0..NUM_CLASSES-1

NUM_CLASSES = 10
CLASS_NAMES = tuple(str(digit) for digit in range(NUM_CLASSES))

# The source images: MNIST digits are 28x28 8-bit grayscale.
SOURCE_IMAGE_SIZE = 28
# How MNIST was made, and what Transform makes of any image: light ink on black, the ink's box
# scaled so that its longer side is INK_BOX_SIZE, its centre of mass at the centre of 28x28.
NORMALIZED_IMAGE_SIZE = SOURCE_IMAGE_SIZE
INK_BOX_SIZE = 20

# What the model sees after Transform: InceptionV3's minimum input size and range.
IMAGE_SIZE = 75
IMAGE_CHANNELS = 3
VALUE_RANGE = (-1.0, 1.0)

# Splits the builder writes, one directory each, mapped to TFX splits by ImportExampleGen.
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
TEST_SPLIT = "test"
SPLITS = (TRAIN_SPLIT, EVAL_SPLIT, TEST_SPLIT)

# The Kaggle "mnist-png" layout: ROOT/<part>/<digit>/<n>.png
TRAINING_DIR = "training"  # source of the train and eval splits
TESTING_DIR = "testing"  # source of the held-out test split
SOURCE_DIRS = (TRAINING_DIR, TESTING_DIR)

# People's corrections from the web app (web/feedback.py): proposals wait in pending/<digit>/ until a
# reviewer accepts them into training/<digit>/ (an mnist-png tree) or rejects them into rejected/<digit>/;
# two append-only logs at the root record each correction and each review. `digits data build
# --extra-source` adds the accepted (training/) digits to the train split and only counts the others.
FEEDBACK_LOG = "feedback.jsonl"
REVIEW_LOG = "reviews.jsonl"
FEEDBACK_LOCK = ".lock"  # held by every change to the tree (the web app and a reviewer at once)
REVIEW_ACCEPTED, REVIEW_REJECTED = "accepted", "rejected"  # a review's verdict in REVIEW_LOG
PENDING_DIR = "pending"
REJECTED_DIR = "rejected"
ACCEPTED_DIR = TRAINING_DIR
# Tally sheets waiting for a person, and those reviewed (web/sheet_queue.py), inside the feedback tree: the
# builder never reads it; the digits a person confirms on a sheet reach training/ through the review log.
SHEETS_DIR = "sheets"

# The exported model's signatures: the contract between the Trainer, TF Serving, `digits serve` and clients.
SERVING_SIGNATURE = "serving_default"  # encoded images in
EXAMPLES_SIGNATURE = "serving_examples"  # serialized tf.train.Example in (TFMA, batch scoring)
NORMALIZED_SIGNATURE = "normalized_image"  # encoded images in; also returns what the model saw
IMAGE_BYTES_INPUT = "image_bytes"
EXAMPLES_INPUT = "examples"
PROBABILITIES_OUTPUT = "probabilities"  # float [N, NUM_CLASSES]
PREDICTED_CLASS_OUTPUT = "predicted_class"  # int64 [N]
# float [N]: share of the normalised 28x28 image that is ink; 0.0 means no ink was found (a blank
# canvas, a uniform photo) and the prediction is then the model's guess on an empty image.
INK_FRACTION_OUTPUT = "ink_fraction"
# Knowing when not to answer (components/abstention.py), in every signature: float [N], the energy
# score of the logits (large: not a digit); float [N], the temperature-calibrated top-class probability;
# int64 [N], DECISIONS' code; bool [N], decision == accepted.
OOD_SCORE_OUTPUT = "ood_score"
CONFIDENCE_OUTPUT = "confidence"
DECISION_OUTPUT = "decision"
ACCEPTED_OUTPUT = "accepted"
# The decision codes, the same in the graph, the clients, the metrics and the feedback log.
DECISIONS = ("accepted", "unsure", "not_a_digit")
NORMALIZED_IMAGE_OUTPUT = "normalized_image"  # float [N, 28, 28] in [0, 1], ink light (NORMALIZED_SIGNATURE only)
# The largest encoded image `digits serve` takes in one instance (its --max-image-bytes default); the
# web app reduces larger photos to fit, so one phone photo is never refused for its size alone.
MAX_SERVED_IMAGE_BYTES = 1024 * 1024
# The longest side the web app sends: far more than the 28x28 the model reads.
MAX_SENT_IMAGE_SIDE = 1024

# Beside each exported version; TF Serving reads only its warmup file there and ignores the rest.
ASSETS_EXTRA_DIR = "assets.extra"

# The accuracy metric's name, the same in Keras' training history ("val_" + it for the eval split),
# in TFMA's results (the blessing gate) and in the run report.
ACCURACY_METRIC = "sparse_categorical_accuracy"
# TFMA's selective-prediction metrics at the exported operating point (pipeline/selective_metrics.py):
# the share of test digits accepted, and the error among them; gated and in the run report.
COVERAGE_METRIC = "coverage"
SELECTIVE_ERROR_METRIC = "selective_error"


def transformed_name(key: str) -> str:
    """Name of a feature after Transform, so raw and transformed keys never collide."""
    return f"{key}_xf"
