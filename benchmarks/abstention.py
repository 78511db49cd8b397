"""Knowing when not to answer, measured: ways to refuse non-digits and flag unsure digits, side by side.

Takes a pushed model, the embedded digits (train split to fit feature-space models, eval split to fit
temperatures and thresholds, the 1,000 held-out test digits to report on) and the project's seeded
non-digit corpus (data/nondigits.py: noise, shapes, scribbles, textures, and the kinds held out of any
training, letters and digit pairs, made from test digits), and measures in one run:

- per method and per non-digit kind, AUROC (digit versus that kind) and the share refused at the
  method's operating point (the threshold that keeps 97 % of the eval digits);
- the held-out digits kept at that point and the error among them;
- for the confidence methods, ECE and the error among accepted digits at 95 % and 99 % coverage;
- the exported decision (components/abstention.py, fitted exactly as the Trainer fits it), per kind
  refused (`not_a_digit`) or sent to a person (`unsure`).

    .venv/bin/python benchmarks/abstention.py [--model DIR] [--per-kind 200] [--seed 0] [--json OUT]

DIR is a pushed version (serving_model/digits/<version>); by default the newest one. The model's
penultimate features are read by rebuilding the architecture and restoring the SavedModel's variables.
Goals (issue 23), at the exported operating point: >= 95 % of each non-digit kind refused, AUROC >= 0.99,
>= 97 % of held-out digits accepted, and <= 0.1 % error among accepted digits at 95 % coverage.
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

KEEP = 0.97  # single-score methods: the threshold keeps this share of eval digits
BATCH = 64
KNN = 10
ECE_BINS = 15
GOAL_REFUSED, GOAL_AUROC, GOAL_ACCEPTED, GOAL_SELECTIVE_ERROR = 0.95, 0.99, 0.97, 0.001


def newest_model() -> Path | None:
    versions = sorted((path for path in (REPO / "serving_model" / "digits").glob("*") if path.name.isdigit()),
                      key=lambda path: int(path.name))
    return versions[-1] if versions else None


def encode_all(images) -> list[bytes]:
    from data.sample import encode_png

    return [encode_png(image) for image in images]


class Features:
    """A pushed model's layers for encoded images: the SavedModel's own preprocessing (its
    `normalized_image` signature), then the rebuilt Keras model with the SavedModel's weights."""

    LAYERS = ("pooled", "dense_1", "dense_2")

    def __init__(self, model_dir: Path):
        import tensorflow as tf
        import tf_keras as keras

        from components.config import TrainerConfig
        from components.model import build_model
        from data import contract

        self.signature = tf.saved_model.load(str(model_dir)).signatures[
            contract.NORMALIZED_SIGNATURE]
        model = build_model(TrainerConfig(base_weights="none"), None)
        model.load_weights(str(model_dir / "variables" / "variables")).expect_partial()
        self.head = model.get_layer("probabilities").get_weights()
        self.model = keras.Model(model.inputs, [model.get_layer("dense_1").input, model.get_layer("dense_1").output,
                                                model.get_layer("dense_2").output, model.outputs[0]])
        # One graph for every batch: called eagerly, InceptionV3's ~300 layers ran at ~13 images/s.
        self.layers = tf.function(lambda images: self.model(images, training=False), reduce_retracing=True)

    def __call__(self, encoded: list[bytes]) -> dict:
        import numpy as np
        import tensorflow as tf

        from components.transform import to_model_input
        from data import contract

        parts: dict[str, list] = {}
        for start in range(0, len(encoded), BATCH):
            answer = self.signature(**{contract.IMAGE_BYTES_INPUT: tf.constant(encoded[start:start + BATCH])})
            pooled, dense_1, dense_2, probabilities = self.layers(to_model_input(answer[contract.NORMALIZED_IMAGE_OUTPUT]))
            served = answer[contract.PROBABILITIES_OUTPUT].numpy()
            for name, value in (("pooled", pooled), ("dense_1", dense_1), ("dense_2", dense_2),
                                ("probabilities", probabilities), ("served", served),
                                ("ink", answer[contract.INK_FRACTION_OUTPUT])):
                parts.setdefault(name, []).append(np.asarray(value, dtype=np.float64))
        result = {name: np.concatenate(values) for name, values in parts.items()}
        kernel, bias = self.head
        result["logits"] = result["dense_2"] @ kernel.astype(np.float64) + bias.astype(np.float64)
        return result


def auroc(inliers, outliers) -> float:
    """P(score of an outlier > score of a digit), ties half: the Mann-Whitney statistic."""
    import numpy as np

    scores = np.concatenate([inliers, outliers])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks for ties
    unique, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(average, counts)
    outlier_ranks = ranks[len(inliers):].sum()
    n_in, n_out = len(inliers), len(outliers)
    return float((outlier_ranks - n_out * (n_out + 1) / 2) / (n_in * n_out))


def ece(probabilities, labels, bins: int = ECE_BINS) -> float:
    import numpy as np

    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def selective_error(confidence, correct, coverage: float) -> float:
    """Error among the `coverage` share of answers with the highest confidence."""
    import numpy as np

    kept = max(1, int(round(coverage * len(confidence))))
    order = np.argsort(-confidence, kind="mergesort")[:kept]
    return float(1.0 - correct[order].mean())


def fit_mahalanobis(features, labels, shrinkage: float = 0.05):
    """(class means [C, D], precision [D, D]) of one shared covariance, shrunk towards its mean variance."""
    import numpy as np

    means = np.stack([features[labels == digit].mean(axis=0) for digit in range(10)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    scale = np.trace(covariance) / covariance.shape[0]
    covariance = (1 - shrinkage) * covariance + shrinkage * scale * np.eye(covariance.shape[0])
    return means, np.linalg.inv(covariance)


def mahalanobis(features, means, precision):
    """Squared Mahalanobis distance [N] of each row to its nearest class mean (Lee et al., 2018)."""
    projected = features @ precision
    distances = ((projected * features).sum(axis=1)[:, None] - 2.0 * projected @ means.T
                 + ((means @ precision) * means).sum(axis=1)[None, :])
    return distances.min(axis=1)


def knn_scores(bank, queries, k: int = KNN):
    """Cosine distance to the k-th nearest train feature (Sun et al., 2022); larger is less digit-like."""
    import numpy as np

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    similarity = unit(queries) @ unit(bank).T
    return 1.0 - np.sort(similarity, axis=1)[:, -k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a pushed version directory; default: the newest")
    parser.add_argument("--per-kind", type=int, default=200, help="non-digit images per kind")
    parser.add_argument("--seed", type=int, default=0, help="the non-digit corpus' seed")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--features", type=Path, default=None,
                        help="also save every image's features, logits and labels here (.npz), to try other rules")
    args = parser.parse_args()
    model = args.model or newest_model()
    if model is None:
        print("error: no pushed model in serving_model/digits: run `bash .ci/tasks.sh run` or pass --model",
              file=sys.stderr)
        return 1
    if not (model / "saved_model.pb").is_file():
        print(f"error: {model} is not a SavedModel directory", file=sys.stderr)
        return 1

    import numpy as np
    from scipy.special import logsumexp

    from benchmarks.robustness import held_out_digits
    from components import abstention
    from components.config import TrainerConfig
    from data import nondigits

    started = time.perf_counter()
    features = Features(model)
    splits = {}
    for split in ("train", "eval", "test"):
        images, labels, _ = held_out_digits(500, split)
        splits[split] = (features(encode_all(images)), labels, images)
    test_images = splits["test"][2]
    corpus = nondigits.corpus(args.per_kind, args.seed, test_images)
    kinds = {kind: features(encode_all(images)) for kind, images in corpus.items()}
    served_gap = max(float(np.abs(part["served"] - part["probabilities"]).max())
                     for part in [*(s[0] for s in splits.values()), *kinds.values()])
    print(f"{model}: features of {sum(len(s[1]) for s in splits.values()) + args.per_kind * len(kinds):,} images "
          f"in {time.perf_counter() - started:.0f} s; rebuilt model vs SavedModel probabilities: max |diff| {served_gap:.1e}",
          file=sys.stderr)

    if args.features:
        arrays = {f"{split}_{name}": value for split, (part, labels, _) in splits.items()
                  for name, value in [*part.items(), ("labels", labels)]}
        arrays.update({f"{kind}_{name}": value for kind, part in kinds.items() for name, value in part.items()})
        np.savez_compressed(args.features, **arrays)
    train, train_labels, _ = splits["train"]
    evaluation, eval_labels, _ = splits["eval"]
    test, test_labels, _ = splits["test"]
    temperature = abstention.fit_temperature(evaluation["logits"], eval_labels)

    def msp(part):
        return 1.0 - abstention.softmax(part["logits"]).max(axis=1)

    def scaled(part):
        return 1.0 - abstention.softmax(part["logits"], temperature).max(axis=1)

    def energy(part):
        return -logsumexp(part["logits"], axis=1)

    methods = {"max softmax": msp, f"temperature (T={temperature:.2f})": scaled, "energy": energy}
    for layer in Features.LAYERS:
        means, precision = fit_mahalanobis(train[layer], train_labels)
        methods[f"Mahalanobis, {layer}"] = (lambda m, p, l: lambda part: mahalanobis(part[l], m, p))(
            means, precision, layer)
    for layer in ("pooled", "dense_2"):
        methods[f"kNN k={KNN}, {layer}"] = (lambda l: lambda part: knn_scores(train[l], part[l]))(layer)

    def combined(*names):
        """Each score in units of its own eval tail ((s - median) / (99th percentile - median)), the largest."""
        scales = []
        for name in names:
            values = methods[name](evaluation)
            median, tail = np.median(values), np.quantile(values, 0.99)
            scales.append((methods[name], median, max(tail - median, 1e-12)))
        return lambda part: np.max([(fn(part) - median) / spread for fn, median, spread in scales], axis=0)

    for pair in (("energy", "Mahalanobis, dense_2"), ("max softmax", "Mahalanobis, dense_2"),
                 ("energy", "Mahalanobis, pooled"), ("energy", "kNN k=10, pooled")):
        methods[" + ".join(pair)] = combined(*pair)

    defaults = TrainerConfig()
    fitted = abstention.fit(evaluation["logits"], eval_labels, defaults.abstention_ood_keep,
                            defaults.abstention_confident_keep)
    exported_name = "exported decision (energy + temperature)"

    def exported_parts(part):
        score = abstention.energy(part["logits"])
        confidence = abstention.softmax(part["logits"], fitted.temperature).max(axis=1)
        return score, confidence, abstention.decide(score, confidence, part["ink"], fitted)

    def exported(part):
        """Not accepted (a person looks) exactly where this exceeds 1: each test in units of its threshold."""
        score, confidence, _ = exported_parts(part)
        median = float(np.median(abstention.energy(evaluation["logits"])))
        combined = np.maximum((score - median) / (fitted.ood_threshold - median),
                              (1 - confidence) / (1 - fitted.confidence_threshold))
        return np.where(part["ink"] <= 0, np.inf, combined)

    methods[exported_name] = exported

    results: dict[str, dict] = {}
    test_correct = test["probabilities"].argmax(axis=1) == test_labels
    for name, score in methods.items():
        digit_scores = score(test)
        threshold = 1.0 if score is exported else float(np.quantile(score(evaluation), KEEP))
        kept = digit_scores <= threshold
        results[name] = {
            "auroc": {kind: auroc(digit_scores, score(part)) for kind, part in kinds.items()},
            "refused": {kind: float(np.mean(score(part) > threshold)) for kind, part in kinds.items()},
            "digits_accepted": float(kept.mean()),
            "error_among_accepted": float(1 - test_correct[kept].mean()) if kept.any() else None,
        }
        all_outliers = np.concatenate([score(part) for part in kinds.values()])
        results[name]["auroc_all"] = auroc(digit_scores, all_outliers)

    selective = {}
    for name, confidence in (("max softmax", 1 - msp(test)), ("temperature", 1 - scaled(test)),
                             ("exported decision", -exported(test))):
        selective[name] = {f"error at {int(c * 100)} % coverage": selective_error(confidence, test_correct, c)
                           for c in (0.95, 0.99)}
    calibration = {"ECE, raw": ece(abstention.softmax(test["logits"]), test_labels),
                   f"ECE, temperature {temperature:.2f}": ece(abstention.softmax(test["logits"], temperature), test_labels)}

    decisions = {kind: exported_parts(part)[2] for kind, part in kinds.items()}
    digit_decisions = exported_parts(test)[2]

    kind_names = list(kinds)
    print(f"\n{len(test_labels):,} held-out digits; {args.per_kind} non-digits per kind (seed {args.seed}; "
          f"held out of any training: {', '.join(nondigits.HELD_OUT_KINDS)}); clean accuracy {test_correct.mean():.3f}\n")
    print("AUROC, digit versus each kind (higher is better):\n")
    print(f"| method | {' | '.join(kind_names)} | all |")
    print(f"|---|{'---:|' * (len(kind_names) + 1)}")
    for name, figures in results.items():
        cells = " | ".join(f"{figures['auroc'][kind]:.3f}" for kind in kind_names)
        print(f"| {name} | {cells} | {figures['auroc_all']:.3f} |")
    print(f"\nRefused at the operating point (single scores: the threshold keeping {KEEP:.0%} of eval digits):\n")
    print(f"| method | {' | '.join(kind_names)} | digits accepted | error among accepted |")
    print(f"|---|{'---:|' * (len(kind_names) + 2)}")
    for name, figures in results.items():
        error = figures["error_among_accepted"]
        cells = " | ".join(f"{figures['refused'][kind]:.1%}" for kind in kind_names)
        error_cell = "-" if error is None else f"{error:.2%}"
        print(f"| {name} | {cells} | {figures['digits_accepted']:.1%} | {error_cell} |")
    print("\nSelective prediction on the held-out digits (lower is better):\n")
    print("| confidence | error at 95 % coverage | error at 99 % coverage |")
    print("|---|---:|---:|")
    for name, figures in selective.items():
        print(f"| {name} | {figures['error at 95 % coverage']:.2%} | {figures['error at 99 % coverage']:.2%} |")
    print("\n" + "; ".join(f"{name} {value:.4f}" for name, value in calibration.items()))
    print(f"\nThe exported decision (T={fitted.temperature:.2f}, OOD threshold {fitted.ood_threshold:.1f}, "
          f"confidence threshold {fitted.confidence_threshold:.3f}):\n")
    print("| input | accepted | unsure | not a digit |")
    print("|---|---:|---:|---:|")
    for kind, decision in [("held-out digits", digit_decisions), *decisions.items()]:
        shares = [float(np.mean(decision == code)) for code in (abstention.ACCEPTED, abstention.UNSURE, abstention.NOT_A_DIGIT)]
        print(f"| {kind} | {' | '.join(f'{share:.1%}' for share in shares)} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "per_kind": args.per_kind, "seed": args.seed,
                                         "methods": results, "selective": selective, "calibration": calibration,
                                         "exported": fitted.summary()}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
