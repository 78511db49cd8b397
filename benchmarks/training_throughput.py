"""Training throughput on the real input pipeline: oneDNN vs Eigen kernels, float32 vs mixed_bfloat16, side by side.

Each setting runs in its own process (the kernel choice is read when TensorFlow loads): the
training TFRecords are read, parsed, normalised (components.transform.normalize_batch, the
function the Transform graph wraps), augmented as the Trainer does (components.augment) and fed
to the default model (components.model.build_model, random initialisation, batch 64); after
warm-up steps (graph building), STEPS training steps are timed.

    .venv/bin/python benchmarks/training_throughput.py [--data data/tfrecords] [--steps 30]

The issue measured synthetic data: 150 images/s with oneDNN, 94 with Eigen, 150 with
mixed_bfloat16 (these CPUs have AVX512_BF16, no AMX). This re-checks it with the real inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SETTINGS = {
    "oneDNN, float32 (the default)": {"env": {"TF_ENABLE_ONEDNN_OPTS": "1"}, "policy": "float32"},
    "Eigen, float32": {"env": {"TF_ENABLE_ONEDNN_OPTS": "0"}, "policy": "float32"},
    "oneDNN, mixed_bfloat16": {"env": {"TF_ENABLE_ONEDNN_OPTS": "1"}, "policy": "mixed_bfloat16"},
}

CHILD = """
import glob, json, sys, time
import tensorflow as tf
import tf_keras as keras
sys.path.insert(0, {repo!r})
from components.augment import augment_batch, augment_ink
from components.config import TrainerConfig
from components.model import build_model
from components.transform import IMAGE_XF, normalize_batch, to_model_input
from data import contract

policy, steps, warmup, data = {policy!r}, {steps}, {warmup}, {data!r}
keras.mixed_precision.set_global_policy(policy)
config = TrainerConfig()
files = sorted(glob.glob(data + "/train/*.tfrecord.gz"))
spec = {{contract.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
        contract.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}}

def prepare(records):
    parsed = tf.io.parse_example(records, spec)
    normalized, _ = normalize_batch(parsed[contract.IMAGE_KEY])
    normalized = augment_ink(normalized, config.stroke_probability, config.blur_probability)
    images = augment_batch(to_model_input(normalized), config.max_translation, config.max_rotation_degrees)
    return {{IMAGE_XF: images}}, parsed[contract.LABEL_KEY]

dataset = (tf.data.TFRecordDataset(files, compression_type="GZIP").shuffle(4096, seed=1).repeat()
           .batch(config.batch_size, drop_remainder=True).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
           .prefetch(tf.data.AUTOTUNE))
model = build_model(config, None, steps_per_epoch=57)
started = time.perf_counter()
model.fit(dataset, epochs=1, steps_per_epoch=warmup, verbose=0)
warm = time.perf_counter() - started
started = time.perf_counter()
model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
timed = time.perf_counter() - started
print(json.dumps({{"warmup_seconds": warm, "images_per_second": steps * config.batch_size / timed,
                  "step_ms": 1000 * timed / steps}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "tfrecords", help="a `digits data build` output")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (graph building)")
    args = parser.parse_args()
    if not list((args.data / "train").glob("*.tfrecord.gz")):
        sys.exit(f"error: no training TFRecords under {args.data}/train (run `digits data build` first)")
    results = {}
    for name, setting in SETTINGS.items():
        code = CHILD.format(repo=str(REPO), policy=setting["policy"], steps=args.steps, warmup=args.warmup,
                            data=str(args.data))
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **setting["env"]}
        print(f"{name} ...", flush=True)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"error: {name} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    baseline = results["oneDNN, float32 (the default)"]["images_per_second"]
    print(f"\n{os.cpu_count()} cores, batch 64, {args.steps} timed steps after {args.warmup} warm-up steps\n")
    print("| setting | images/s | ms per step | vs default | warm-up (graph building) |")
    print("|---|---:|---:|---:|---:|")
    for name, result in results.items():
        print(f"| {name} | {result['images_per_second']:.0f} | {result['step_ms']:.0f} | "
              f"{result['images_per_second'] / baseline:.2f}x | {result['warmup_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
