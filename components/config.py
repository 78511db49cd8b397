"""Typed training configuration: defaults, validation, and the trip through `custom_config`.

The pipeline builds a TrainerConfig, passes `to_custom_config()` to the Trainer
component, and `run_fn` rebuilds it with `from_custom_config()`, so every value
is checked once, with a message that names the option.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

BASE_WEIGHTS_CHOICES = ("auto", "imagenet", "none")
# Also in custom_config: a hash of the code, so that TFX's cache notices code changes. Not a setting.
CODE_FINGERPRINT_KEY = "code_fingerprint"
OPTIMIZERS = ("rmsprop", "adam", "sgd")
LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


# How the run report groups the settings a model was trained with. Every field of TrainerConfig is in
# exactly one group, or in NOT_SHOWN_AS_SETTINGS (tested), so a new setting cannot go unreported.
SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("batch_size", "steps_per_epoch", "shuffle_buffer", "seed"),
    "model": ("base_weights", "base_weights_sha256", "dense_units", "dropout", "batchnorm_momentum", "precision"),
    "optimiser": ("optimizer", "learning_rate", "lr_schedule", "warmup_epochs", "epochs", "frozen_epochs",
                  "fine_tune_learning_rate", "early_stopping_patience", "early_stopping_start_epoch"),
    "augmentation": ("max_translation", "max_rotation_degrees", "max_scale_change", "elastic_alpha",
                     "stroke_probability", "blur_probability"),
    "abstention": ("outlier_share", "outlier_weight", "abstention_ood_keep", "abstention_confident_keep"),
}
NOT_SHOWN_AS_SETTINGS = ("base_weights_warning",)  # the report shows it as a warning of its own


@dataclass(frozen=True)
class TrainerConfig:
    # The measured recipe for InceptionV3 from random weights on the 3,600 training digits
    # (docs/training.md): Adam at 1e-3 with warm-up and cosine decay; the original
    # project's RMSprop at 1e-4 (constant) reaches 0.918 held-out accuracy. 20 epochs since the
    # inputs are normalised: 0.987-0.990 held-out in three fresh runs (26 before; docs/training.md, "Faster training").
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    # cosine: linear warm-up to learning_rate over warmup_epochs, then cosine decay to 0 at the last epoch.
    lr_schedule: str = "cosine"
    warmup_epochs: float = 1.0
    dense_units: tuple[int, int] = (64, 64)
    dropout: tuple[float, float] = (0.2, 0.2)
    base_weights: str = "auto"  # auto | imagenet | none | path to a .h5 weights file
    # Transfer learning, with pretrained base weights only: first the new head learns on a frozen base
    # (at learning_rate), then the whole model is fine-tuned at fine_tune_learning_rate, BatchNorm kept
    # in inference mode so the pretrained statistics survive. From random weights: one phase, all trainable.
    frozen_epochs: int = 3  # at most `epochs`; equal to it: the base stays frozen throughout
    fine_tune_learning_rate: float = 1e-4
    # Set by components.base_weights.pin before the pipeline is built (so part of the cache key):
    base_weights_sha256: str = ""  # of the file base_weights names
    base_weights_warning: str = ""  # why training starts from random weights, for the run report
    # Epochs without eval improvement before stopping: a guard against runs that stall. The eval
    # split is 400 digits (one error is 0.25 %) and wanders by +-1 % while the learning rate is
    # high, so stopping only watches the second half of the schedule, with room for that noise.
    early_stopping_patience: int = 10
    early_stopping_start_epoch: int = 12  # no stopping before this epoch
    batchnorm_momentum: float = 0.9  # InceptionV3 BatchNormalization moving averages (Keras: 0.99)
    max_translation: int = 5  # augmentation: pixels of random shift (pad, then random crop)
    max_rotation_degrees: float = 10.0  # augmentation: random rotation; no flips, ever, for digits
    # augmentation: random scaling by up to this share either way, about the centre. Transform already
    # scales the ink to 20 pixels, but not every digit's box is what a reader sees as its size.
    max_scale_change: float = 0.0
    # augmentation: elastic distortion of the 28x28 digit (components/augment.py), the scale of its smooth
    # random field in pixels; 0: off, 34: Simard et al.'s (about 1.4 pixels of movement).
    elastic_alpha: float = 0.0
    stroke_probability: float = 0.3  # augmentation: share of images with thicker or thinner strokes
    blur_probability: float = 0.2  # augmentation: share of images blurred
    steps_per_epoch: int | None = None  # None: one pass over the train split
    # What training computes in (components/precision.py); auto: mixed_bfloat16 where the CPU has
    # bfloat16 instructions, decided before the pipeline is built. The exported model is float32 always.
    # float32 by default: bfloat16 epochs were ~10 % faster here but both bfloat16 runs landed at
    # exactly 0.985 held-out, float32 runs at 0.987-0.990 (docs/training.md, "Faster training").
    precision: str = "float32"
    shuffle_buffer: int = 4096
    seed: int = 42
    # Outlier exposure: non-digits (data/nondigits.py, its training kinds) in each training batch, as
    # this share of batch_size, taught a uniform answer at this weight of their loss (components/model.py).
    outlier_share: float = 0.125
    outlier_weight: float = 0.5
    # When not to answer (components/abstention.py), chosen on the eval split: the share of its digits
    # that the out-of-distribution threshold keeps, and of those the share the confidence threshold keeps.
    abstention_ood_keep: float = 0.99
    abstention_confident_keep: float = 0.98

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_units", tuple(int(u) for u in self.dense_units))
        object.__setattr__(self, "dropout", tuple(float(d) for d in self.dropout))
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            problems.append(f"learning rate must be positive, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.warmup_epochs < 0:
            problems.append(f"warm-up epochs must be >= 0, got {self.warmup_epochs}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if len(self.dense_units) != 2 or min(self.dense_units) < 64:
            problems.append(f"dense units must be two layer sizes of at least 64, got {self.dense_units}")
        if len(self.dropout) != 2 or not all(0.2 <= d < 1 for d in self.dropout):
            problems.append(f"dropout must be two rates in [0.2, 1), got {self.dropout}")
        if self.base_weights not in BASE_WEIGHTS_CHOICES and not os.path.isfile(self.base_weights):
            problems.append(
                f"base weights must be auto, imagenet, none or an existing weights file; "
                f"no file at {self.base_weights!r}"
            )
        if self.base_weights_sha256 and self.base_weights in BASE_WEIGHTS_CHOICES:
            problems.append(f"a base weights hash needs a weights file, not {self.base_weights!r}")
        if self.frozen_epochs < 0:
            problems.append(f"frozen epochs must be >= 0, got {self.frozen_epochs}")
        if not self.fine_tune_learning_rate > 0:
            problems.append(f"fine-tune learning rate must be positive, got {self.fine_tune_learning_rate}")
        if self.early_stopping_patience < 0:
            problems.append(f"early stopping patience must be >= 0, got {self.early_stopping_patience}")
        if self.early_stopping_start_epoch < 0:
            problems.append(f"early stopping start epoch must be >= 0, got {self.early_stopping_start_epoch}")
        if not 0.0 < self.batchnorm_momentum < 1.0:
            problems.append(f"batchnorm momentum must be between 0 and 1, got {self.batchnorm_momentum}")
        if self.max_translation < 0 or self.max_rotation_degrees < 0:
            problems.append("augmentation amounts must be >= 0")
        if not 0.0 <= self.max_scale_change < 0.5:
            problems.append(f"scale augmentation must be in [0, 0.5), got {self.max_scale_change}")
        if not 0.0 <= self.elastic_alpha <= 100.0:
            problems.append(f"elastic augmentation must be in [0, 100], got {self.elastic_alpha}")
        if not (0.0 <= self.stroke_probability <= 1.0 and 0.0 <= self.blur_probability <= 1.0):
            problems.append("augmentation probabilities must be between 0 and 1")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            problems.append(f"steps per epoch must be at least 1, got {self.steps_per_epoch}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.outlier_share <= 1.0 or self.outlier_weight < 0:
            problems.append("outlier share must be between 0 and 1 and outlier weight >= 0, got "
                            f"{self.outlier_share} and {self.outlier_weight}")
        if not (0.5 <= self.abstention_ood_keep <= 1.0 and 0.5 <= self.abstention_confident_keep <= 1.0):
            problems.append("abstention shares kept must be between 0.5 and 1, got "
                            f"{self.abstention_ood_keep} and {self.abstention_confident_keep}")
        if self.shuffle_buffer < 1:
            problems.append(f"shuffle buffer must be at least 1, got {self.shuffle_buffer}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_custom_config(self) -> dict[str, Any]:
        """JSON-friendly values for the Trainer's custom_config."""
        values = dataclasses.asdict(self)
        values["dense_units"] = list(self.dense_units)
        values["dropout"] = list(self.dropout)
        return values

    @classmethod
    def from_custom_config(cls, values: dict[str, Any]) -> "TrainerConfig":
        values = {key: value for key, value in values.items() if key != CODE_FINGERPRINT_KEY}
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options in custom_config: {', '.join(unknown)}")
        return cls(**values)
