"""Training-only augmentation for digits: stroke width, blur, small shifts, rotations and scalings, never flips.

A mirrored 2 or 7 is not a digit any more. Transform's normalisation already undoes polarity,
contrast, size and position, so what is left for augmentation is what it cannot undo: marker or
fine-pen strokes, the blur of an upscaled small drawing, and the slant of a hand. Only the
training input pipeline calls this; eval, TFMA and serving never do.
"""

from __future__ import annotations

import math

import tensorflow as tf

from data import contract


def augment_ink(normalized: tf.Tensor, stroke_probability: float, blur_probability: float) -> tf.Tensor:
    """Normalised digits [N, 28, 28] in [0, 1] -> same shape, with other pens and other sharpness.

    With `stroke_probability` an image's strokes are made thicker or thinner (half each), with
    `blur_probability` it is blurred. Done on the 28x28 digit, before it is resized for the model:
    stroke widths are then in MNIST's own pixels, and it costs a fraction of doing it at 75x75.
    """
    if stroke_probability > 0:
        normalized = _stroke_width(normalized, stroke_probability)
    if blur_probability > 0:
        normalized = _blur(normalized, blur_probability)
    return normalized


def augment_batch(images: tf.Tensor, max_translation: int, max_rotation_degrees: float,
                  max_scale_change: float = 0.0) -> tf.Tensor:
    """images [N, 75, 75, 3] in [-1, 1] -> same shape, each image rotated, scaled and shifted at random.

    One projective transform per image does all three (a uniform angle in [-max, max] degrees and a
    uniform scale in [1 - max, 1 + max] about the centre, then a whole-pixel shift in [-max, max]
    each way), for the whole batch in one op.
    """
    if max_rotation_degrees <= 0 and max_translation <= 0 and max_scale_change <= 0:
        return images
    count = tf.shape(images)[0]
    size = float(contract.IMAGE_SIZE - 1)
    angles = tf.random.uniform([count], -max_rotation_degrees, max_rotation_degrees) * (math.pi / 180.0)
    scales = (tf.random.uniform([count], 1.0 - max_scale_change, 1.0 + max_scale_change) if max_scale_change > 0
              else tf.ones([count]))
    shifts = tf.cast(tf.random.uniform([2, count], -max_translation, max_translation + 1, dtype=tf.int32),
                     tf.float32)
    cos, sin = tf.cos(angles) / scales, tf.sin(angles) / scales
    # Output pixel (x, y) samples input (cos*x - sin*y + dx, sin*x + cos*y + dy): rotation and scaling
    # about the centre (sampling 1/scale apart enlarges by scale), and the shift moves where it samples from.
    dx = (size - (cos * size - sin * size)) / 2.0 - shifts[0]
    dy = (size - (sin * size + cos * size)) / 2.0 - shifts[1]
    zeros = tf.zeros_like(angles)
    transforms = tf.stack([cos, -sin, dx, sin, cos, dy, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=[contract.IMAGE_SIZE, contract.IMAGE_SIZE],
        fill_value=contract.VALUE_RANGE[0], interpolation="BILINEAR", fill_mode="CONSTANT",
    )


def _pick(images: tf.Tensor, choices: list[tf.Tensor], weights: list[float]) -> tf.Tensor:
    """Per image, one of `choices` (each shaped like images), drawn with the given probabilities."""
    index = tf.random.categorical(tf.math.log([weights]), tf.shape(images)[0])[0]
    stacked = tf.stack(choices, axis=1)  # [N, choices, ...]
    return tf.gather(stacked, index[:, None], batch_dims=1)[:, 0]


def _stroke_width(images: tf.Tensor, probability: float) -> tf.Tensor:
    """Dilates (thicker ink: a marker) or erodes (thinner ink: a fine pen), half each.

    At twice the size, so that a stroke can grow by half a pixel: a 3x3 or 5x5 max filter there
    widens each side of a stroke by 0.5 or 1 pixel of the 28x28 digit, a 3x3 min filter narrows
    it by 0.5 (eroding at 28x28 would erase MNIST's 2-3 pixel strokes).
    """
    size = contract.NORMALIZED_IMAGE_SIZE
    big = tf.image.resize(images[..., None], [2 * size, 2 * size], method="bilinear")

    def back(image: tf.Tensor) -> tf.Tensor:
        return tf.image.resize(image, [size, size], method="area")[..., 0]

    thicker = back(tf.nn.max_pool2d(big, ksize=3, strides=1, padding="SAME"))
    thickest = back(tf.nn.max_pool2d(big, ksize=5, strides=1, padding="SAME"))
    thinner = back(-tf.nn.max_pool2d(-big, ksize=3, strides=1, padding="SAME"))
    return _pick(images, [images, thicker, thickest, thinner],
                 [1 - probability, probability / 4, probability / 4, probability / 2])


def _gaussian(images: tf.Tensor, sigma: float) -> tf.Tensor:
    """A separable Gaussian blur of [N, H, W] images (plain conv2d; the background is 0, as is the padding)."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-(taps ** 2) / (2 * sigma ** 2))
    kernel /= tf.reduce_sum(kernel)
    planes = tf.nn.conv2d(images[..., None], tf.reshape(kernel, [-1, 1, 1, 1]), strides=1, padding="SAME")
    planes = tf.nn.conv2d(planes, tf.reshape(kernel, [1, -1, 1, 1]), strides=1, padding="SAME")
    return planes[..., 0]


def _blur(images: tf.Tensor, probability: float) -> tf.Tensor:
    """A Gaussian blur of sigma 0.6 or 1 pixel (half each): a small drawing scaled up, a soft photo."""
    return _pick(images, [images, _gaussian(images, 0.6), _gaussian(images, 1.0)],
                 [1 - probability, probability / 2, probability / 2])
