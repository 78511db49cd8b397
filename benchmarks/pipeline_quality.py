"""The default pipeline on the embedded digits, from nothing cached: quality and wall time, in one run.

Writes the embedded sample and its TFRecords to a scratch directory, runs
`digits pipeline run` with its default settings into a fresh pipeline root
(so every component runs), and reads back from MLMD and TFMA:
  - held-out (test split, 1,000 digits) accuracy and macro-F1, blessing and push;
  - wall time of the whole command and of each component.

    .venv/bin/python benchmarks/pipeline_quality.py [--keep DIR] [-- extra `digits pipeline run` options]

Targets (issue 3, 2-core CPU machine, no ImageNet weights): accuracy >= 0.985,
macro-F1 >= 0.985, whole pipeline <= 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_ACCURACY = 0.985
TARGET_F1 = 0.985
TARGET_SECONDS = 20 * 60


def _digits(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "digits", *args], cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("extra", nargs="*", help="options passed on to `digits pipeline run`")
    args = parser.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    work = args.keep or Path(tempfile.mkdtemp(prefix="pipeline-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "pipeline_root"
    if root.exists():
        sys.exit(f"error: {root} exists; give an empty --keep directory so that nothing is cached")

    _digits("data", "sample", "--out", str(work / "mnist-png"))
    _digits("data", "build", str(work / "mnist-png"), "--out", str(work / "tfrecords"), "--quiet")
    started = time.monotonic()
    _digits("pipeline", "run", "--data", str(work / "tfrecords"), "--pipeline-root", str(root),
            "--serving-dir", str(work / "serving_model"), *args.extra)
    wall = time.monotonic() - started

    from pipeline.report import latest_results

    components, evaluation = latest_results(root)
    print(f"\nwhole `digits pipeline run`: {wall:.0f} s ({wall / 60:.1f} min), {os.cpu_count()} cores")
    for component in components:
        print(f"  {component.node_id:<18} {component.state.lower():<9} {component.seconds:7.1f} s")
    if evaluation is None:
        sys.exit("error: the run has no evaluation")
    macro = evaluation.macro
    print(f"held-out: {evaluation.examples:.0f} digits, accuracy {evaluation.accuracy:.4f}, "
          f"macro precision {macro['precision']:.4f}, recall {macro['recall']:.4f}, F1 {macro['f1']:.4f}")
    print(evaluation.summary())
    checks = {
        f"accuracy >= {TARGET_ACCURACY}": evaluation.accuracy >= TARGET_ACCURACY,
        f"macro-F1 >= {TARGET_F1}": macro["f1"] >= TARGET_F1,
        "whole pipeline <= 20 min": wall <= TARGET_SECONDS,
    }
    print("\ntargets")
    for name, met in checks.items():
        print(f"  {'met    ' if met else 'NOT met'}  {name}")
    if args.json:
        args.json.write_text(json.dumps({
            "wall_seconds": wall, "components": {c.node_id: c.seconds for c in components},
            "accuracy": evaluation.accuracy, "macro": macro, "blessed": evaluation.blessed,
            "pushed_version": evaluation.pushed_version, "targets": checks, "options": args.extra}, indent=2))
    print(f"\nartifacts in {work}")


if __name__ == "__main__":
    main()
