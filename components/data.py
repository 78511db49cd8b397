"""The Trainer's input pipeline: raw examples -> Transform graph -> (augmented) batches.

Transform does not materialise its output (75x75x3 floats are ~67 KB per digit),
so the Trainer reads the raw TFRecords and applies the Transform graph here,
the same graph that serving applies.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft
from tfx_bsl.public import tfxio

from components.augment import augment_batch, augment_ink
from components.config import TrainerConfig
from components.transform import IMAGE_XF, LABEL_XF, NORMALIZED_XF, to_model_input
from data import contract


def make_dataset(
    file_pattern: list[str],
    data_accessor,
    tf_transform_output: tft.TFTransformOutput,
    config: TrainerConfig,
    training: bool,
) -> tf.data.Dataset:
    """Batches of ({image_xf: [N, 75, 75, 3]}, label [N]); shuffled, repeated and augmented if training."""
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

    def transform(raw: dict) -> tuple[dict, tf.Tensor]:
        transformed = transform_layer({contract.IMAGE_KEY: raw[contract.IMAGE_KEY],
                                       contract.LABEL_KEY: raw[contract.LABEL_KEY]})
        if training:
            # Other pens and sharpness on the normalised 28x28 digit, then the model's input from it
            # (the same function Transform uses), then shifts and rotations.
            normalized = augment_ink(transformed[NORMALIZED_XF], config.stroke_probability, config.blur_probability)
            images = augment_batch(to_model_input(normalized), config.max_translation, config.max_rotation_degrees)
        else:
            images = transformed[IMAGE_XF]
        return {IMAGE_XF: images}, transformed[LABEL_XF]

    return dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
