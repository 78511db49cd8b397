"""The classifier: an InceptionV3 base at 75x75x3 with a small dense head, and how it is trained."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tf_keras as keras

from components import abstention, precision
from components.config import TrainerConfig
from components.transform import IMAGE_XF
from data import contract


BASE_NAME = "inception_v3"


def build_model(config: TrainerConfig, base_weights: str | None, steps_per_epoch: int = 1,
                pretrained: bool = False) -> keras.Model:
    """InceptionV3 (global average pooled) -> [Dense(relu) -> Dropout] x 2 -> Dense(10, softmax).

    The output is probabilities, which TFMA's metrics and serving clients expect.
    `steps_per_epoch` sizes the learning-rate schedule. With `pretrained` weights the base's
    BatchNorm layers always run in inference mode, keeping the statistics they were trained with
    (Keras' fine-tuning recipe); from random weights they learn them. Layers compute in
    `config.precision` (resolved, not `auto`); the probabilities are float32 always.
    """
    with precision.policy(precision.resolve(config.precision)):
        model = _layers(config, base_weights, pretrained)
    _compile(model, config, steps_per_epoch)
    return model


def float32_copy(model: keras.Model, config: TrainerConfig) -> keras.Model:
    """`model` itself if it computes in float32, else the same architecture in float32 with its weights
    (mixed precision keeps every weight in float32, so nothing is rounded): what gets exported."""
    if model.compute_dtype == precision.FLOAT32:
        return model
    with precision.policy(precision.FLOAT32):
        copy = _layers(config, None, pretrained=False)
    copy.set_weights(model.get_weights())
    return copy


def feature_model(model: keras.Model) -> keras.Model:
    """The same weights, answering (penultimate features [N, D], probabilities [N, 10]): what the
    abstention outputs (components/abstention.py) are computed from. The logits are
    `features @ kernel + bias` of the `probabilities` layer (`logits`)."""
    return keras.Model(model.inputs, [model.get_layer(abstention.FEATURE_LAYER).output, model.outputs[0]],
                       name=f"{model.name}_features")


def logits(model: keras.Model, features):
    """The pre-softmax values of the model's last layer for `features` from `feature_model` (a tensor)."""
    import tensorflow as tf

    head = model.get_layer(abstention.LOGITS_LAYER)
    return tf.matmul(tf.cast(features, tf.float32), head.kernel) + head.bias


def _layers(config: TrainerConfig, base_weights: str | None, pretrained: bool) -> keras.Model:
    shape = (contract.IMAGE_SIZE, contract.IMAGE_SIZE, contract.IMAGE_CHANNELS)
    inputs = keras.Input(shape=shape, name=IMAGE_XF)
    base = keras.applications.InceptionV3(include_top=False, weights=base_weights, input_shape=shape, pooling="avg")
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # The moving averages that inference uses; a lower momentum lets them catch up with
            # weights that change fast (training from scratch) within a few hundred steps.
            layer.momentum = config.batchnorm_momentum
    x = base(inputs, training=False) if pretrained else base(inputs)
    for index, (units, rate) in enumerate(zip(config.dense_units, config.dropout), start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{index}")(x)
        x = keras.layers.Dropout(rate, name=f"dropout_{index}")(x)
    # float32 softmax: bfloat16's 8-bit mantissa would round probabilities near 1 to exactly 1.
    outputs = keras.layers.Dense(contract.NUM_CLASSES, activation="softmax", name="probabilities",
                                 dtype=precision.FLOAT32)(x)
    return keras.Model(inputs, outputs, name="digits_inception_v3")


class OutlierExposureLoss(keras.losses.Loss):
    """Cross-entropy on digits; on non-digits (label NUM_CLASSES), `weight` x the cross-entropy to the
    uniform distribution: the model learns to spread its answer on what is not a digit (Hendrycks et
    al., 2019, "Deep anomaly detection with outlier exposure"). Without non-digits in a batch it is
    the sparse categorical cross-entropy."""

    def __init__(self, weight: float, name: str = "outlier_exposure"):
        super().__init__(name=name)
        self.weight = weight

    def call(self, y_true, y_pred):
        import tensorflow as tf

        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        outlier = labels >= contract.NUM_CLASSES
        log_p = tf.math.log(tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0))
        digit = -tf.gather(log_p, tf.where(outlier, 0, labels), batch_dims=1)
        uniform = -tf.reduce_mean(log_p, axis=-1)
        return tf.where(outlier, self.weight * uniform, digit)

    def get_config(self) -> dict:
        return {**super().get_config(), "weight": self.weight}


class DigitAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """Accuracy on the digits of a batch only: its non-digits (outlier exposure) have no right class."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        import tensorflow as tf

        digits = tf.cast(tf.reshape(y_true, [-1]) < contract.NUM_CLASSES, tf.float32)
        if sample_weight is not None:
            digits *= tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        return super().update_state(tf.minimum(tf.reshape(y_true, [-1]), contract.NUM_CLASSES - 1), y_pred,
                                    sample_weight=digits)


def _compile(model: keras.Model, config: TrainerConfig, steps_per_epoch: int) -> None:
    model.compile(
        optimizer=_optimizer(config, steps_per_epoch),
        loss=OutlierExposureLoss(config.outlier_weight),
        metrics=[DigitAccuracy(name=contract.ACCURACY_METRIC)],
    )


def fit(model: keras.Model, train, evaluation, config: TrainerConfig, steps_per_epoch: int, pretrained: bool,
        callbacks: Callable[[], list] = list) -> dict[str, list[float]]:
    """Trains `model` (from `build_model`) for `config.epochs`; returns Keras' history, all phases joined.

    From pretrained weights, real transfer learning: `frozen_epochs` with the base frozen while the
    new head learns at `learning_rate`, then the rest with everything trainable at
    `fine_tune_learning_rate` (cosine-decayed, no warm-up). From random weights: one phase.
    `callbacks` makes a fresh list for each phase.
    """
    frozen = min(config.frozen_epochs, config.epochs) if pretrained else 0
    history: dict[str, list[float]] = {}

    def phase(phase_config: TrainerConfig, first: int, last: int) -> None:
        _compile(model, phase_config, steps_per_epoch)
        result = model.fit(train, initial_epoch=first, epochs=last, steps_per_epoch=steps_per_epoch,
                           validation_data=evaluation, callbacks=callbacks(), verbose=2)
        for name, values in result.history.items():
            history.setdefault(name, []).extend(float(value) for value in values)

    base = model.get_layer(BASE_NAME)
    if frozen:
        base.trainable = False
        phase(dataclasses.replace(config, epochs=frozen), 0, frozen)
        base.trainable = True
    if frozen < config.epochs:
        rest = config.epochs - frozen
        phase(dataclasses.replace(config, epochs=rest, learning_rate=config.fine_tune_learning_rate,
                                  warmup_epochs=0.0) if frozen else config, frozen, config.epochs)
    return history


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
