"""The Trainer's input pipeline: raw examples -> Transform graph -> (augmented) batches.

Transform does not materialise its output (75x75x3 floats are ~67 KB per digit),
so the Trainer reads the raw TFRecords and applies the Transform graph here,
the same graph that serving applies.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft
from tfx_bsl.public import tfxio

from components.augment import augment_batch, augment_ink, elastic_distortion
from components.config import TrainerConfig
from components.transform import IMAGE_XF, LABEL_XF, NORMALIZED_XF, to_model_input
from data import contract


# The label of a non-digit in training batches (outlier exposure): one past the digits, never a class
# the model outputs; the loss teaches it a uniform answer there (components/model.py).
OUTLIER_LABEL = contract.NUM_CLASSES


def make_dataset(
    file_pattern: list[str],
    data_accessor,
    tf_transform_output: tft.TFTransformOutput,
    config: TrainerConfig,
    training: bool,
    outliers: list[bytes] | None = None,
) -> tf.data.Dataset:
    """Batches of ({image_xf: [N, 75, 75, 3]}, label [N]); shuffled, repeated and augmented if training.

    With `outliers` (encoded non-digit images, data/nondigits.py) and training, each batch also holds
    `outlier_share` x batch_size of them, labelled OUTLIER_LABEL, through the same Transform graph and
    augmentation as the digits.
    """
    dataset = data_accessor.tf_dataset_factory(
        file_pattern,
        tfxio.TensorFlowDatasetOptions(
            batch_size=config.batch_size,
            shuffle=training,
            shuffle_seed=config.seed if training else None,
            shuffle_buffer_size=config.shuffle_buffer,
            num_epochs=None if training else 1,
        ),
        tf_transform_output.raw_metadata.schema,
    )
    transform_layer = tf_transform_output.transform_features_layer()

    def model_input(transformed: dict) -> tf.Tensor:
        if not training:
            return transformed[IMAGE_XF]
        # Other hands, pens and sharpness on the normalised 28x28 digit, then the model's input from it
        # (the same function Transform uses), then shifts, rotations and scalings.
        normalized = elastic_distortion(transformed[NORMALIZED_XF], config.elastic_alpha)
        normalized = augment_ink(normalized, config.stroke_probability, config.blur_probability)
        return augment_batch(to_model_input(normalized), config.max_translation, config.max_rotation_degrees,
                             config.max_scale_change)

    def transform(raw: dict) -> tuple[dict, tf.Tensor]:
        transformed = transform_layer({contract.IMAGE_KEY: raw[contract.IMAGE_KEY],
                                       contract.LABEL_KEY: raw[contract.LABEL_KEY]})
        return {IMAGE_XF: model_input(transformed)}, transformed[LABEL_XF]

    dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    per_batch = outliers_per_batch(config)
    if training and outliers and per_batch:
        pool = tf.data.Dataset.from_tensor_slices(tf.constant(outliers)).repeat()
        pool = pool.shuffle(len(outliers), seed=config.seed).batch(per_batch, drop_remainder=True)

        def transform_outliers(encoded: tf.Tensor) -> tuple[dict, tf.Tensor]:
            transformed = transform_layer({contract.IMAGE_KEY: tf.reshape(encoded, [-1, 1])})
            return ({IMAGE_XF: model_input(transformed)},
                    tf.fill([tf.shape(encoded)[0]], tf.constant(OUTLIER_LABEL, tf.int64)))

        def join(digits: tuple, others: tuple) -> tuple[dict, tf.Tensor]:
            return ({IMAGE_XF: tf.concat([digits[0][IMAGE_XF], others[0][IMAGE_XF]], axis=0)},
                    tf.concat([tf.cast(tf.reshape(digits[1], [-1]), tf.int64), others[1]], axis=0))

        dataset = tf.data.Dataset.zip((dataset, pool.map(transform_outliers, num_parallel_calls=tf.data.AUTOTUNE)))
        dataset = dataset.map(join, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def outliers_per_batch(config: TrainerConfig) -> int:
    return int(round(config.batch_size * config.outlier_share))


# Non-digits generated for one training run: enough that an image recurs about once every 6 epochs at
# the default share (8 per batch x 57 steps x 20 epochs / 3,000), drawn in about a second.
OUTLIER_POOL = 3000
PAIR_DIGITS = 1000  # train digits the pairs and overlays are made of


def outlier_pool(train_files: list[str], config: TrainerConfig) -> list[bytes]:
    """Encoded non-digits of the training kinds (data/nondigits.py), seeded by `config.seed`; pairs and
    overlays of digits from the train split only. Empty when the config trains without them."""
    import numpy as np

    from data import nondigits
    from data.sample import encode_png

    if not outliers_per_batch(config):
        return []
    files = sorted(path for pattern in train_files for path in tf.io.gfile.glob(pattern))
    spec = {contract.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
    digits = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP").take(PAIR_DIGITS):
        encoded = tf.io.parse_single_example(record, spec)[contract.IMAGE_KEY]
        image = tf.image.decode_image(encoded, channels=1, expand_animations=False)
        if image.shape[0] == contract.SOURCE_IMAGE_SIZE and image.shape[1] == contract.SOURCE_IMAGE_SIZE:
            digits.append(image.numpy()[..., 0])
    per_kind = OUTLIER_POOL // len(nondigits.TRAINING_KINDS)
    kinds = [kind for kind in nondigits.TRAINING_KINDS if kind not in nondigits.DIGIT_KINDS or len(digits) >= 2]
    corpus = nondigits.corpus(per_kind, config.seed, np.stack(digits) if digits else None, tuple(kinds))
    return [encode_png(image) for images in corpus.values() for image in images]
