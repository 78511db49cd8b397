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
  refused (`not_a_digit`) or sent to a person (`unsure`);
- decision rules beside it, each fitted the same way, with what they cost on digits people write
  with a thick pen or small in a big canvas: an ink ceiling (more ink than any train digit is not a
  digit) and, with --test-time-augmentation, the mean logits of shifted, rotated and scaled copies of
  the normalised image (and the least digit-like copy's energy as a score).

    .venv/bin/python benchmarks/abstention.py [--model DIR] [--per-kind 200] [--seed 0] [--json OUT]
        [--test-time-augmentation]

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
# Digits as some people write them (data/variants.py): the rules' cost where ink and size differ from MNIST.
PEOPLES_DIGITS = ("thick strokes", "small in canvas")
# Test-time augmentation of the normalised 28x28 image: (shift right, shift down, degrees, scale). After
# Transform, which would undo a shift or a scaling of the raw image by re-centring and re-sizing the ink.
TTA_VARIANTS = {"identity": (0, 0, 0.0, 1.0), "right": (1, 0, 0.0, 1.0), "left": (-1, 0, 0.0, 1.0),
                "down": (0, 1, 0.0, 1.0), "up": (0, -1, 0.0, 1.0), "rotated +8": (0, 0, 8.0, 1.0),
                "rotated -8": (0, 0, -8.0, 1.0), "scaled 0.9": (0, 0, 0.0, 0.9), "scaled 1.1": (0, 0, 0.0, 1.1)}
TTA_SETS = {"3 scales": ("identity", "scaled 0.9", "scaled 1.1"), "9 copies": tuple(TTA_VARIANTS)}


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
            parts.setdefault("normalized", []).append(answer[contract.NORMALIZED_IMAGE_OUTPUT].numpy())
        result = {name: np.concatenate(values) for name, values in parts.items()}
        result["logits"] = self.logits(result["dense_2"])
        return result

    def logits(self, dense_2):
        import numpy as np

        kernel, bias = self.head
        return dense_2 @ kernel.astype(np.float64) + bias.astype(np.float64)

    def copies_logits(self, normalized) -> dict:
        """Logits [N, 10] of each TTA_VARIANTS copy of normalised images [N, 28, 28]."""
        import numpy as np
        import tensorflow as tf

        from components.transform import to_model_input

        result = {}
        for name, transform in TTA_VARIANTS.items():
            moved = affine(normalized, *transform)
            dense_2 = [np.asarray(self.layers(to_model_input(tf.constant(moved[start:start + BATCH])))[2],
                                  np.float64) for start in range(0, len(moved), BATCH)]
            result[name] = self.logits(np.concatenate(dense_2))
        return result


def affine(images, right: float, down: float, degrees: float, scale: float):
    """[N, 28, 28] images moved, turned about their centre and scaled (bilinear, black outside)."""
    import numpy as np
    import tensorflow as tf

    if (right, down, degrees, scale) == (0, 0, 0.0, 1.0):
        return images
    centre = (images.shape[-1] - 1) / 2
    angle = np.deg2rad(degrees)
    a, b = np.cos(angle) / scale, np.sin(angle) / scale
    # For each output pixel, where to read in the input: the inverse of the move.
    transform = [a, -b, centre - a * centre + b * centre - right,
                 b, a, centre - b * centre - a * centre - down, 0, 0]
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(images[..., None], tf.float32), transforms=tf.constant([transform], tf.float32),
        output_shape=tf.constant(images.shape[1:3], tf.int32), fill_value=0.0, interpolation="BILINEAR",
        fill_mode="CONSTANT")
    return moved.numpy()[..., 0]


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


def decision_rules(splits: dict, kinds: dict, peoples: dict, defaults, copies: bool) -> dict[str, dict]:
    """The exported decision and rules beside it, each fitted on the eval split as the Trainer fits the
    exported one, measured on the held-out digits, people's digits and every non-digit kind."""
    import numpy as np

    from components import abstention

    evaluation, eval_labels, _ = splits["eval"]
    test, test_labels, _ = splits["test"]
    ink_ceiling = float(splits["train"][0]["ink"].max())

    def rule(logits_of, ceiling: float | None = None):
        fitted = abstention.fit(logits_of(evaluation), eval_labels, defaults.abstention_ood_keep,
                                defaults.abstention_confident_keep)

        def decide(part):
            logits = logits_of(part)
            score = abstention.energy(logits)
            confidence = abstention.softmax(logits, fitted.temperature).max(axis=1)
            codes = abstention.decide(score, confidence, part["ink"], fitted)
            if ceiling is not None:
                codes = np.where(part["ink"] > ceiling, abstention.NOT_A_DIGIT, codes)
            return codes, logits

        return decide

    def own(part):
        return part["logits"]

    rules = {"exported: energy + temperature": rule(own),
             f"exported + ink ceiling ({ink_ceiling:.3f}, the most of any train digit)": rule(own, ink_ceiling)}
    if copies:
        for set_name, names in TTA_SETS.items():
            rules[f"mean logits of {set_name} (TTA)"] = rule(
                lambda part, names=names: np.mean([part["copies"][name] for name in names], axis=0))
    figures = {}
    for name, decide in rules.items():
        codes, logits = decide(test)
        correct = logits.argmax(axis=1) == test_labels
        accepted = codes == abstention.ACCEPTED
        figures[name] = {
            "accuracy": float(correct.mean()),
            "digits_accepted": float(accepted.mean()),
            **{people: float(np.mean(decide(part)[0] == abstention.ACCEPTED)) for people, part in peoples.items()},
            "error_among_accepted": float(1 - correct[accepted].mean()) if accepted.any() else 1.0,
            "error_at_95": selective_error(abstention.softmax(logits).max(axis=1), correct, 0.95),
            "refused": {kind: float(np.mean(decide(part)[0] != abstention.ACCEPTED)) for kind, part in kinds.items()},
        }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a pushed version directory; default: the newest")
    parser.add_argument("--per-kind", type=int, default=200, help="non-digit images per kind")
    parser.add_argument("--seed", type=int, default=0, help="the non-digit corpus' seed")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--test-time-augmentation", action="store_true",
                        help="also measure decisions on the mean logits of shifted, rotated and scaled copies "
                             "(9x the model calls)")
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
    from data.variants import make_variant

    peoples = {name: features(make_variant(name, test_images, args.seed)) for name in PEOPLES_DIGITS}
    if args.test_time_augmentation:
        for part in [splits["eval"][0], splits["test"][0], *kinds.values(), *peoples.values()]:
            part["copies"] = features.copies_logits(part["normalized"])
    served_gap = max(float(np.abs(part["served"] - part["probabilities"]).max())
                     for part in [*(s[0] for s in splits.values()), *kinds.values()])
    print(f"{model}: features of {sum(len(s[1]) for s in splits.values()) + args.per_kind * len(kinds):,} images "
          f"in {time.perf_counter() - started:.0f} s; rebuilt model vs SavedModel probabilities: max |diff| {served_gap:.1e}",
          file=sys.stderr)

    if args.features:
        arrays = {f"{split}_{name}": value for split, (part, labels, _) in splits.items()
                  for name, value in [*part.items(), ("labels", labels)] if name != "copies"}
        arrays.update({f"{kind}_{name}": value for kind, part in kinds.items() for name, value in part.items()
                       if name != "copies"})
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

    if args.test_time_augmentation:
        for set_name, names in TTA_SETS.items():
            methods[f"energy, least digit-like of {set_name} (TTA)"] = (lambda names: lambda part: np.max(
                [abstention.energy(part["copies"][copy]) for copy in names], axis=0))(names)

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

    rules = decision_rules(splits, kinds, peoples, defaults, args.test_time_augmentation)
    print("\nDecision rules side by side, each fitted on the eval split as the Trainer fits the exported one "
          "(refused: unsure or not a digit):\n")
    print(f"| rule | accuracy | digits accepted | {' | '.join(f'{name} accepted' for name in PEOPLES_DIGITS)} | "
          f"error among accepted | error at 95 % coverage | {' | '.join(kind_names)} |")
    print(f"|---|{'---:|' * (4 + len(PEOPLES_DIGITS) + len(kind_names))}")
    for name, row in rules.items():
        cells = [f"{row['accuracy']:.3f}", f"{row['digits_accepted']:.1%}",
                 *(f"{row[people]:.1%}" for people in PEOPLES_DIGITS), f"{row['error_among_accepted']:.2%}",
                 f"{row['error_at_95']:.2%}", *(f"{row['refused'][kind]:.1%}" for kind in kind_names)]
        print(f"| {name} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "per_kind": args.per_kind, "seed": args.seed,
                                         "methods": results, "selective": selective, "calibration": calibration,
                                         "exported": fitted.summary(), "rules": rules}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
