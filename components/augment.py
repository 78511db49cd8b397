"""Training-only augmentation for digits: stroke width, blur, small shifts and rotations, never flips.

A mirrored 2 or 7 is not a digit any more. Transform's normalisation already undoes polarity,
contrast, size and position, so what is left for augmentation is what it cannot undo: marker or
fine-pen strokes, the blur of an upscaled small drawing, and the slant of a hand. Only the
training input pipeline calls this; eval, TFMA and serving never do.
"""

from __future__ import annotations

import math

import tensorflow as tf

from data import contract


def augment_batch(images: tf.Tensor, max_translation: int, max_rotation_degrees: float,
                  stroke_probability: float = 0.0, blur_probability: float = 0.0) -> tf.Tensor:
    """images [N, 75, 75, 3] in [-1, 1] -> same shape, each image changed at random.

    With `stroke_probability` an image's strokes are made thicker or thinner (half each), with
    `blur_probability` it is blurred; then it is rotated and shifted.
    """
    if stroke_probability > 0:
        images = _stroke_width(images, stroke_probability)
    if blur_probability > 0:
        images = _blur(images, blur_probability)
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


def _pick(images: tf.Tensor, choices: list[tf.Tensor], weights: list[float]) -> tf.Tensor:
    """Per image, one of `choices` (same shape as images), drawn with the given probabilities."""
    count = tf.shape(images)[0]
    index = tf.random.categorical(tf.math.log([weights]), count)[0]
    stacked = tf.stack(choices, axis=0)  # [choices, N, ...]
    return tf.gather(tf.transpose(stacked, [1, 0, 2, 3, 4]), index[:, None], batch_dims=1)[:, 0]


def _stroke_width(images: tf.Tensor, probability: float) -> tf.Tensor:
    """Dilates (thicker ink: marker) or erodes (thinner ink: fine pen), half each."""
    # Ink is light: dilation is a max filter, erosion a min filter. At 75x75, a 5x5 or 7x7 window widens
    # each side of a stroke by ~0.7 or ~1.1 px of the 28x28 digit; 3x3 narrows it by ~0.4 px.
    thicker = tf.nn.max_pool2d(images, ksize=5, strides=1, padding="SAME")
    thickest = tf.nn.max_pool2d(images, ksize=7, strides=1, padding="SAME")
    thinner = -tf.nn.max_pool2d(-images, ksize=3, strides=1, padding="SAME")
    return _pick(images, [images, thicker, thickest, thinner],
                 [1 - probability, probability / 4, probability / 4, probability / 2])


def _gaussian(images: tf.Tensor, sigma: float) -> tf.Tensor:
    """A separable Gaussian blur of each channel (plain conv2d on [N*C, H, W, 1])."""
    radius = int(3 * sigma + 0.5)
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-(taps ** 2) / (2 * sigma ** 2))
    kernel /= tf.reduce_sum(kernel)
    background = contract.VALUE_RANGE[0]
    shape = tf.shape(images)
    # One channel per image, with the background moved to zero: zero padding then neither darkens nor
    # lightens the border.
    planes = tf.reshape(tf.transpose(images - background, [0, 3, 1, 2]), [-1, shape[1], shape[2], 1])
    planes = tf.nn.conv2d(planes, tf.reshape(kernel, [-1, 1, 1, 1]), strides=1, padding="SAME")
    planes = tf.nn.conv2d(planes, tf.reshape(kernel, [1, -1, 1, 1]), strides=1, padding="SAME")
    blurred = tf.transpose(tf.reshape(planes, [shape[0], shape[3], shape[1], shape[2]]), [0, 2, 3, 1])
    return blurred + background


def _blur(images: tf.Tensor, probability: float) -> tf.Tensor:
    """A Gaussian blur of sigma 1.5 or 2.5 px at 75x75 (half each): a small drawing scaled up, a soft photo."""
    return _pick(images, [images, _gaussian(images, 1.5), _gaussian(images, 2.5)],
                 [1 - probability, probability / 2, probability / 2])
