"""Training-only augmentation for digits: elastic distortion, stroke width, blur, small shifts, rotations and
scalings, never flips.

A mirrored 2 or 7 is not a digit any more. Transform's normalisation already undoes polarity,
contrast, size and position, so what is left for augmentation is what it cannot undo: marker or
fine-pen strokes, the blur of an upscaled small drawing, and the slant of a hand. Only the
training input pipeline calls this; eval, TFMA and serving never do.
"""

from __future__ import annotations

import math

import tensorflow as tf

from data import contract


# Elastic distortion (Simard, Steinkraus and Platt, 2003, "Best practices for convolutional neural networks
# applied to visual document analysis"): each pixel moves by a random field smoothed by a Gaussian of this
# many pixels of the 28x28 digit. The paper's sigma; its alpha (the field's scale) of 34 moves a pixel by
# about 1.4 pixels (standard deviation), bending strokes as different hands do.
ELASTIC_SIGMA = 4.0


def elastic_distortion(normalized: tf.Tensor, alpha: float) -> tf.Tensor:
    """Normalised digits [N, 28, 28] in [0, 1] -> same shape, each bent by its own smooth random field.

    Two fields per image (rows, columns) of uniform noise in [-1, 1], blurred by ELASTIC_SIGMA and scaled
    by `alpha`, say where each output pixel samples the input (bilinear; 0, the background, outside).
    0 is the identity.
    """
    if alpha <= 0:
        return normalized
    shape = tf.shape(normalized)
    count, height, width = shape[0], shape[1], shape[2]
    fields = _gaussian(tf.random.uniform(tf.stack([2 * count, height, width]), -1.0, 1.0), ELASTIC_SIGMA) * alpha
    rows = tf.cast(tf.range(height), tf.float32)[None, :, None] + fields[:count]
    columns = tf.cast(tf.range(width), tf.float32)[None, None, :] + fields[count:]
    return _sample(normalized, rows, columns)


def _sample(images: tf.Tensor, rows: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """images [N, H, W] read bilinearly at fractional (rows, columns) [N, H, W]; 0 outside the image."""
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1]])  # a zero border, where every outside point is clipped to
    last_row, last_column = tf.shape(padded)[1] - 1, tf.shape(padded)[2] - 1
    rows, columns = rows + 1.0, columns + 1.0
    top, left = tf.floor(rows), tf.floor(columns)
    down, right = rows - top, columns - left

    def at(row: tf.Tensor, column: tf.Tensor) -> tf.Tensor:
        row = tf.clip_by_value(tf.cast(row, tf.int32), 0, last_row)
        column = tf.clip_by_value(tf.cast(column, tf.int32), 0, last_column)
        return tf.gather_nd(padded, tf.stack([row, column], axis=-1), batch_dims=1)

    upper = at(top, left) * (1.0 - right) + at(top, left + 1.0) * right
    lower = at(top + 1.0, left) * (1.0 - right) + at(top + 1.0, left + 1.0) * right
    return upper * (1.0 - down) + lower * down


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
