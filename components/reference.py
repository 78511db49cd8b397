"""A model's reference profile: what its predictions look like on data it was not trained on.

The Trainer writes it beside the SavedModel from the eval split; serving exports it as gauges,
so that prediction drift is measured against the very version that answers. This module owns the
file's place, name, keys and format number. It imports no TensorFlow at import time: serving reads
profiles in a process where importing this module must cost nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from data.contract import ASSETS_EXTRA_DIR, CLASS_NAMES, DECISIONS, NUM_CLASSES
from monitoring.names import CONFIDENCE_BUCKETS, bucket_label

# TF Serving's directory for files beside a SavedModel (components/warmup.py writes its warmup file
# there too); it ignores everything in it but the warmup file.
PROFILE_DIR = ASSETS_EXTRA_DIR
PROFILE_FILE = "reference_profile.json"
FORMAT = 1
SOURCE = "eval split"

FORMAT_KEY = "format"
SOURCE_KEY = "source"
EXAMPLES_KEY = "examples"
CLASS_SHARE_KEY = "class_share"
CONFIDENCE_MEAN_KEY = "confidence_mean"
CONFIDENCE_SHARE_KEY = "confidence_cumulative_share"
# The share of each abstention decision (data/contract.py's DECISIONS): in profiles of models that decide.
DECISION_SHARE_KEY = "decision_share"
KEYS = frozenset({FORMAT_KEY, SOURCE_KEY, EXAMPLES_KEY, CLASS_SHARE_KEY, CONFIDENCE_MEAN_KEY, CONFIDENCE_SHARE_KEY})
OPTIONAL_KEYS = frozenset({DECISION_SHARE_KEY})

INF_LABEL = "+Inf"  # Prometheus' name for the last bucket's bound
# Shares are written as exact ratios; summing ten of them may be off by a few ulps, never by this.
SHARE_TOLERANCE = 1e-6


def profile_path(saved_model_dir: str) -> str:
    return os.path.join(saved_model_dir, PROFILE_DIR, PROFILE_FILE)


def reference_profile(probabilities: np.ndarray, source: str = SOURCE, decisions: np.ndarray | None = None) -> dict[str, Any]:
    """The profile of a model's class probabilities [N, NUM_CLASSES] on N examples (and, for a model
    that decides, the share of each decision code of its `decisions` [N]).

    Confidence is the top-class probability; its shares are cumulative (<= le), with the `le`
    labels of `monitoring.names.CONFIDENCE_BUCKETS` as serving's live histogram prints them, so
    the reference and the live histogram compare bucket for bucket.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)  # exact for float32 model outputs
    if probabilities.ndim != 2 or probabilities.shape[1] != NUM_CLASSES:
        raise ValueError(f"expected probabilities of shape [N, {NUM_CLASSES}], got {list(probabilities.shape)}")
    examples = probabilities.shape[0]
    if examples == 0:
        raise ValueError("a reference profile needs at least one example")
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("probabilities contain NaN or infinite values")
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    counts = np.bincount(predicted, minlength=NUM_CLASSES)
    cumulative = {bucket_label(bound): int(np.count_nonzero(confidence <= bound)) / examples
                  for bound in CONFIDENCE_BUCKETS}
    cumulative[INF_LABEL] = 1.0
    profile = {
        FORMAT_KEY: FORMAT,
        SOURCE_KEY: source,
        EXAMPLES_KEY: int(examples),
        CLASS_SHARE_KEY: {name: int(count) / examples for name, count in zip(CLASS_NAMES, counts)},
        CONFIDENCE_MEAN_KEY: float(confidence.mean()),
        CONFIDENCE_SHARE_KEY: cumulative,
    }
    if decisions is not None:
        decisions = np.asarray(decisions).reshape(-1)
        if decisions.shape[0] != examples:
            raise ValueError(f"{decisions.shape[0]} decisions for {examples} examples")
        codes = np.bincount(decisions.astype(np.int64), minlength=len(DECISIONS))
        if codes.shape[0] != len(DECISIONS):
            raise ValueError(f"decision codes beyond {list(DECISIONS)}")
        profile[DECISION_SHARE_KEY] = {name: int(count) / examples for name, count in zip(DECISIONS, codes)}
    return profile


def to_json(profile: Mapping[str, Any]) -> str:
    """The file's text: keys sorted, so the same profile is always the same bytes."""
    return json.dumps(profile, sort_keys=True, indent=1) + "\n"


def write_reference_profile(saved_model_dir: str, probabilities: np.ndarray, decisions: np.ndarray | None = None) -> str:
    """Writes the profile of `probabilities` (and `decisions`) beside a SavedModel (a local path or a URI)
    and returns its path."""
    import tensorflow as tf  # only the writer needs gfile (gs:// serving dirs); readers stay TensorFlow-free

    if not tf.io.gfile.exists(os.path.join(saved_model_dir, "saved_model.pb")):
        raise ValueError(f"not a SavedModel directory (no saved_model.pb): {saved_model_dir}")
    text = to_json(reference_profile(probabilities, decisions=decisions))
    path = profile_path(saved_model_dir)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as stream:
        stream.write(text)
    return path


def read_reference_profile(saved_model_dir: str) -> dict[str, Any] | None:
    """The validated profile beside a SavedModel; None if it has none (exported before profiles existed).

    Raises ValueError, naming the file and the problem, if the file is not a valid profile.
    """
    path = profile_path(saved_model_dir)
    data = _read_bytes(path)
    if data is None:
        return None
    try:
        content = json.loads(data)
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError: bytes are decoded here, with the path
        raise ValueError(f"{path}: not JSON ({error})") from None
    try:
        return validate_profile(content)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def validate_profile(content: Any) -> dict[str, Any]:
    """`content` if it is a profile of this format; ValueError saying what is wrong otherwise."""
    if not isinstance(content, dict):
        raise ValueError(f"expected a JSON object, got {type(content).__name__}")
    found = content.get(FORMAT_KEY)
    if not isinstance(found, int) or isinstance(found, bool) or found != FORMAT:
        raise ValueError(f"unsupported format {found!r} (expected {FORMAT})")
    missing, unexpected = sorted(KEYS - content.keys()), sorted(content.keys() - KEYS - OPTIONAL_KEYS)
    if missing or unexpected:
        raise ValueError(f"missing keys {missing}, unexpected keys {unexpected}")
    if not isinstance(content[SOURCE_KEY], str):
        raise ValueError(f"{SOURCE_KEY} must be a string")
    examples = content[EXAMPLES_KEY]
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
        raise ValueError(f"{EXAMPLES_KEY} must be a positive integer, got {examples!r}")
    _check_class_share(content[CLASS_SHARE_KEY])
    if not _is_share(content[CONFIDENCE_MEAN_KEY]):
        raise ValueError(f"{CONFIDENCE_MEAN_KEY} must be a number in [0, 1], got {content[CONFIDENCE_MEAN_KEY]!r}")
    _check_cumulative_share(content[CONFIDENCE_SHARE_KEY])
    if DECISION_SHARE_KEY in content:
        _check_decision_share(content[DECISION_SHARE_KEY])
    return content


def _check_decision_share(shares: Any) -> None:
    if not isinstance(shares, dict) or set(shares) != set(DECISIONS):
        raise ValueError(f"{DECISION_SHARE_KEY} must have exactly the decisions {list(DECISIONS)}")
    if not all(_is_share(share) for share in shares.values()):
        raise ValueError(f"{DECISION_SHARE_KEY} values must be numbers in [0, 1]")
    total = math.fsum(shares.values())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ValueError(f"{DECISION_SHARE_KEY} sums to {total:.9g}, not 1")


def _check_class_share(shares: Any) -> None:
    if not isinstance(shares, dict) or set(shares) != set(CLASS_NAMES):
        raise ValueError(f"{CLASS_SHARE_KEY} must have exactly the classes {list(CLASS_NAMES)}")
    if not all(_is_share(share) for share in shares.values()):
        raise ValueError(f"{CLASS_SHARE_KEY} values must be numbers in [0, 1]")
    total = math.fsum(shares.values())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ValueError(f"{CLASS_SHARE_KEY} sums to {total:.9g}, not 1")


def _check_cumulative_share(shares: Any) -> None:
    """Shares by `le` bound, cumulative as a Prometheus histogram's buckets: non-decreasing, 1 at +Inf."""
    if not isinstance(shares, dict) or shares.get(INF_LABEL) != 1.0:
        raise ValueError(f"{CONFIDENCE_SHARE_KEY} must be an object whose {INF_LABEL!r} share is 1")
    if not all(_is_share(share) for share in shares.values()):
        raise ValueError(f"{CONFIDENCE_SHARE_KEY} values must be numbers in [0, 1]")
    try:
        by_bound = sorted((float(le), share) for le, share in shares.items())  # float("+Inf") is inf
    except ValueError:
        by_bound = [(math.nan, 0.0)]
    if any(math.isnan(bound) for bound, _ in by_bound):
        raise ValueError(f"{CONFIDENCE_SHARE_KEY} keys must be bucket bounds, got {sorted(shares)}")
    ordered = [share for _, share in by_bound]
    if any(later < earlier for earlier, later in zip(ordered, ordered[1:])):
        raise ValueError(f"{CONFIDENCE_SHARE_KEY} is not cumulative (shares decrease as le grows)")


def _is_share(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _read_bytes(path: str) -> bytes | None:
    """A file's content, or None if it does not exist; TensorFlow's gfile only for URIs (gs://...)."""
    if "://" in path:
        import tensorflow as tf

        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path, "rb") as stream:
            return stream.read()
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        return None
