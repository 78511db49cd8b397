"""The CPU runtime of `digits serve`: TensorFlow's kernels (Eigen or oneDNN), its threads, Python's GIL.

The tensorflow wheel turns oneDNN's kernels on by default on x86; TF Serving's
official CPU image runs TensorFlow's Eigen kernels (oneDNN builds are separate,
Intel-published images). The server follows the image: measured on this project's
model (benchmarks/serving_latency.py, docs/performance.md), Eigen runs a batch of 16 digits in
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
# How long a Python thread may hold the GIL while others wait for it (Python's default: 5 ms). The
# server's threads each need it only briefly (parse a request, hand a batch to TensorFlow, which
# releases it); with the default, a request waits up to 5 ms behind each thread ahead of it, so
# a stream of cheap hostile requests doubled the p99 of everyone else (docs/performance.md).
GIL_SWITCH_INTERVAL_S = 0.001
# How much lower than the rest of the server TensorFlow's compute threads run (a nice increment).
# On a saturated machine the model's compute would otherwise take the cores from the threads that
# accept, parse and answer requests, health checks included; this way those short bursts go first
# and the model gets every cycle they leave (docs/performance.md).
COMPUTE_NICE_INCREMENT = 10
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

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
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
            f"intra-op threads {threads(intra_op_threads)}, inter-op threads {threads(inter_op_threads)}; "
            f"GIL switch interval {1000 * sys.getswitchinterval():g} ms")


def lower_compute_priority(increment: int = COMPUTE_NICE_INCREMENT) -> int:
    """Lowers the scheduling priority of TensorFlow's thread pools; returns how many threads it changed.

    TensorFlow's threads are the process's threads that Python does not know and that carry
    the process's own name (gRPC's and the allocator's have names of their own). Linux only;
    elsewhere, and for threads that have already been lowered, it changes nothing. Call it
    after a model has run once (TensorFlow starts its pools lazily).
    """
    if not sys.platform.startswith("linux") or increment <= 0:
        return 0
    import threading

    python_threads = {thread.native_id for thread in threading.enumerate()}
    base = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        with open("/proc/self/comm") as stream:
            process_name = stream.read().strip()
        tids = [int(entry) for entry in os.listdir("/proc/self/task")]
    except OSError:
        return 0
    changed = 0
    for tid in tids:
        if tid in python_threads:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as stream:
                if stream.read().strip() != process_name:
                    continue
            if os.getpriority(os.PRIO_PROCESS, tid) >= base + increment:
                continue
            os.setpriority(os.PRIO_PROCESS, tid, base + increment)
            changed += 1
        except OSError:  # the thread ended meanwhile
            continue
    return changed
