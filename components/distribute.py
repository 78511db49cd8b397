"""How the Trainer spreads over devices: one device, or MirroredStrategy over several GPUs.

With two GPUs or more, each step runs a share of the (global) batch on every GPU and the
gradients are summed across them (all-reduce over NCCL); the model, its optimizer and every
compile happen in the strategy's scope. With one device or none there is nothing to mirror and
Keras' default strategy runs as before. `devices` names them explicitly: the test runs the same
code on two logical CPU devices, as TensorFlow's own distribution tests do without a GPU.
"""

from __future__ import annotations


def strategy(devices: list[str] | None = None):
    """MirroredStrategy over `devices` (default: every visible GPU) when there are two or more,
    else the default strategy."""
    import tensorflow as tf

    if devices is None:
        devices = [device.name for device in tf.config.list_logical_devices("GPU")]
    if len(devices) < 2:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices=devices)
