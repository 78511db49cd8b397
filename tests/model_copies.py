"""Copies of a served model version whose answers a test chooses (the tiny test model answers one class
for every image, whichever its random initialisation picked)."""

from __future__ import annotations

import shutil
from pathlib import Path

from data import contract

# Added to one class's output bias: far above what the tiny model's other logits reach, so that the
# copy answers that class for every image.
DOMINANT_BIAS = 100.0


def copy_version_answering(source: Path, target: Path, digit: int, raise_by: float = DOMINANT_BIAS) -> Path:
    """Copies the SavedModel `source` to `target` with its output layer's bias for `digit` raised by
    `raise_by` (checkpoint variables rewritten; the graph is unchanged)."""
    import tensorflow as tf

    shutil.copytree(source, target, symlinks=False)
    prefix = str(target / "variables" / "variables")
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    names = sorted(shapes)
    (output_bias,) = [name for name in names
                      if shapes[name] == [contract.NUM_CLASSES] and not name.startswith("optimizer/")]
    values = [reader.get_tensor(name) for name in names]
    values[names.index(output_bias)][digit] += raise_by
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=values)
    return target
