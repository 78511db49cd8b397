"""The classifier: an InceptionV3 base at 75x75x3 with a small dense head."""

from __future__ import annotations

import tf_keras as keras

from components.config import TrainerConfig
from components.transform import IMAGE_XF
from data import contract


def build_model(config: TrainerConfig, base_weights: str | None, steps_per_epoch: int = 1) -> keras.Model:
    """InceptionV3 (global average pooled) -> [Dense(relu) -> Dropout] x 2 -> Dense(10, softmax).

    The output is probabilities, which TFMA's metrics and serving clients expect.
    `steps_per_epoch` sizes the learning-rate schedule.
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
        optimizer=_optimizer(config, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name=contract.ACCURACY_METRIC)],
    )
    return model


def learning_rate(config: TrainerConfig, steps_per_epoch: int):
    """A constant rate, or a linear warm-up followed by cosine decay to zero at the last step.

    From scratch, a large early rate gets InceptionV3 off the ground fast, and decaying
    it to zero lets the weights (and BatchNorm's moving averages) settle at the end.
    """
    if config.lr_schedule == "constant":
        return config.learning_rate
    total = config.epochs * steps_per_epoch
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate * 0.1 if warmup else config.learning_rate,
        decay_steps=total - warmup, alpha=0.0,
        warmup_target=config.learning_rate if warmup else None, warmup_steps=warmup)


def _optimizer(config: TrainerConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    rate = learning_rate(config, steps_per_epoch)
    if config.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    return keras.optimizers.SGD(learning_rate=rate, momentum=0.9)
