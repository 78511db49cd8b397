"""Training-only augmentation for digits: small random shifts and rotations, never flips.

A mirrored 2 or 7 is not a digit any more. Only the training input pipeline calls
this; eval, TFMA and serving never do.
"""

from __future__ import annotations

import math

import tensorflow as tf

from data import contract


def augment_batch(images: tf.Tensor, max_translation: int, max_rotation_degrees: float) -> tf.Tensor:
    """images [N, 75, 75, 3] in [-1, 1] -> same shape, each image rotated and shifted at random."""
    if max_rotation_degrees > 0:
        images = _rotate(images, max_rotation_degrees)
    if max_translation > 0:
        images = tf.map_fn(lambda image: _shift(image, max_translation), images)
    return images


def _shift(image: tf.Tensor, max_translation: int) -> tf.Tensor:
    """Pad, then crop back at a random offset. Per image: random_crop on a batch uses one offset."""
    size = contract.IMAGE_SIZE
    background = contract.VALUE_RANGE[0]
    # Pads with zeros, so move the background (-1, black) to zero first.
    padded = tf.image.resize_with_crop_or_pad(image - background, size + 2 * max_translation,
                                              size + 2 * max_translation)
    return tf.image.random_crop(padded, [size, size, contract.IMAGE_CHANNELS]) + background


def _rotate(images: tf.Tensor, max_degrees: float) -> tf.Tensor:
    """Rotates each image about its centre by a uniform random angle in [-max, max] degrees."""
    count = tf.shape(images)[0]
    size = float(contract.IMAGE_SIZE - 1)
    angles = tf.random.uniform([count], -max_degrees, max_degrees) * (math.pi / 180.0)
    cos, sin = tf.cos(angles), tf.sin(angles)
    # Output pixel (x, y) samples input (cos*x - sin*y + dx, sin*x + cos*y + dy): rotation about the centre.
    dx = (size - (cos * size - sin * size)) / 2.0
    dy = (size - (sin * size + cos * size)) / 2.0
    zeros = tf.zeros_like(angles)
    transforms = tf.stack([cos, -sin, dx, sin, cos, dy, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=[contract.IMAGE_SIZE, contract.IMAGE_SIZE],
        fill_value=contract.VALUE_RANGE[0], interpolation="BILINEAR", fill_mode="CONSTANT",
    )
