"""The exported model's signatures: the contract with TF Serving, TFMA and batch scoring.

- `serving_default`: `image_bytes`, a batch of encoded images (PNG or JPEG, any
  size, gray, colour or transparent) -> `probabilities` [N, 10], `predicted_class` [N],
  `ink_fraction` [N] (0.0: no ink found, the prediction is a guess on an empty image), and
  whether to answer at all (components/abstention.py): `ood_score` [N], `confidence` [N]
  (calibrated), `decision` [N] (0 accepted, 1 unsure, 2 not a digit) and `accepted` [N].
  TF Serving's REST `{"instances": [{"b64": "..."}]}` feeds it unchanged.
- `normalized_image`: the same input and outputs plus `normalized_image` [N, 28, 28], the
  image the model classified (after Transform's normalisation, before resizing), for pages
  and debugging tools; a separate signature so that ordinary responses stay small.
- `serving_examples`: `examples`, serialized tf.train.Example (label optional) ->
  the outputs of `serving_default`; TFMA evaluates through it.
All apply the Transform graph, so serving preprocesses exactly as training did.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft

from components import abstention
from components.model import feature_model, logits
from components.transform import IMAGE_XF, INK_FRACTION_XF, NORMALIZED_XF
from data import contract
from data.contract import (
    EXAMPLES_INPUT,
    EXAMPLES_SIGNATURE,
    IMAGE_BYTES_INPUT,
    INK_FRACTION_OUTPUT,
    NORMALIZED_IMAGE_OUTPUT,
    NORMALIZED_SIGNATURE,
    PREDICTED_CLASS_OUTPUT,
    PROBABILITIES_OUTPUT,
    SERVING_SIGNATURE,
)


def make_signatures(model, tf_transform_output: tft.TFTransformOutput, fitted: abstention.Abstention) -> dict:
    model.tft_layer = tf_transform_output.transform_features_layer()  # tracked, so it is saved with the model
    features_and_probabilities = feature_model(model)
    raw_spec = tf_transform_output.raw_feature_spec()
    raw_spec.pop(contract.LABEL_KEY)

    def predict(raw_images: tf.Tensor, with_image: bool = False) -> dict:
        transformed = model.tft_layer({contract.IMAGE_KEY: tf.reshape(raw_images, [-1, 1])})
        features, probabilities = features_and_probabilities({IMAGE_XF: transformed[IMAGE_XF]}, training=False)
        outputs = {
            PROBABILITIES_OUTPUT: probabilities,
            PREDICTED_CLASS_OUTPUT: tf.argmax(probabilities, axis=-1),
            INK_FRACTION_OUTPUT: transformed[INK_FRACTION_XF],
            **abstention.outputs(logits(model, features), transformed[INK_FRACTION_XF], fitted),
        }
        if with_image:
            outputs[NORMALIZED_IMAGE_OUTPUT] = transformed[NORMALIZED_XF]
        return outputs

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_INPUT)])
    def serve_image_bytes(image_bytes):
        return predict(image_bytes)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_INPUT)])
    def serve_normalized_image(image_bytes):
        return predict(image_bytes, with_image=True)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(examples):
        parsed = tf.io.parse_example(examples, raw_spec)
        return predict(parsed[contract.IMAGE_KEY])

    return {
        SERVING_SIGNATURE: serve_image_bytes.get_concrete_function(),
        NORMALIZED_SIGNATURE: serve_normalized_image.get_concrete_function(),
        EXAMPLES_SIGNATURE: serve_examples.get_concrete_function(),
    }
