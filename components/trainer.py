"""The Trainer's run_fn: glue that calls the data, model and signature modules in order."""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras

from components import abstention, base_weights, distribute
from components.config import TrainerConfig
from components.data import make_dataset, outlier_pool, outliers_per_batch
from components.history import write_history
from components.model import build_model, feature_model, fit, float32_copy, logits
from components.reference import write_reference_profile
from components.signatures import make_signatures
from components.warmup import warmup_images_from_examples, write_warmup_requests
from data import contract

WARMUP_IMAGES = 8

log = logging.getLogger(__name__)


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (generic Trainer, `run_fn="components.trainer.run_fn"`)."""
    config = TrainerConfig.from_custom_config(fn_args.custom_config)
    weights = base_weights.resolve_pinned(config)
    tf.keras.utils.set_random_seed(config.seed)
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)

    # Outlier exposure: non-digits in every training batch, taught a uniform answer (components/model.py).
    outliers = outlier_pool(fn_args.train_files, config)
    train = make_dataset(fn_args.train_files, fn_args.data_accessor, tf_transform_output, config, training=True,
                         outliers=outliers)
    evaluation = make_dataset(fn_args.eval_files, fn_args.data_accessor, tf_transform_output, config,
                              training=False)
    # The pipeline sets train_args.num_steps = epochs x steps per epoch (one pass over train).
    steps_per_epoch = config.steps_per_epoch or max(1, fn_args.train_steps // config.epochs)
    devices = distribute.strategy()  # several GPUs: MirroredStrategy; else the default strategy
    with devices.scope():
        model = build_model(config, weights.keras_weights, steps_per_epoch, pretrained=weights.pretrained)
    log.info("training %d epochs x %d steps in %s on %d device(s); base weights: %s; %d non-digits per batch "
             "from a pool of %d", config.epochs, steps_per_epoch, model.dtype_policy.name,
             devices.num_replicas_in_sync, weights.source, outliers_per_batch(config), len(outliers))

    def callbacks() -> list:
        return [
            keras.callbacks.EarlyStopping(
                monitor=f"val_{contract.ACCURACY_METRIC}", mode="max",
                patience=config.early_stopping_patience,
                # Not the best-by-eval weights: with a decaying learning rate the last epochs are the
                # best, and on 400 eval digits a mid-schedule epoch often ties with them (measured:
                # restoring such an epoch gave 0.973 held-out instead of ~0.985).
                restore_best_weights=config.lr_schedule == "constant",
                start_from_epoch=config.early_stopping_start_epoch,
            ),
            keras.callbacks.TensorBoard(log_dir=fn_args.model_run_dir, update_freq="epoch"),
        ]

    with devices.scope():  # each phase compiles again: its optimizer's variables are mirrored too
        history = fit(model, train, evaluation, config, steps_per_epoch, weights.pretrained, callbacks)

    write_history(fn_args.model_run_dir, {
        "history": history,
        "epochs_run": len(next(iter(history.values()), [])),
        "steps_per_epoch": steps_per_epoch,
        "base_weights": weights.source,
        "pretrained": weights.pretrained,
        "base_weights_warning": weights.warning,
        "config": config.to_custom_config(),
    })
    model = float32_copy(model, config)  # what is exported, whatever training computed in
    # When not to answer: the temperature and thresholds on the eval split's logits; the constants go into
    # the graph (components/abstention.py).
    eval_features, eval_probabilities, eval_labels = _features(model, evaluation)
    eval_logits = logits(model, eval_features).numpy()
    fitted = abstention.fit(eval_logits, eval_labels, ood_keep=config.abstention_ood_keep,
                            confident_keep=config.abstention_confident_keep)
    log.info("abstention: temperature %.3f, not a digit above energy %.2f, unsure below %.3f (%d eval digits)",
             fitted.temperature, fitted.ood_threshold, fitted.confidence_threshold, len(eval_labels))
    # Without Keras' per-layer call traces: every consumer (TFMA as tf_generic, TF Serving, `digits
    # serve`) uses the signatures, which hold the whole graph anyway; tracing InceptionV3's ~300 layers
    # took 42-48 s of each Trainer run, saving without them 5-7 s (measured).
    model.save(fn_args.serving_model_dir, save_format="tf", save_traces=False,
               signatures=make_signatures(model, tf_transform_output, fitted))
    eval_scores = abstention.energy(eval_logits)
    eval_confidence = abstention.softmax(eval_logits, fitted.temperature).max(axis=1)
    abstention.write(fn_args.serving_model_dir, fitted, {
        "eval": abstention.measure(eval_scores, eval_confidence, eval_probabilities.argmax(axis=1) == eval_labels,
                                   fitted)})
    # Real digits as TF Serving warmup requests, so a freshly loaded version answers its first request fast.
    write_warmup_requests(fn_args.serving_model_dir, warmup_images_from_examples(fn_args.eval_files, WARMUP_IMAGES))
    # What this model's predictions look like on examples it was not trained on, for serving's drift
    # gauges: the model as exported, on every eval example, unaugmented (`evaluation` is one pass).
    # The eval split holds digits: its decisions leave out the graph's no-ink rule, which is for what people send.
    eval_decisions = abstention.decide(eval_scores, eval_confidence, np.ones(len(eval_labels)), fitted)
    write_reference_profile(fn_args.serving_model_dir, eval_probabilities, eval_decisions)


def _features(model, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(penultimate features, probabilities, labels) of one pass over `dataset`, in inference mode."""
    network = feature_model(model)
    features, probabilities, labels = [], [], []
    for inputs, batch_labels in dataset:
        batch_features, batch_probabilities = network(inputs, training=False)
        features.append(batch_features.numpy())
        probabilities.append(batch_probabilities.numpy())
        labels.append(batch_labels.numpy().reshape(-1))
    return np.concatenate(features), np.concatenate(probabilities), np.concatenate(labels)
