"""The default pipeline on the embedded digits, from nothing cached: quality and wall time, side by side.

Writes the embedded sample and its TFRecords to a scratch directory once, then runs
`digits pipeline run` into a fresh pipeline root per run (so every component runs) and
reads back from MLMD and TFMA:
  - held-out (test split, 1,000 digits) accuracy and macro-F1, blessing and push;
  - wall time of the whole command and of each component.
Settings (named sets of `digits pipeline run` options) and repeats run one after the
other in one invocation, and one table compares them:

    .venv/bin/python benchmarks/pipeline_quality.py [--keep DIR] [--json FILE] [--repeat N]
        [--setting NAME=OPTIONS ...] [-- extra options for every run]

e.g. --setting "26 epochs=--epochs 26" --setting "18 epochs=--epochs 18" --repeat 3 (a setting
given more than once also runs more than once).
Without --setting: the defaults. Targets (issue 11, 2-core CPU machine, no ImageNet
weights): accuracy and macro-F1 >= 0.985 in every run, whole pipeline <= 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_ACCURACY = 0.985
TARGET_F1 = 0.985
TARGET_SECONDS = 10 * 60


def _digits(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "digits", *args], cwd=REPO, check=True)


def _setting(text: str) -> tuple[str, list[str]]:
    name, _, options = text.partition("=")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"a setting is NAME=OPTIONS, got {text!r}")
    return name.strip(), shlex.split(options)


def run_once(work: Path, tfrecords: Path, options: list[str]) -> dict:
    """One fresh `digits pipeline run` in `work`; its figures."""
    from pipeline.report import latest_results

    root = work / "pipeline_root"
    started = time.monotonic()
    _digits("pipeline", "run", "--data", str(tfrecords), "--pipeline-root", str(root),
            "--serving-dir", str(work / "serving_model"), *options)
    wall = time.monotonic() - started
    components, evaluation = latest_results(root)
    if evaluation is None:
        sys.exit(f"error: the run in {work} has no evaluation")
    return {"wall_seconds": wall, "components": {c.node_id: c.seconds for c in components},
            "accuracy": evaluation.accuracy, "macro": evaluation.macro, "blessed": evaluation.blessed,
            "pushed_version": evaluation.pushed_version, "summary": evaluation.summary(), "options": options}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--setting", type=_setting, action="append", default=[],
                        help="NAME=OPTIONS for `digits pipeline run` (repeatable); default: the defaults")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting")
    parser.add_argument("extra", nargs="*", help="options passed on to every `digits pipeline run`")
    args = parser.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    settings = args.setting or [("defaults", [])]
    work = args.keep or Path(tempfile.mkdtemp(prefix="pipeline-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.glob("run-*")):
        sys.exit(f"error: {work} has runs in it; give an empty --keep directory so that nothing is cached")

    _digits("data", "sample", "--out", str(work / "mnist-png"))
    _digits("data", "build", str(work / "mnist-png"), "--out", str(work / "tfrecords"), "--quiet")
    results = []
    runs_of: dict[str, int] = {}  # a setting given twice runs twice, numbered on
    for _ in range(args.repeat):
        for name, options in settings:
            runs_of[name] = runs_of.get(name, 0) + 1
            run_dir = work / f"run-{len(results) + 1}"
            print(f"\n== {name}, run {runs_of[name]}: {' '.join(options + args.extra) or 'defaults'}", flush=True)
            result = run_once(run_dir, work / "tfrecords", options + args.extra)
            result.update(setting=name, run=runs_of[name])
            results.append(result)
            print(result["summary"], flush=True)

    print(f"\n{os.cpu_count()} cores; targets: accuracy and macro-F1 >= {TARGET_ACCURACY}, "
          f"whole pipeline <= {TARGET_SECONDS // 60} min\n")
    print("| setting | run | Trainer | whole pipeline | held-out accuracy | macro-F1 | blessed | targets |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for result in results:
        met = (result["accuracy"] >= TARGET_ACCURACY and result["macro"]["f1"] >= TARGET_F1
               and result["wall_seconds"] <= TARGET_SECONDS)
        result["targets_met"] = met
        print(f"| {result['setting']} | {result['run']} | {result['components'].get('Trainer', 0):.0f} s | "
              f"{result['wall_seconds']:.0f} s ({result['wall_seconds'] / 60:.1f} min) | {result['accuracy']:.4f} | "
              f"{result['macro']['f1']:.4f} | {'yes' if result['blessed'] else 'no'} | "
              f"{'met' if met else '**not met**'} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\nartifacts in {work}")


if __name__ == "__main__":
    main()
