"""Decides, before any file is read, which split and shard every candidate goes to.

Deterministic for a given tree and seed, whatever the number of workers:
candidates are grouped by (part, label) and shuffled with a seed derived from
the group, so eval is carved out of training/ per class (stratified) and
`--per-class` keeps the same balanced subsample on every run. Each split is then
shuffled once more and dealt round-robin to its shards, so every shard mixes
all classes.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field

from data import contract
from tfrecord_builder.config import BuildConfig
from tfrecord_builder.layout import Candidate

EXAMPLES_PER_AUTO_SHARD = 10_000


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    count: int
    items: list[tuple[str, int]]  # (path, label)

    @property
    def relative_path(self) -> str:
        return f"{self.split}/data-{self.index:05d}-of-{self.count:05d}.tfrecord.gz"


@dataclass
class Plan:
    tasks: list[ShardTask]
    not_selected: int = 0  # candidates left out by --per-class / --test-per-class
    assigned: dict[str, int] = field(default_factory=dict)  # split -> candidates


def eval_count(files: int, fraction: float) -> int:
    """Eval files for one class: the fraction, rounded, but never all nor (if possible) none."""
    if files < 2:
        return 0
    return min(files - 1, max(1, round(files * fraction)))


def make_plan(candidates: list[Candidate], config: BuildConfig, extra: list[Candidate] = ()) -> Plan:
    """Splits and shards. `extra` (training digits of --extra-source trees) all go to the train split."""
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for candidate in candidates:
        groups[(candidate.part, candidate.label)].append(candidate.path)

    splits: dict[str, list[tuple[str, int]]] = {split: [] for split in contract.SPLITS}
    not_selected = 0
    for (part, label), paths in sorted(groups.items()):
        paths = sorted(paths)
        random.Random(f"{config.seed}/{part}/{label}").shuffle(paths)
        limit = config.per_class if part == contract.TRAINING_DIR else config.test_per_class
        if limit is not None and len(paths) > limit:
            not_selected += len(paths) - limit
            paths = paths[:limit]
        if part == contract.TESTING_DIR:
            splits[contract.TEST_SPLIT].extend((path, label) for path in paths)
        else:
            n_eval = eval_count(len(paths), config.eval_fraction)
            splits[contract.EVAL_SPLIT].extend((path, label) for path in paths[:n_eval])
            splits[contract.TRAIN_SPLIT].extend((path, label) for path in paths[n_eval:])

    splits[contract.TRAIN_SPLIT].extend((candidate.path, candidate.label) for candidate in sorted(extra))

    tasks = []
    for split, items in splits.items():
        if not items:
            continue
        random.Random(f"{config.seed}/{split}").shuffle(items)
        count = config.shards or math.ceil(len(items) / EXAMPLES_PER_AUTO_SHARD)
        count = min(count, len(items))
        tasks.extend(ShardTask(split, index, count, items[index::count]) for index in range(count))
    return Plan(tasks=tasks, not_selected=not_selected, assigned={s: len(i) for s, i in splits.items()})
