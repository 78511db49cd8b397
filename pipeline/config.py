"""Typed configuration of one pipeline run; the runner builds it, create_pipeline reads it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from components.config import TrainerConfig

SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "schema.pbtxt"


@dataclass(frozen=True)
class PipelineConfig:
    data_root: Path  # a `digits data build` output: train/, eval/, test/ shards and manifest.json
    train_examples: int  # size of the train split (from the manifest): sets steps per epoch
    pipeline_root: Path = Path("pipeline_root")
    serving_dir: Path = Path("serving_model")
    pipeline_name: str = "digits"
    model_name: str = "digits"
    min_accuracy: float = 0.985  # absolute bar on held-out accuracy for blessing
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    schema_file: Path = SCHEMA_FILE
    enable_cache: bool = True
    run_fn: str = "components.trainer.run_fn"  # dotted path of the Trainer's run_fn
    code_fingerprint: str = ""  # hash of the code Transform/Trainer run; part of their cache key
    # Beam's FnApiRunner, in memory: the multi-process mode was 4x slower on 2 cores for this
    # data, and the default DirectRunner first tries to download a Prism runner binary.
    beam_pipeline_args: tuple[str, ...] = (
        "--runner=FnApiRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1",
    )

    def __post_init__(self) -> None:
        for name in ("data_root", "pipeline_root", "serving_dir", "schema_file"):
            object.__setattr__(self, name, Path(getattr(self, name)).resolve())
        if self.train_examples < 1:
            raise ValueError(f"the train split is empty ({self.train_examples} examples)")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"min accuracy must be between 0 and 1, got {self.min_accuracy}")
        if not self.schema_file.is_file():
            raise ValueError(f"schema file {self.schema_file} does not exist")
        if not self.model_name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"model name must be letters, digits, '-' or '_', got {self.model_name!r}")

    @property
    def metadata_path(self) -> Path:
        return self.pipeline_root / "metadata.sqlite"

    @property
    def steps_per_epoch(self) -> int:
        return self.trainer.steps_per_epoch or math.ceil(self.train_examples / self.trainer.batch_size)

    @property
    def train_steps(self) -> int:
        return self.steps_per_epoch * self.trainer.epochs
