"""Transform's preprocessing: the one place image preprocessing is written.

Any encoded image (PNG or JPEG, gray, colour or with transparency, any size, dark ink on
light paper or light on dark) is made to look like an MNIST digit, the way MNIST itself was
made, then sized and scaled for InceptionV3:

1. transparency flattened onto a background that contrasts with the ink, then grayscale;
2. polarity: if the border is lighter than the image as a whole, inverted (ink is light);
3. background suppressed: the border's bright end is taken as the paper's level and the
   range from it to the ink's typical level stretched to [0, 1], so paper texture, shadows and
   JPEG noise are not ink and faint or low-contrast strokes are full strength;
4. cropped to the ink's bounding box, its longer side scaled to 20 pixels (aspect kept) and
   placed in 28x28 with its centre of mass at the centre;
5. resized to 75x75x3, InceptionV3's minimum, and scaled to [-1, 1].

An image with no ink (contrast below MIN_CONTRAST) becomes an all-black 28x28 with an ink
fraction of 0, which the serving signatures return so that clients can tell. The Transform graph
is embedded in the exported model, so serving runs exactly this code too; it uses core
TensorFlow ops only, which TF Serving's stock binary has.
"""

from __future__ import annotations

import tensorflow as tf

from data import contract

IMAGE_XF = contract.transformed_name(contract.IMAGE_KEY)
LABEL_XF = contract.transformed_name(contract.LABEL_KEY)
NORMALIZED_XF = contract.transformed_name(contract.NORMALIZED_IMAGE_OUTPUT)
INK_FRACTION_XF = contract.transformed_name(contract.INK_FRACTION_OUTPUT)

# Below this difference between the ink's peak and the background (on a 0..1 scale) there is no ink.
MIN_CONTRAST = 0.1
# After the background is suppressed, pixels above this are ink for the bounding box and ink fraction;
# fainter ones (anti-aliased edges, leftover noise) are kept inside the box but do not extend it.
INK_THRESHOLD = 0.2
# The background's level: this quantile of the border pixels (robust to ink touching the border).
BACKGROUND_QUANTILE = 0.95
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as tf.image.rgb_to_grayscale


def _quantile(values: tf.Tensor, q: float) -> tf.Tensor:
    """The q-quantile of a 1-D float tensor (nearest rank), with core ops only."""
    ordered = tf.sort(values)
    count = tf.shape(ordered)[0]
    index = tf.cast(tf.round(q * tf.cast(count - 1, tf.float32)), tf.int32)
    return ordered[index]


def _border(image: tf.Tensor) -> tf.Tensor:
    """The outermost rows and columns of a 2-D image, as one vector."""
    return tf.concat([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)


def _flat_gray(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, C] with C in 1..4 -> float32 [H, W] in [0, 1]: transparency flattened, grayscale.

    Transparent pixels become background whatever their RGB holds (an HTML canvas exports
    transparent black): the image is composited over white if its visible pixels are dark on
    average, over black if they are light, so the ink always contrasts with what replaces nothing.
    """
    image = tf.cast(image, tf.float32) / 255.0
    channels = tf.shape(image)[-1]
    has_alpha = tf.equal(channels % 2, 0)  # gray+alpha (2) or RGBA (4)
    colour_channels = channels - tf.cast(has_alpha, tf.int32)
    colour = image[..., :colour_channels]
    gray = tf.cond(tf.equal(colour_channels, 3),
                   lambda: tf.tensordot(colour, tf.constant(_LUMA), axes=[[2], [0]]),
                   lambda: colour[..., 0])
    alpha = tf.cond(has_alpha, lambda: image[..., -1], lambda: tf.ones_like(gray))
    visible_mean = tf.math.divide_no_nan(tf.reduce_sum(gray * alpha), tf.reduce_sum(alpha))
    behind = tf.where(visible_mean < 0.5, 1.0, 0.0)
    return gray * alpha + behind * (1.0 - alpha)


def _place_centred(patch: tf.Tensor) -> tf.Tensor:
    """[h, w] (h, w <= 20) -> [28, 28] with the patch's centre of mass at the centre, as MNIST."""
    size = contract.NORMALIZED_IMAGE_SIZE
    height, width = tf.shape(patch)[0], tf.shape(patch)[1]
    mass = tf.reduce_sum(patch)
    rows = tf.cast(tf.range(height), tf.float32) + 0.5
    cols = tf.cast(tf.range(width), tf.float32) + 0.5
    centre_row = tf.math.divide_no_nan(tf.reduce_sum(patch * rows[:, None]), mass)
    centre_col = tf.math.divide_no_nan(tf.reduce_sum(patch * cols[None, :]), mass)
    # Place on a canvas with a margin of one box on each side, so any offset fits, then cut out the middle.
    margin = contract.INK_BOX_SIZE
    top = tf.cast(tf.round(size / 2 - centre_row), tf.int32) + margin
    left = tf.cast(tf.round(size / 2 - centre_col), tf.int32) + margin
    canvas = tf.pad(patch, [[top, size + 2 * margin - top - height], [left, size + 2 * margin - left - width]])
    return canvas[margin:margin + size, margin:margin + size]


def normalize_image(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """One encoded image -> (float32 [28, 28] in [0, 1], light ink on black; ink fraction, a scalar).

    Bytes that are not an image raise INVALID_ARGUMENT from the decoder.
    """
    size = contract.NORMALIZED_IMAGE_SIZE
    # decode_image handles PNG, JPEG, GIF and BMP; channels=0 keeps what the file has (alpha included).
    image = tf.io.decode_image(image_bytes, channels=0, expand_animations=False)
    gray = _flat_gray(tf.ensure_shape(image, [None, None, None]))

    border = _border(gray)
    gray = tf.cond(tf.reduce_mean(border) > tf.reduce_mean(gray), lambda: 1.0 - gray, lambda: gray)

    background = _quantile(_border(gray), BACKGROUND_QUANTILE)
    brightest = tf.reduce_max(gray)
    has_ink = brightest - background >= MIN_CONTRAST
    # The ink's own level: the median of the pixels clearly brighter than the background (a stroke's
    # core), so faint strokes and unevenly lit photos are stretched to full strength, not to one speck.
    strong = tf.boolean_mask(gray, gray >= (background + brightest) / 2)
    peak = tf.maximum(_quantile(strong, 0.5), background + MIN_CONTRAST)
    ink = tf.clip_by_value(tf.math.divide_no_nan(gray - background, peak - background), 0.0, 1.0)
    ink = tf.where(has_ink, ink, tf.zeros_like(ink))

    def crop_and_centre() -> tf.Tensor:
        rows = tf.where(tf.reduce_any(ink > INK_THRESHOLD, axis=1))[:, 0]
        cols = tf.where(tf.reduce_any(ink > INK_THRESHOLD, axis=0))[:, 0]
        top, bottom = tf.cast(rows[0], tf.int32), tf.cast(rows[-1], tf.int32) + 1
        left, right = tf.cast(cols[0], tf.int32), tf.cast(cols[-1], tf.int32) + 1
        box = ink[top:bottom, left:right]
        height, width = tf.cast(bottom - top, tf.float32), tf.cast(right - left, tf.float32)
        scale = contract.INK_BOX_SIZE / tf.maximum(height, width)
        new_size = tf.maximum(1, tf.cast(tf.round(tf.stack([height, width]) * scale), tf.int32))
        scaled = tf.image.resize(box[..., None], new_size, method="bilinear", antialias=True)[..., 0]
        return _place_centred(tf.clip_by_value(scaled, 0.0, 1.0))

    # With ink, the brightest pixel stretches to 1, above the threshold: the box is never empty.
    normalized = tf.cond(has_ink, crop_and_centre, lambda: tf.zeros([size, size]))
    normalized = tf.ensure_shape(normalized, [size, size])
    return normalized, tf.reduce_mean(tf.cast(normalized > INK_THRESHOLD, tf.float32))


def to_model_input(normalized: tf.Tensor) -> tf.Tensor:
    """[N, 28, 28] in [0, 1] -> [N, 75, 75, 3] in [-1, 1], InceptionV3's minimum size and range."""
    size = contract.IMAGE_SIZE
    low, high = contract.VALUE_RANGE
    images = tf.image.resize(normalized[..., None], [size, size], method="bilinear", antialias=True)
    images = tf.image.grayscale_to_rgb(images)
    return tf.clip_by_value(images * (high - low) + low, low, high)  # bilinear resizing can overshoot by a hair


def normalize_batch(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of encoded images [N] (string) -> (normalised [N, 28, 28], ink fraction [N])."""
    size = contract.NORMALIZED_IMAGE_SIZE
    return tf.map_fn(normalize_image, encoded, fn_output_signature=(
        tf.TensorSpec([size, size], tf.float32), tf.TensorSpec([], tf.float32)))


def preprocess(encoded: tf.Tensor) -> tf.Tensor:
    """A batch of encoded images [N] (string) -> the model's input [N, 75, 75, 3] in [-1, 1]."""
    return to_model_input(normalize_batch(encoded)[0])


def preprocessing_fn(inputs: dict) -> dict:
    """tf.Transform entry point: raw {image [N, 1] bytes, label [N, 1] int64} -> model features.

    Besides the model's input: the normalised 28x28 image and its ink fraction, which the
    serving signatures return (TFT prunes what a caller does not ask for).
    """
    # At serving time only `image` is fed; TFT then prunes the label output.
    normalized, ink_fraction = normalize_batch(tf.reshape(inputs[contract.IMAGE_KEY], [-1]))
    return {
        IMAGE_XF: to_model_input(normalized),
        NORMALIZED_XF: normalized,
        INK_FRACTION_XF: ink_fraction,
        LABEL_XF: tf.reshape(inputs[contract.LABEL_KEY], [-1]),
    }
