"""The exported model's signatures: the contract with TF Serving, TFMA and batch scoring.

- `serving_default`: `image_bytes`, a batch of encoded images (PNG or JPEG, any
  size, gray or colour) -> `probabilities` [N, 10] and `predicted_class` [N].
  TF Serving's REST `{"instances": [{"b64": "..."}]}` feeds it unchanged.
- `serving_examples`: `examples`, serialized tf.train.Example (label optional) ->
  the same outputs; TFMA evaluates through it.
Both apply the Transform graph, so serving preprocesses exactly as training did.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft

from components.transform import IMAGE_XF
from data import contract
from data.contract import (
    EXAMPLES_INPUT,
    EXAMPLES_SIGNATURE,
    IMAGE_BYTES_INPUT,
    PREDICTED_CLASS_OUTPUT,
    PROBABILITIES_OUTPUT,
    SERVING_SIGNATURE,
)


def make_signatures(model, tf_transform_output: tft.TFTransformOutput) -> dict:
    model.tft_layer = tf_transform_output.transform_features_layer()  # tracked, so it is saved with the model
    raw_spec = tf_transform_output.raw_feature_spec()
    raw_spec.pop(contract.LABEL_KEY)

    def predict(raw_images: tf.Tensor) -> dict:
        transformed = model.tft_layer({contract.IMAGE_KEY: tf.reshape(raw_images, [-1, 1])})
        probabilities = model({IMAGE_XF: transformed[IMAGE_XF]}, training=False)
        return {
            PROBABILITIES_OUTPUT: probabilities,
            PREDICTED_CLASS_OUTPUT: tf.argmax(probabilities, axis=-1),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_INPUT)])
    def serve_image_bytes(image_bytes):
        return predict(image_bytes)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(examples):
        parsed = tf.io.parse_example(examples, raw_spec)
        return predict(parsed[contract.IMAGE_KEY])

    return {
        SERVING_SIGNATURE: serve_image_bytes.get_concrete_function(),
        EXAMPLES_SIGNATURE: serve_examples.get_concrete_function(),
    }
