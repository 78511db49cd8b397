"""Transform's preprocessing: the one place image preprocessing is written.

Decode (PNG or JPEG, gray or colour, any size), make it 3-channel, resize to
InceptionV3's 75x75 minimum and scale to its [-1, 1] range. The Transform graph
is embedded in the exported model, so serving runs exactly this code too.
"""

from __future__ import annotations

import tensorflow as tf

from data import contract

IMAGE_XF = contract.transformed_name(contract.IMAGE_KEY)
LABEL_XF = contract.transformed_name(contract.LABEL_KEY)


def decode_and_scale(encoded: tf.Tensor) -> tf.Tensor:
    """A batch of encoded images [N] (string) -> float32 [N, 75, 75, 3] in [-1, 1].

    Bytes that are not an image raise INVALID_ARGUMENT from the decoder.
    """
    size = contract.IMAGE_SIZE
    low, high = contract.VALUE_RANGE

    def one(image_bytes: tf.Tensor) -> tf.Tensor:
        # decode_image handles PNG, JPEG, GIF and BMP; expand_animations=False keeps it 3-D.
        image = tf.io.decode_image(image_bytes, channels=contract.IMAGE_CHANNELS, expand_animations=False)
        image = tf.ensure_shape(image, [None, None, contract.IMAGE_CHANNELS])
        image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear", antialias=True)
        return image / 255.0 * (high - low) + low

    images = tf.map_fn(
        one, encoded, fn_output_signature=tf.TensorSpec([size, size, contract.IMAGE_CHANNELS], tf.float32)
    )
    return tf.clip_by_value(images, low, high)  # bilinear resizing can overshoot by a hair


def preprocessing_fn(inputs: dict) -> dict:
    """tf.Transform entry point: raw {image [N, 1] bytes, label [N, 1] int64} -> model features."""
    # At serving time only `image` is fed; TFT then prunes the label output.
    return {
        IMAGE_XF: decode_and_scale(tf.reshape(inputs[contract.IMAGE_KEY], [-1])),
        LABEL_XF: tf.reshape(inputs[contract.LABEL_KEY], [-1]),
    }
