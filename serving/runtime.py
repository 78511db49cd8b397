"""TensorFlow's CPU runtime for `digits serve`: which kernels (Eigen or oneDNN) and how many threads.

The tensorflow wheel turns oneDNN's kernels on by default on x86; TF Serving's
official CPU image runs TensorFlow's Eigen kernels (oneDNN builds are separate,
Intel-published images). The server follows the image: measured on this project's
model (benchmarks/serving_latency.py, README), Eigen runs a batch of 16 digits in
0.7-0.75x oneDNN's time and a single digit in 1.2x, so batching pays off under load.
TensorFlow reads the choice once, when it loads, hence `select_kernels` before
anything imports it. The thread pools are TF Serving's
`--tensorflow_intra_op_parallelism` / `--tensorflow_inter_op_parallelism` (0: TF's choice).
"""

from __future__ import annotations

import logging
import os
import sys

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
log = logging.getLogger(__name__)


def select_kernels(onednn: bool) -> None:
    """Chooses oneDNN or Eigen kernels; call it before TensorFlow is imported."""
    if "tensorflow" not in sys.modules:
        os.environ[ONEDNN_ENV] = "1" if onednn else "0"


def apply(onednn: bool, intra_op_threads: int, inter_op_threads: int) -> str:
    """Sets the thread pools (before the first op runs) and says what TensorFlow runs with.

    Warns when the kernels differ from those asked for: TensorFlow was imported before
    `select_kernels` could choose them.
    """
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    running = bool(_pywrap_util_port.IsMklEnabled())
    if running != onednn:
        log.warning("TensorFlow runs with oneDNN kernels %s, not %s as asked: it was loaded before the "
                    "choice was made (set %s=%d before starting Python)", "on" if running else "off",
                    "on" if onednn else "off", ONEDNN_ENV, int(onednn))

    def threads(count: int) -> str:
        return str(count) if count else "TF's default"

    return (f"TensorFlow {tf.__version__}: {'oneDNN' if running else 'Eigen'} kernels, "
            f"intra-op threads {threads(intra_op_threads)}, inter-op threads {threads(inter_op_threads)}")
