"""The numeric precision the Trainer computes in; the exported model is float32 whatever it was.

`mixed_bfloat16` keeps the weights in float32 and computes convolutions in bfloat16. On CPUs with
bfloat16 instructions (AVX512_BF16 or AMX) it trains InceptionV3 1.36x faster on the real input
pipeline alone (benchmarks/training_throughput.py: 191 vs 140 images/s here), ~10 % faster per
epoch inside the pipeline, at some held-out accuracy (docs/training.md, "Faster training"), so float32 stays
the default; elsewhere bfloat16 is emulated and slower, so `auto` takes it only where the CPU has
the instructions. After training, the
weights are copied into a float32 copy of the model, which is what gets exported: the served graph,
its op types and its answers' dtype do not depend on how the model was trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from components.config import TrainerConfig

FLOAT32 = "float32"
MIXED_BFLOAT16 = "mixed_bfloat16"
MIXED_FLOAT16 = "mixed_float16"  # GPUs only: Keras scales the loss; on a CPU float16 is emulated and slow
# CPU flags (Linux /proc/cpuinfo) that make bfloat16 matrix maths native, not emulated.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def resolve(choice: str, flags: set[str] | None = None, gpus: int | None = None) -> str:
    """`auto` -> float32 where there is a GPU (at 75x75 reduced precision measured no faster on one),
    else mixed_bfloat16 on a CPU with bfloat16 instructions, float32 otherwise; others as given, but
    mixed_float16 only with a GPU (ValueError)."""
    if choice not in ("auto", MIXED_FLOAT16):
        return choice
    gpus = gpu_count() if gpus is None else gpus
    if choice == MIXED_FLOAT16:
        if not gpus:
            raise ValueError("precision mixed_float16 needs a GPU, and this Trainer sees none: use float32 or auto")
        return choice
    if gpus:
        return FLOAT32
    flags = cpu_flags() if flags is None else flags
    return MIXED_BFLOAT16 if flags & set(BF16_CPU_FLAGS) else FLOAT32


def pin(config: TrainerConfig) -> TrainerConfig:
    """The configuration with `auto` decided before the pipeline is built, so the cache key names it."""
    return dataclasses.replace(config, precision=resolve(config.precision))


@contextlib.contextmanager
def policy(name: str):
    """Keras' global dtype policy set to `name` while the block builds layers, then put back."""
    import tf_keras as keras

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)
