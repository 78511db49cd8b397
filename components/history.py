"""The training history file: what the Trainer writes beside its model run and the run report reads.

`history.json` in the Trainer's model_run artifact holds the per-epoch metrics Keras
recorded, how training went (epochs run, steps, base weights) and the settings used.
"""

from __future__ import annotations

import json
import os

HISTORY_FILE = "history.json"


def history_path(model_run_dir: str) -> str:
    return os.path.join(model_run_dir, HISTORY_FILE)


def write_history(model_run_dir: str, document: dict) -> str:
    """Writes the history (through tf.io.gfile, so a gs:// model run directory works too)."""
    import tensorflow as tf

    path = history_path(model_run_dir)
    tf.io.gfile.makedirs(model_run_dir)
    with tf.io.gfile.GFile(path, "w") as stream:
        json.dump(document, stream, indent=2)
    return path


def read_history(model_run_dir: str) -> dict | None:
    """The history a Trainer wrote in `model_run_dir`, or None if it wrote none (it failed first)."""
    import tensorflow as tf

    path = history_path(model_run_dir)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as stream:
        return json.load(stream)
