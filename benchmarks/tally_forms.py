"""Tally forms read through the model server: synthetic but honest sheets, every figure in one run.

Sheets of `forms/tally.yaml` are filled with the embedded sample's held-out digits only (never a
training digit; forms/synth.py), written right-aligned with some digits across their box's lines,
then photographed badly: skew, perspective, uneven light, paper texture, blur, JPEG, half resolution,
some upside down. A share of the sheets carry a total that does not add up (planted). Each sheet goes
through `digits read`'s own code (forms/reader.py: decode, find the frame, cut the boxes, one request
per sheet) against `digits serve` on loopback, over REST and over gRPC, with --concurrency sheets in
flight. Reported side by side:

  - number-level accuracy (a count read equals what was written) and sheet-level accuracy;
  - the share of consistent sheets accepted automatically, and the error among the numbers of the
    automatically accepted sheets (goal: <= 1 in 10,000);
  - planted inconsistencies caught (goal: all), and how the others went to a person;
  - sheets per second.

    .venv/bin/python benchmarks/tally_forms.py [--model-dir serving_model/digits] [--sheets 1500]

The server runs as a child process and is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass
class Planted:
    image: bytes  # the photo as the reader receives it (JPEG or PNG bytes)
    truth: dict[str, int | None]
    inconsistent: bool
    turned: bool


def make_sheets(count: int, seed: int, wrong_share: float) -> list[Planted]:
    import cv2

    from forms import layout, synth

    form = layout.tally_form()
    rng = np.random.default_rng(seed)
    sheets = []
    for _ in range(count):
        values = synth.random_values(form, rng, wrong_total_share=wrong_share)
        knobs = synth.Degradation.draw(rng)
        photo = synth.photo_sheet(synth.fill_sheet(form, values.values, rng), rng, knobs)
        # degrade() has already JPEG-compressed most photos; what is sent is a file, as a person sends one.
        ok, data = cv2.imencode(".jpg" if knobs.jpeg_quality else ".png", photo.image,
                                [cv2.IMWRITE_JPEG_QUALITY, 95] if knobs.jpeg_quality else [])
        assert ok
        sheets.append(Planted(data.tobytes(), dict(values.values), bool(values.inconsistent), knobs.turned))
    return sheets


@dataclass
class Tally:
    sheets: int = 0
    unreadable: Counter = field(default_factory=Counter)  # geometry refusals by message
    numbers: int = 0
    numbers_right: int = 0
    sheets_right: int = 0
    consistent: int = 0
    consistent_accepted: int = 0
    accepted_numbers: int = 0
    accepted_numbers_wrong: int = 0
    planted: int = 0
    planted_caught: int = 0
    planted_flagged_inconsistent: int = 0
    turned: int = 0
    turned_detected: int = 0
    stood_by: int = 0  # counts whose every box the model accepted
    stood_by_wrong: int = 0  # ... and read wrong: what the sums must catch
    consistent_failed_check: int = 0  # consistent sheets on which a check failed: a wrong reading caught
    review_reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    readings: list = field(default_factory=list)

    def figures(self) -> dict:
        def share(part: int, whole: int) -> float | None:
            return round(part / whole, 5) if whole else None

        return {
            "sheets": self.sheets, "unreadable": dict(self.unreadable),
            "number_accuracy": share(self.numbers_right, self.numbers),
            "sheet_accuracy": share(self.sheets_right, self.sheets),
            "consistent_sheets_accepted": share(self.consistent_accepted, self.consistent),
            "accepted_numbers": self.accepted_numbers, "accepted_numbers_wrong": self.accepted_numbers_wrong,
            "planted": self.planted, "planted_caught": self.planted_caught,
            "planted_flagged_inconsistent": self.planted_flagged_inconsistent,
            "turned": self.turned, "turned_detected": self.turned_detected,
            "stood_by": self.stood_by, "stood_by_wrong": self.stood_by_wrong,
            "consistent_failed_check": self.consistent_failed_check,
            "sheets_per_second": round(self.sheets / self.seconds, 2) if self.seconds else None,
            "review_reasons": dict(self.review_reasons.most_common(8)),
        }


def _reason(problem: str) -> str:
    """A count's problem without its box number and digits: "unsure", "not a digit", "an empty box ..."."""
    text = problem.split(": ", 1)[1] if problem.startswith("box ") else problem
    return text.split(":")[0]


def read_all(sheets: list[Planted], predict, concurrency: int) -> Tally:
    from forms import layout
    from forms.reader import ReadError, decode, read_sheet

    form = layout.tally_form()

    def one(sheet: Planted):
        try:
            return read_sheet(decode(sheet.image), form, predict)
        except ReadError as error:
            return error

    tally = Tally()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, sheets))
    tally.seconds = time.perf_counter() - started
    for sheet, result in zip(sheets, results):
        tally.sheets += 1
        tally.planted += sheet.inconsistent
        tally.consistent += not sheet.inconsistent
        tally.turned += sheet.turned
        if isinstance(result, ReadError):
            tally.unreadable[str(result).split(":")[0]] += 1
            tally.readings.append(None)
            tally.numbers += sum(value is not None for value in sheet.truth.values())
            tally.planted_caught += sheet.inconsistent  # nothing accepted from it
            continue
        reading = result.reading
        values = reading.values()
        tally.readings.append(values)
        tally.turned_detected += sheet.turned and result.turned == 180
        right = [values[count_id] == truth for count_id, truth in sheet.truth.items() if truth is not None]
        tally.numbers += len(right)
        tally.numbers_right += sum(right)
        tally.sheets_right += all(values[count_id] == truth for count_id, truth in sheet.truth.items())
        if reading.accepted:
            tally.consistent_accepted += not sheet.inconsistent
            tally.accepted_numbers += len(values)
            tally.accepted_numbers_wrong += sum(values[k] != v for k, v in sheet.truth.items())
        for count_id, count in reading.counts.items():
            if count.accepted:
                tally.stood_by += 1
                tally.stood_by_wrong += count.value != sheet.truth[count_id]
        tally.consistent_failed_check += not sheet.inconsistent and reading.inconsistent
        if sheet.inconsistent:
            tally.planted_caught += not reading.accepted
            tally.planted_flagged_inconsistent += reading.inconsistent
        for count in reading.counts.values():
            for problem in count.problems:
                tally.review_reasons[_reason(problem)] += 1
        if reading.inconsistent:
            tally.review_reasons["a check fails"] += 1
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "serving_model" / "digits")
    parser.add_argument("--sheets", type=int, default=1500)
    parser.add_argument("--wrong-share", type=float, default=0.1, help="Share of sheets with a planted wrong total.")
    parser.add_argument("--concurrency", type=int, default=2, help="Sheets in flight.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="Also write the figures as JSON here.")
    parser.add_argument("--transport", choices=("both", "REST", "gRPC"), default="both",
                        help="Both side by side (the default), or one: a long run for the error among accepted "
                             "numbers, which the transport does not change, in half the time.")
    args = parser.parse_args()
    if not args.model_dir.is_dir():
        raise SystemExit(f"no model at {args.model_dir}: run the main job (bash .ci/tasks.sh run) first")

    from serving.batch import per_thread
    from serving.client import GrpcClient, RestClient
    from serving.process import start_server

    started = time.perf_counter()
    sheets = make_sheets(args.sheets, args.seed, args.wrong_share)
    print(f"{len(sheets):,} sheets made in {time.perf_counter() - started:.0f} s "
          f"({sum(s.inconsistent for s in sheets)} with a planted wrong total, {sum(s.turned for s in sheets)} "
          f"upside down)", flush=True)
    figures = {}
    with start_server(args.model_dir, cwd=REPO) as server:
        grpc_client = GrpcClient(server.grpc_target)  # one channel for every thread, as gRPC intends
        rest_client = per_thread(lambda: RestClient(server.rest_url))  # a requests.Session per thread
        transports = {"REST": lambda cells: rest_client().predict(cells), "gRPC": grpc_client.predict}
        if args.transport != "both":
            transports = {args.transport: transports[args.transport]}
        for name, predict in transports.items():
            predict([_warm_png()])  # the first call's set-up out of the timing
            tally = read_all(sheets, predict, args.concurrency)
            figures[name] = tally
            print(f"{name}: {json.dumps(tally.figures())}", flush=True)
        grpc_client.close()
    if len(figures) == 2:
        agree = sum(a == b for a, b in zip(figures["REST"].readings, figures["gRPC"].readings))
        print(f"\nREST and gRPC readings identical on {agree:,} of {len(sheets):,} sheets\n")
    rows = [
        ("numbers read right", lambda t: f"{t.numbers_right:,} / {t.numbers:,} ({t.numbers_right / t.numbers:.2%})"),
        ("sheets read right", lambda t: f"{t.sheets_right:,} / {t.sheets:,} ({t.sheets_right / t.sheets:.1%})"),
        ("consistent sheets accepted automatically",
         lambda t: f"{t.consistent_accepted:,} / {t.consistent:,} ({t.consistent_accepted / t.consistent:.1%})"),
        ("wrong among automatically accepted numbers",
         lambda t: f"{t.accepted_numbers_wrong} / {t.accepted_numbers:,}"),
        ("numbers the model stood by that were wrong", lambda t: f"{t.stood_by_wrong} / {t.stood_by:,}"),
        ("... caught by a check on a consistent sheet", lambda t: f"{t.consistent_failed_check} sheets"),
        ("planted wrong totals caught", lambda t: f"{t.planted_caught} / {t.planted} "
                                                  f"({t.planted_flagged_inconsistent} as a failed check)"),
        ("upside-down sheets turned", lambda t: f"{t.turned_detected} / {t.turned}"),
        ("sheets not read (no frame, no boxes)", lambda t: f"{sum(t.unreadable.values())}"),
        ("sheets per second", lambda t: f"{t.sheets / t.seconds:.2f}"),
    ]
    print("| | " + " | ".join(figures) + " |\n|---|" + "---:|" * len(figures))
    for name, show in rows:
        print(f"| {name} | " + " | ".join(show(tally) for tally in figures.values()) + " |")
    first, tally = next(iter(figures.items()))
    print(f"\nwhy counts went to a person ({first}): {dict(tally.review_reasons.most_common(8))}")
    accepted = tally.accepted_numbers
    if accepted and not tally.accepted_numbers_wrong:  # 0 wrong in n: below 3/n at 95 % (the rule of three)
        print(f"0 wrong among {accepted:,} accepted numbers: the error is below {3 / accepted * 1e4:.2f} in 10,000 "
              "(95 %)")
    if args.out:
        args.out.write_text(json.dumps({name: t.figures() for name, t in figures.items()}, indent=1))


def _warm_png() -> bytes:
    from data.sample import encode_png

    return encode_png(np.zeros((28, 28), np.uint8))


if __name__ == "__main__":
    main()
