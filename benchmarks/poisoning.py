"""A flood of wrong labels through the public web API, with and without review: what reaches training,
what the retrained model learns, and what the gates do.

The attacker takes 8s (variants of the embedded training split's 8s: thicker, thinner, rotated,
photographed, ...), has each classified through `digits web` in front of `digits serve` and
"corrects" it to a 3. The web app runs with its caps raised (an attacker with many addresses; one
address gets --pending-per-client, 100 by default, then 429). Then, side by side:

  - review on (the default): the flood waits in pending/; a build with `--extra-source` counts it
    and trains on none of it: its shards are byte-identical to a build without the feedback tree.
  - no review (every correction accepted, as a project without review does): the flood joins the
    train split as 3s; `digits pipeline run` retrains on it in the given pipeline root, so the
    Evaluator compares the candidate with the latest blessed model there, and the blessing gates
    (overall and per-digit recall floors, and their regression against the baseline) decide.
    Its pushes go to a scratch serving directory, never to the one being served.

    .venv/bin/python benchmarks/poisoning.py [--flood 360 ...] [--pipeline-root pipeline_root]
        [--model-dir serving_model/digits] [--source data/mnist-png] [--data data/tfrecords]
        [--keep DIR] [--json FILE] [--no-retrain] [-- extra options for `digits pipeline run`]

A retrain is the whole pipeline (~15 minutes on 2 cores) per flood size.
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

ATTACKED, CLAIMED = 8, 3  # every 8 sent as a 3
VARIANTS = ("as is", "thick strokes", "thin strokes", "rotated <= 15 deg", "paper photo", "small in canvas",
            "JPEG q30", "low contrast")
TOKEN = "benchmark-review-token-0123456789"


def _attack_images(source: Path, count: int) -> list[bytes]:
    """`count` encoded images of 8s, made from the training split's 8s by the variants in turn."""
    import numpy as np
    from PIL import Image

    from data import contract
    from data.variants import make_variant

    paths = sorted((source / contract.TRAINING_DIR / str(ATTACKED)).glob("*.png"))
    digits = np.stack([np.asarray(Image.open(path).convert("L")) for path in paths])
    images: list[bytes] = []
    for round_, name in enumerate(VARIANTS * (count // (len(VARIANTS) * len(digits)) + 1)):
        images.extend(make_variant(name, digits, seed=round_))
        if len(images) >= count:
            break
    # Interleave the variants, so that a smaller flood is a mix too.
    per = len(digits)
    order = [index for offset in range(per) for index in range(offset, len(images), per)]
    return [images[index] for index in order][:count]


def flood(app_url: str, images: list[bytes]) -> dict:
    """Each image classified, then corrected to CLAIMED; what the app answered."""
    import requests

    outcome = {"sent": len(images), "queued": 0, "answered_as_claimed": 0, "refused": {}, "seconds": 0.0}
    started = time.monotonic()
    with requests.Session() as session:
        for image in images:
            answer = session.post(f"{app_url}/api/predict", data=image, timeout=60)
            answer.raise_for_status()
            judged = session.post(f"{app_url}/api/feedback", json={"id": answer.json()["id"], "digit": CLAIMED},
                                  timeout=30)
            if judged.status_code != 200:
                outcome["refused"][str(judged.status_code)] = outcome["refused"].get(str(judged.status_code), 0) + 1
            elif judged.json()["right"]:
                outcome["answered_as_claimed"] += 1  # the model already said 3: nothing stored
            else:
                outcome["queued"] += 1
    outcome["seconds"] = round(time.monotonic() - started, 1)
    return outcome


def _build(options: dict, source: Path, output: Path, extra: Path | None) -> dict:
    from tfrecord_builder.builder import build
    from tfrecord_builder.config import BuildConfig

    config = BuildConfig(source=source, output=output, overwrite=True, extra_sources=(extra,) if extra else (),
                         **options)
    return build(config).manifest


def _shards(manifest: dict) -> list[str]:
    return [shard["sha256"] for split in manifest["splits"].values() for shard in split["shards"]]


def retrain(records: Path, pipeline_root: Path, serving: Path, extra: list[str]) -> dict:
    """`digits pipeline run` on the poisoned records; what the Evaluator and the gates decided."""
    from pipeline.report import latest_results

    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "digits", "pipeline", "run", "--data", str(records),
                    "--pipeline-root", str(pipeline_root), "--serving-dir", str(serving), *extra],
                   cwd=REPO, check=True)
    _, evaluation = latest_results(pipeline_root)
    if evaluation is None:
        sys.exit(f"error: the run in {pipeline_root} has no evaluation")
    matrix = evaluation.matrix
    eights = matrix[ATTACKED].sum()
    recall = evaluation.per_class["recall"]
    return {"seconds": round(time.monotonic() - started), "accuracy": round(float(evaluation.accuracy), 4),
            "recall": {str(digit): round(float(value), 4) for digit, value in enumerate(recall)},
            "eights_answered_as_claimed": round(float(matrix[ATTACKED, CLAIMED] / eights), 4),
            "blessed": evaluation.blessed, "has_baseline": evaluation.has_baseline,
            "failures": evaluation.failures, "pushed": evaluation.pushed_version is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, action="append", default=[],
                        help="wrong corrections sent (repeatable: one retrain each; default 360, as many as "
                             "the train split's own 8s)")
    parser.add_argument("--pipeline-root", type=Path, default=REPO / "pipeline_root",
                        help="where the no-review retrain runs: its latest blessed model is the baseline")
    parser.add_argument("--model-dir", type=Path, default=REPO / "serving_model" / "digits",
                        help="the served model's base path (what the attacker talks to)")
    parser.add_argument("--source", type=Path, default=REPO / "data" / "mnist-png")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "tfrecords",
                        help="the build whose options the builds here repeat")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--no-retrain", action="store_true", help="stop before the retrains")
    parser.add_argument("extra", nargs="*", help="options passed on to `digits pipeline run`")
    args = parser.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from serving.process import start_server
    from tfrecord_builder.builder import _OUTPUT_OPTIONS
    from web.feedback import ACCEPTED, FeedbackStore
    from web.process import start_web

    sizes = args.flood or [360]
    work = args.keep or Path(tempfile.mkdtemp(prefix="poisoning-"))
    work.mkdir(parents=True, exist_ok=True)
    recorded = json.loads((args.data / "manifest.json").read_text())["options"]
    options = {name: recorded[name] for name in _OUTPUT_OPTIONS if name != "extra_sources" and name in recorded}
    plain = _build(options, args.source, work / "plain", None)
    results = []
    for size in sizes:
        feedback = work / f"feedback-{size}"
        images = _attack_images(args.source, size)
        print(f"flood of {size}: each an 8 sent as a 3 through the web API ...", flush=True)
        with start_server(args.model_dir) as server, \
                start_web("--serving-url", server.rest_url, "--feedback-dir", feedback, "--max-pending", "1000000",
                          "--pending-per-client", "1000000") as app:
            sent = flood(app.url, images)
        reviewed = _build(options, args.source, work / f"reviewed-{size}", feedback)
        result = {"flood": size, "sent": sent,
                  "review_on": {"corrections": reviewed["extra_sources"][0]["corrections"],
                                "train_split_unchanged": _shards(reviewed) == _shards(plain)}}
        store = FeedbackStore(feedback)
        for proposal in store.pending():
            store.review(proposal.id, ACCEPTED, reviewer="nobody (no review)")
        poisoned = _build(options, args.source, work / f"poisoned-{size}", feedback)
        result["no_review"] = {"corrections": poisoned["extra_sources"][0]["corrections"],
                               "train_per_class": poisoned["splits"]["train"]["per_class"]}
        print(json.dumps(result, indent=1), flush=True)
        if not args.no_retrain:
            print(f"retraining on the {size} accepted wrong labels in {args.pipeline_root} ...", flush=True)
            result["no_review"]["retrained"] = retrain(work / f"poisoned-{size}", args.pipeline_root,
                                                       work / f"serving-{size}", args.extra)
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)

    print("\nflood  queued  review on: in training  train split unchanged  |  no review: acc.  recall 8  "
          "8s answered 3  blessed  gates that refused")
    for result in results:
        retrained = result["no_review"].get("retrained")
        tail = "(not retrained)" if retrained is None else (
            f"{retrained['accuracy']:.4f}  {retrained['recall'][str(ATTACKED)]:.3f}  "
            f"{retrained['eights_answered_as_claimed']:.1%}  {'yes' if retrained['blessed'] else 'no'}  "
            f"{'; '.join(retrained['failures']) or '-'}")
        print(f"{result['flood']:>5}  {result['sent']['queued']:>6}  "
              f"{result['review_on']['corrections']['accepted']:>20}  "
              f"{str(result['review_on']['train_split_unchanged']):>20}  |  {tail}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"work directory: {work}")


if __name__ == "__main__":
    main()
