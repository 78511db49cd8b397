"""Typed options of one TFRecord build, checked when they are made."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from data import contract

BUILDER_VERSION = "1.0.0"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BuildConfig:
    source: Path
    output: Path
    eval_fraction: float = 0.1
    per_class: int | None = None  # training/ files per class to keep (None: all)
    test_per_class: int | None = None  # testing/ files per class to keep (None: all)
    shards: int | None = None  # shards per split (None: one per ~10,000 examples)
    workers: int | None = None  # processes (None: one per available core)
    seed: int = 42
    expected_size: int | None = contract.SOURCE_IMAGE_SIZE  # None accepts any size
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    overwrite: bool = False
    if_changed: bool = False  # keep an existing output made (with if_changed) from the same tree and options
    # More trees whose training/ digits all go to the train split (people's corrections from the web
    # app, see web/feedback.py): never to eval or test, so that model choice and the held-out test
    # split stay what they were; not limited by per_class.
    extra_sources: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))
        object.__setattr__(self, "output", Path(self.output))
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval fraction must be between 0 and 1 (exclusive), got {self.eval_fraction}")
        for name in ("per_class", "test_per_class", "shards", "workers", "expected_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.per_class == 1:
            raise ValueError("per-class must be at least 2, so that each class has a train and an eval example")
        if self.shards is not None and self.shards > 1024:
            raise ValueError(f"shards must be at most 1024, got {self.shards}")
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError("max-bytes and max-pixels must be positive")
        object.__setattr__(self, "extra_sources", tuple(Path(path) for path in self.extra_sources))
        output = self.output.resolve()
        for tree in (self.source, *self.extra_sources):
            source = tree.resolve()
            if output == source or source in output.parents or output in source.parents:
                raise ValueError(f"output {self.output} must not be inside the source tree {tree} or contain it")
        resolved = [path.resolve() for path in self.extra_sources]
        if len(set(resolved)) != len(resolved) or self.source.resolve() in resolved:
            raise ValueError("each extra source must be given once, and not be the source itself")

    @property
    def worker_count(self) -> int:
        return self.workers or available_cores()
