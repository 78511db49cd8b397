"""The Trainer's run_fn: glue that calls the data, model and signature modules in order."""

from __future__ import annotations

import logging

import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras

from components import base_weights
from components.config import TrainerConfig
from components.data import make_dataset
from components.history import write_history
from components.model import build_model, fit, float32_copy
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

    train = make_dataset(fn_args.train_files, fn_args.data_accessor, tf_transform_output, config, training=True)
    evaluation = make_dataset(fn_args.eval_files, fn_args.data_accessor, tf_transform_output, config,
                              training=False)
    # The pipeline sets train_args.num_steps = epochs x steps per epoch (one pass over train).
    steps_per_epoch = config.steps_per_epoch or max(1, fn_args.train_steps // config.epochs)
    model = build_model(config, weights.keras_weights, steps_per_epoch, pretrained=weights.pretrained)
    log.info("training %d epochs x %d steps in %s; base weights: %s", config.epochs, steps_per_epoch,
             config.precision, weights.source)

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
    # Without Keras' per-layer call traces: every consumer (TFMA as tf_generic, TF Serving, `digits
    # serve`) uses the signatures, which hold the whole graph anyway; tracing InceptionV3's ~300 layers
    # took 42-48 s of each Trainer run, saving without them 5-7 s (measured).
    model.save(fn_args.serving_model_dir, save_format="tf", save_traces=False,
               signatures=make_signatures(model, tf_transform_output))
    # Real digits as TF Serving warmup requests, so a freshly loaded version answers its first request fast.
    write_warmup_requests(fn_args.serving_model_dir, warmup_images_from_examples(fn_args.eval_files, WARMUP_IMAGES))
    # What this model's predictions look like on examples it was not trained on, for serving's drift
    # gauges: the model as exported, on every eval example, unaugmented (`evaluation` is one pass).
    write_reference_profile(fn_args.serving_model_dir, model.predict(evaluation, verbose=0))
