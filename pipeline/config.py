"""Typed configuration of one pipeline run; the runner builds it, create_pipeline reads it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from components.config import TrainerConfig
from pipeline import beam, uri

SCHEMA_FILE = str(Path(__file__).resolve().parent / "schema" / "schema.pbtxt")


@dataclass(frozen=True)
class BlessingGates:
    """What the Evaluator requires of a model on the held-out test split before Pusher ships it.

    Sized from measurement (docs/pipeline.md, "The gates"): runs of the recipe scored 0.984-0.988 on the
    1,000 test digits, so a retrain within 0.005 of the blessed model is as good as it (5 digits
    of 1,000, just above that spread); per digit (100 each), runs had their weakest digit at
    0.96, 0.95 and 0.94 and differed by at most 0.02 on any digit.

    The absolute floors are sized from the test split's own sampling error, so that a model at the
    quality target is not refused by chance: 1,000 digits measure an accuracy near 0.985 to +-0.0038
    (one standard deviation), so a model truly at 0.985 scores below 0.980 about once in 20 runs
    (0.985 was the floor before: such a model was refused half the time, and one fresh run in three
    of the default was); 100 digits measure a digit's recall near 0.97 to +-0.017, so a digit truly
    at 0.97 falls below 0.93 (8 wrong of 100) about once in 100.

    Selective prediction, at the operating point exported with the model (pipeline/selective_metrics.py):
    the model answers ~97 % of test digits without a person (the threshold keeps 97 % of 400 eval
    digits: coverage varies by ~1 % from run to run, by sampling alone), so 0.95 is two such spreads
    below, and a drop of 0.03 against the blessed model two spreads of a difference. About 5 of the
    ~970 accepted answers are wrong (0.5 %); counts that small vary by ~sqrt(5) per run, ~3 between
    two runs, so a rise of 0.007 (7 answers) is two spreads, and 0.015 is three times the measured rate.
    """

    min_accuracy: float = 0.98  # absolute bar on held-out accuracy (the quality target is 0.985)
    max_accuracy_drop: float = 0.005  # allowed drop below the latest blessed model's accuracy
    min_class_recall: float = 0.93  # every digit's recall (at the argmax) at least this
    max_class_recall_drop: float = 0.05  # allowed drop of any digit's recall below the blessed model's
    min_coverage: float = 0.95  # share of test digits answered without a person, at least this
    max_coverage_drop: float = 0.03  # allowed drop of that share below the blessed model's
    max_selective_error: float = 0.015  # error among the accepted answers at most this
    max_selective_error_rise: float = 0.007  # allowed rise of that error above the blessed model's

    def __post_init__(self) -> None:
        for name in ("min_accuracy", "max_accuracy_drop", "min_class_recall", "max_class_recall_drop",
                     "min_coverage", "max_coverage_drop", "max_selective_error", "max_selective_error_rise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name.replace('_', ' ')} must be between 0 and 1, got {value}")


@dataclass(frozen=True)
class PipelineConfig:
    """Locations are strings: local paths (made absolute) or URIs such as gs://bucket/dir (kept as
    given), see pipeline/uri.py. Only the local runner's own files (MLMD, logs, report) must be local."""

    data_root: str  # a `digits data build` output: train/, eval/, test/ shards and manifest.json
    train_examples: int  # size of the train split (from the manifest): sets steps per epoch
    pipeline_root: str = "pipeline_root"
    serving_dir: str = "serving_model"
    pipeline_name: str = "digits"
    model_name: str = "digits"
    gates: BlessingGates = field(default_factory=BlessingGates)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    schema_file: str = SCHEMA_FILE
    # The local runner's sqlite MLMD store, logs and report; by default the pipeline root itself,
    # which a remote pipeline root cannot be (sqlite needs a local file).
    local_root: Path | None = None
    enable_cache: bool = True
    run_fn: str = "components.trainer.run_fn"  # dotted path of the Trainer's run_fn
    code_fingerprint: str = ""  # hash of the code Transform/Trainer run; part of their cache key
    # Which Beam runner the data components use: pipeline/beam.py's profiles (the default, in-process,
    # was measured fastest on 2 cores for this data).
    beam_pipeline_args: tuple[str, ...] = field(default_factory=lambda: beam.DEFAULT_ARGS)

    def __post_init__(self) -> None:
        for name in ("data_root", "pipeline_root", "serving_dir", "schema_file"):
            object.__setattr__(self, name, uri.normalize(getattr(self, name)))
        if self.local_root is not None:
            object.__setattr__(self, "local_root", Path(self.local_root).resolve())
        if self.train_examples < 1:
            raise ValueError(f"the train split is empty ({self.train_examples} examples)")
        if not self.model_name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"model name must be letters, digits, '-' or '_', got {self.model_name!r}")
        object.__setattr__(self, "beam_pipeline_args", tuple(self.beam_pipeline_args))

    @property
    def local_dir(self) -> Path | None:
        """Where the local runner keeps MLMD, logs and the report; None when it has nowhere to."""
        if self.local_root is not None:
            return self.local_root
        return None if uri.is_remote(self.pipeline_root) else Path(self.pipeline_root)

    @property
    def metadata_path(self) -> Path | None:
        return self.local_dir / "metadata.sqlite" if self.local_dir is not None else None

    @property
    def serving_model_dir(self) -> str:
        """Where Pusher puts versions: SERVING_DIR/<model name>/<version>/."""
        return uri.join(self.serving_dir, self.model_name)

    @property
    def steps_per_epoch(self) -> int:
        return self.trainer.steps_per_epoch or math.ceil(self.train_examples / self.trainer.batch_size)

    @property
    def train_steps(self) -> int:
        return self.steps_per_epoch * self.trainer.epochs
