"""The classifier: an InceptionV3 base at 75x75x3 with a small dense head."""

from __future__ import annotations

import tf_keras as keras

from components.config import TrainerConfig
from components.transform import IMAGE_XF
from data import contract


def build_model(config: TrainerConfig, base_weights: str | None) -> keras.Model:
    """InceptionV3 (global average pooled) -> [Dense(relu) -> Dropout] x 2 -> Dense(10, softmax).

    The output is probabilities, which TFMA's metrics and serving clients expect.
    """
    shape = (contract.IMAGE_SIZE, contract.IMAGE_SIZE, contract.IMAGE_CHANNELS)
    inputs = keras.Input(shape=shape, name=IMAGE_XF)
    base = keras.applications.InceptionV3(include_top=False, weights=base_weights, input_shape=shape, pooling="avg")
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # The moving averages that inference uses; a lower momentum lets them catch up with
            # weights that change fast (training from scratch) within a few hundred steps.
            layer.momentum = config.batchnorm_momentum
    x = base(inputs)
    for index, (units, rate) in enumerate(zip(config.dense_units, config.dropout), start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{index}")(x)
        x = keras.layers.Dropout(rate, name=f"dropout_{index}")(x)
    outputs = keras.layers.Dense(contract.NUM_CLASSES, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="digits_inception_v3")
    model.compile(
        optimizer=_optimizer(config),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="sparse_categorical_accuracy")],
    )
    return model


def _optimizer(config: TrainerConfig) -> keras.optimizers.Optimizer:
    if config.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=config.learning_rate)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=config.learning_rate)
    return keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=0.9)
