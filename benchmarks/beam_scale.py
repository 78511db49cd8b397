"""The pipeline's Beam components at growing data sizes on three Beam runners, side by side in one run.

Sizes: the embedded set (5,000 digits: 3,600 train, 400 eval, 1,000 test), the same records
repeated to the full Kaggle size (70,000) and to ten times that (700,000). Runners: in-process
(`local`), a worker process per core (`local-mp`) and the portable runner with an embedded job
server (`portable`). Each configuration runs in its own process: ImportExampleGen, StatisticsGen
and Transform as the pipeline configures it (analysis only, not materialised) and, with
`--model`, the Evaluator on the test split (up to 70,000 examples: beyond, it is hours here);
wall time per component, and peak memory of the process tree (sampled every 0.2 s, workers
included).

From the two largest sizes: the cost of 1,000 more examples per component, and an ESTIMATE of
what 70,000 and 7,000,000 images need on Dataflow or Flink, assuming that cost (measured on one
core's worth of Beam work) scales linearly and divides over worker cores (a model, not a
measurement).

    .venv/bin/python benchmarks/beam_scale.py [--keep DIR] [--json FILE] [--sizes 5000,70000,700000]
        [--profiles local,local-mp,portable] [--model PIPELINE_ROOT/Trainer/model/N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EMBEDDED = 5000
EVALUATE_UP_TO = 70_000
COMPONENTS = ("ImportExampleGen", "StatisticsGen", "Transform", "Evaluator")


def make_records(work: Path) -> Path:
    """The embedded digits' TFRecords (as `digits data build` writes them)."""
    from data.sample import write_sample
    from tfrecord_builder.builder import build
    from tfrecord_builder.config import BuildConfig

    records = work / "tfrecords-5000"
    if not (records / "manifest.json").exists():
        write_sample(work / "mnist-png")
        build(BuildConfig(source=work / "mnist-png", output=records))
    return records


def scaled_copy(records: Path, total: int, work: Path) -> Path:
    """The records of every split repeated until the whole set has `total` examples (same shard layout)."""
    import tensorflow as tf

    factor = total / EMBEDDED
    target = work / f"tfrecords-{total}"
    if (target / "done").exists():
        return target
    for split_dir in sorted(p for p in records.iterdir() if p.is_dir()):
        rows = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(sorted(map(str, split_dir.glob("*.tfrecord.gz"))),
                                                                  compression_type="GZIP")]
        wanted = round(len(rows) * factor)
        shards = max(1, round(wanted / 5000))
        (target / split_dir.name).mkdir(parents=True, exist_ok=True)
        options = tf.io.TFRecordOptions(compression_type="GZIP")
        writers = [tf.io.TFRecordWriter(str(target / split_dir.name / f"data-{i:05d}-of-{shards:05d}.tfrecord.gz"),
                                        options) for i in range(shards)]
        for i in range(wanted):
            writers[i % shards].write(rows[i % len(rows)])
        for writer in writers:
            writer.close()
    (target / "done").write_text("")
    return target


def run_child(records: Path, root: Path, profile: str, train_examples: int, model: str) -> dict:
    """In a child process: ExampleGen + StatisticsGen + Transform (+ Evaluator) with the profile."""
    from pipeline import beam
    from pipeline.beam_components import run_beam_components
    from pipeline.config import PipelineConfig

    config = PipelineConfig(data_root=records, train_examples=train_examples, pipeline_root=root,
                            beam_pipeline_args=beam.profile_args(profile))
    started = time.monotonic()
    stages = ("statistics", "transform", "evaluate") if model else ("statistics", "transform")
    run = run_beam_components(config, stages, model or None, materialize=False)
    return {"seconds": run.seconds, "wall": time.monotonic() - started}


class TreeMemory:
    """Peak resident memory of a process and all its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        from benchmarks.tfrecord_builder_throughput import tree_rss

        while not self._stop.wait(0.2):
            self.peak = max(self.peak, tree_rss(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(records: Path, root: Path, profile: str, size: int, model: Path | None) -> dict:
    train = round(3600 * size / EMBEDDED)
    model_arg = str(model) if model and size <= EVALUATE_UP_TO else ""
    command = [sys.executable, __file__, "--child", str(records), str(root), profile, str(train), model_arg]
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    memory = TreeMemory(process.pid)
    out, _ = process.communicate(timeout=3 * 3600)
    peak = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{profile} on {size:,} failed (exit {process.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {"profile": profile, "size": size, "peak_mb": peak / 2**20, **result}


def summarize(results: list[dict]) -> None:
    """The comparison table, the growth per 1,000 examples, which runner wins where, the estimate."""
    sizes = sorted({r["size"] for r in results})
    profiles = list(dict.fromkeys(r["profile"] for r in results))

    def cell(r, component):
        return f"{r['seconds'][component]:.1f}" if component in r["seconds"] else "-"

    print("\n| examples | runner | " + " | ".join(f"{c} s" for c in COMPONENTS) + " | peak memory MB |")
    print("|---:|---|" + "---:|" * len(COMPONENTS) + "---:|")
    for r in results:
        print(f"| {r['size']:,} | {r['profile']} | " + " | ".join(cell(r, c) for c in COMPONENTS)
              + f" | {r['peak_mb']:,.0f} |")

    def seconds(profile, size, component):
        return next((r["seconds"].get(component) for r in results if r["profile"] == profile and r["size"] == size),
                    None)

    marginal = {}  # component -> in-process seconds per 1,000 more examples
    for component in COMPONENTS:
        have = sorted(size for size in sizes if seconds("local", size, component) is not None)
        if len(have) >= 2:
            small, large = have[-2], have[-1]
            marginal[component] = ((seconds("local", large, component) - seconds("local", small, component))
                                   / ((large - small) / 1000))
    if marginal:
        print("\nIn-process cost of 1,000 more examples of the data set (between the two largest sizes each was run at): "
              + ", ".join(f"{c} {v:.2f} s" for c, v in marginal.items()))
    for profile in profiles:
        if profile == "local":
            continue
        faster = [size for size in sizes
                  if all(seconds(profile, size, c) is not None for c in ("StatisticsGen", "Transform"))
                  and sum(seconds(profile, size, c) for c in ("ImportExampleGen", "StatisticsGen", "Transform"))
                  < sum(seconds("local", size, c) for c in ("ImportExampleGen", "StatisticsGen", "Transform"))]
        print(f"{profile} beats in-process (ExampleGen + StatisticsGen + Transform) at: "
              + (", ".join(f"{size:,}" for size in faster) if faster else "none of the sizes run"))
    if marginal:
        # In-process Beam runs one bundle at a time, but TensorFlow's inference in the Evaluator uses
        # both cores of this machine: count these as 2-core machine-seconds, i.e. up to 2 core-seconds.
        per_k = sum(marginal.values())
        print(f"\nESTIMATE, not a measurement: {per_k:.2f} s of this 2-core machine per 1,000 images "
              f"({' + '.join(marginal)}; the test split is a fifth of the images), so at most {2 * per_k:.2f} "
              "core-seconds, assumed linear and divided over worker cores, plus each step's fixed start-up:")
        for total in (70_000, 7_000_000):
            core_s = 2 * per_k * total / 1000
            print(f"  {total:>9,} images: {core_s / 3600:.2f} core-hours: one 4-vCPU worker ~{core_s / 4 / 60:.1f} min, "
                  f"10 workers ~{core_s / 40 / 60:.1f} min, plus ~3-5 min of Dataflow worker start-up per step")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="scratch directory to keep (reused: the data is made once)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sizes", default="5000,70000,700000")
    parser.add_argument("--profiles", default="local,local-mp,portable")
    parser.add_argument("--model", type=Path, help="a Trainer model artifact: adds the Evaluator")
    parser.add_argument("--summary", type=Path, help="only print the summary of a --json file written before")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.summary:
        summarize(json.loads(args.summary.read_text()))
        return 0
    if args.child:
        records, root, profile, train, model = args.child
        print(json.dumps(run_child(Path(records), Path(root), profile, int(train), model)))
        return 0

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    work = args.keep or Path(tempfile.mkdtemp(prefix="beam-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    profiles = args.profiles.split(",")
    embedded = make_records(work)
    data = {size: embedded if size == EMBEDDED else scaled_copy(embedded, size, work) for size in sizes}
    results = []
    for size in sizes:
        for profile in profiles:
            print(f"{profile} on {size:,} examples ...", flush=True)
            result = measure(data[size], work / f"root-{profile}-{size}", profile, size, args.model)
            print("  " + ", ".join(f"{c} {result['seconds'][c]:.1f} s" for c in COMPONENTS if c in result["seconds"])
                  + f", peak {result['peak_mb']:,.0f} MB", flush=True)
            results.append(result)

    summarize(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
