"""Rule evaluation time of the Prometheus rules before and after issue 22, side by side on one synthetic month.

Before (commit f58f320): every SLI window, the 30-day one included, reads the raw counters:
30 days of `request_latency_bucket`, `_count` and `request_count` of every instance. After (the
rules in monitoring/prometheus/rules/ now): 1d, 3d and 30d divide averages of the recorded
5-minute rates, and every raw window also reads its counters' first values (`counter_rate`).

One run:
  - writes --days of history (default 30) at a 15 s scrape interval for --instances model servers
    (default 3), shaped as TF Serving's exporter writes it (monitoring/names.py): request_count per
    status (error series born at their first increment), request_latency per API with all 33+1
    buckets, `_count` and `_sum` (six significant digits), `up`; a steady rate with a few errors and
    a slow tail; plus the 30 days of recorded 5-minute rates that the new rules average (what a
    Prometheus that had run them for a month holds);
  - backfills it with `promtool tsdb create-blocks-from openmetrics`;
  - for each rule set in turn (old, then new), starts Debian's `prometheus` on loopback on a copy of
    that TSDB topped up to the current time (rules evaluate at "now"), with the rule files only (no
    scrape targets), every group at --interval (the 30-day group runs every 5 m in production; the
    cost of one evaluation does not depend on the interval), and reads each group's and each rule's
    evaluation time from /api/v1/rules after every evaluation: the first is warm-up, the median of
    the next --evaluations is reported;
  - prints both 30-day SLIs as each set computes them, against the synthetic truth.

    .venv/bin/python benchmarks/rule_evaluation.py [--days 30] [--instances 3] [--evaluations 5]

Needs `prometheus` and `promtool` (Debian's 2.42) and git with commit f58f320 (--old-rev) in the
repository. About 2.4 GB of temporary disk per server for the 30-day OpenMetrics file (removed after backfill).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from monitoring import names as n  # noqa: E402
from monitoring import rules as current_rules  # noqa: E402

RULES_PATH = "monitoring/prometheus/rules"
OLD_REV = "f58f320"  # the last commit whose SLI windows all read the raw counters
SCRAPE_S = 15
JOB = n.SERVING_JOB
MODEL = n.DEFAULT_MODEL_NAME
# Per instance: predicts per second by API (REST, gRPC), status/metadata GETs (counted as OK in
# request_count, no latency), and the share of predicts failing with each status.
PREDICT_RATES = (("predict", "REST", 3.0), ("Predict", "GRPC", 5.0))
GET_RATE = 0.2
ERROR_SHARES = {"INVALID_ARGUMENT": 0.004, "NOT_FOUND": 0.0005, "INTERNAL": 0.001, "DEADLINE_EXCEEDED": 0.0005,
                "RESOURCE_EXHAUSTED": 0.0002, "CANCELLED": 0.0005}
# Latency: mostly ~6 ms, and a slow tail (0.5 % around 180 ms) so the latency SLI is not zero.
LATENCY_MIXTURE = ((0.995, 6_000.0, 0.45), (0.005, 180_000.0, 0.6))
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
BACKFILL_TIMEOUT_S = 3600.0


def fail(message: str) -> None:
    sys.exit(f"error: {message}")


def _bucket_shares() -> np.ndarray:
    """The share of predicts in each latency bucket (33 bounds and +Inf), from the latency mixture."""
    def cdf(x: float) -> float:
        return sum(w * 0.5 * (1 + math.erf((math.log(x) - math.log(median)) / (sigma * math.sqrt(2))))
                   for w, median, sigma in LATENCY_MIXTURE)
    below = [cdf(bound) for bound in n.LATENCY_BUCKETS_US] + [1.0]
    return np.diff([0.0, *below])


def _bucket_means() -> np.ndarray:
    """A representative latency per bucket, for `_sum`."""
    bounds = n.LATENCY_BUCKETS_US
    return np.array([bounds[0] / 2] + [math.sqrt(a * b) for a, b in zip(bounds, bounds[1:])] + [bounds[-1] * 1.5])


@dataclass
class Exporters:
    """The series `instances` TF Serving-shaped model servers export, continued chunk by chunk."""

    instances: int
    seed: int = 22
    counters: dict[str, float] = field(default_factory=dict)  # series -> last value; absent = not born yet
    truth: dict[str, float] = field(default_factory=dict)  # events counted since the start, for the check

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.shares = _bucket_shares()
        self.means = _bucket_means()
        self.le = [n.bucket_label(bound) for bound in n.LATENCY_BUCKETS_US] + ["+Inf"]
        self.fast_index = n.LATENCY_BUCKETS_US.index(n.LATENCY_THRESHOLD_US)

    def _write(self, out, series: str, increments: np.ndarray, stamps: list[str], born_at: int | None = None,
               fmt=str) -> None:
        """Add `increments` to the counter's last value and write it from its birth on: a counter series is
        born at its first increment (TF Serving creates it then), a histogram's all at once at scrape `born_at`."""
        last = self.counters.get(series)
        cumulative = np.cumsum(increments) + (last or 0)
        first = 0
        if last is None:
            born = np.flatnonzero(cumulative > 0) if born_at is None else [born_at]
            if not len(born):
                return
            first = int(born[0])
        self.counters[series] = cumulative[-1].item()
        out.write("".join(f"{series} {fmt(v)} {t}\n" for v, t in zip(cumulative[first:].tolist(), stamps[first:])))

    def write(self, out, start: int, steps: int) -> dict[str, np.ndarray]:
        """Write `steps` scrapes from `start` (epoch seconds); return the per-scrape increments, summed over
        instances, that the new rules' recorded 5-minute rates are made of."""
        stamps = [str(start + i * SCRAPE_S) for i in range(steps)]
        agg = {key: np.zeros(steps) for key in ("ok", "fast", "failed", "server", "cancelled")}
        for index in range(self.instances):
            instance = f"10.0.1.{11 + index}:8501"
            where = f'job="{JOB}",instance="{instance}",model_name="{MODEL}"'
            predicts = np.zeros(steps, dtype=np.int64)
            for api, entrypoint, rate in PREDICT_RATES:
                ok = self.rng.poisson(rate * SCRAPE_S, steps)
                predicts += ok
                per_bucket = self.rng.multinomial(ok, self.shares)  # (steps, 34)
                cumulative_le = np.cumsum(per_bucket, axis=1)
                agg["ok"] += ok
                agg["fast"] += cumulative_le[:, self.fast_index]
                labels = f'{where},API="{api}",entrypoint="{entrypoint}"'
                # The histogram appears with its first successful predict, every bucket at once.
                observed = np.flatnonzero(ok > 0)
                if f"{n.REQUEST_LATENCY}_count{{{labels}}}" in self.counters:
                    born_at = 0
                elif observed.size:
                    born_at = int(observed[0])
                else:
                    continue
                for j, le in enumerate(self.le):
                    self._write(out, f'{n.REQUEST_LATENCY}_bucket{{{labels},le="{le}"}}', cumulative_le[:, j], stamps,
                                born_at)
                self._write(out, f"{n.REQUEST_LATENCY}_count{{{labels}}}", ok, stamps, born_at)
                self._write(out, f"{n.REQUEST_LATENCY}_sum{{{labels}}}", per_bucket @ self.means, stamps, born_at,
                            fmt=lambda v: f"{v:.6g}")
            gets = self.rng.poisson(GET_RATE * SCRAPE_S, steps)
            self._write(out, f'{n.REQUEST_COUNT}{{{where},status="OK"}}', predicts + gets, stamps)
            for status, share in ERROR_SHARES.items():
                counts = self.rng.poisson(predicts * share)
                self._write(out, f'{n.REQUEST_COUNT}{{{where},status="{status}"}}', counts, stamps)
                agg["failed"] += counts
                if status in n.SERVER_ERROR_STATUSES:
                    agg["server"] += counts
                if status in n.ABANDONED_STATUSES:
                    agg["cancelled"] += counts
            out.write("".join(f'up{{job="{JOB}",instance="{instance}"}} 1 {t}\n' for t in stamps))
        for key, values in agg.items():
            self.truth[key] = self.truth.get(key, 0) + float(values.sum())
        return agg


def write_recorded(out, start: int, agg: dict[str, np.ndarray]) -> None:
    """The 5-minute rates the new rules record every 15 s and average over 1d, 3d and 30d."""
    window = 300 // SCRAPE_S

    def rate5m(increments: np.ndarray) -> np.ndarray:
        return np.convolve(increments, np.ones(window))[:len(increments)] / 300

    answered = rate5m(agg["ok"] + agg["cancelled"])
    series = {
        current_rules.predicts(current_rules.BASE_WINDOW): rate5m(agg["ok"] + agg["failed"]),
        current_rules.bad_events(n.AVAILABILITY, current_rules.BASE_WINDOW): rate5m(agg["server"]),
        current_rules.events(n.LATENCY, current_rules.BASE_WINDOW): answered,
        current_rules.bad_events(n.LATENCY, current_rules.BASE_WINDOW): np.maximum(answered - rate5m(agg["fast"]), 0),
    }
    for name, values in series.items():
        out.write("".join(f'{name}{{job="{JOB}",model_name="{MODEL}"}} {v:.6g} {start + i * SCRAPE_S}\n'
                          for i, v in enumerate(values.tolist()) if i >= window))


def _run(command: list[str], timeout: float, what: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        fail(f"{command[0]} not found: apt-get install -y --no-install-recommends prometheus")
    except subprocess.TimeoutExpired:
        fail(f"{what} took longer than {timeout:.0f} s")
    if done.returncode != 0:
        fail(f"{what} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


def backfill(path: Path, tsdb: Path) -> None:
    # Blocks as long as promtool allows (1458 h), so that it reads the file once per block, not once per 2 h.
    _run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "--quiet", "--max-block-duration=1500h",
          str(path), str(tsdb)], BACKFILL_TIMEOUT_S, "promtool tsdb create-blocks-from openmetrics")


def old_rule_files(rev: str) -> dict[str, str]:
    """The rule files as they were at `rev` (the generated YAML the generator of that commit committed)."""
    try:
        listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}:{RULES_PATH}"],
                                 capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        fail("git not found: the old rules are read from the repository's history")
    if listing.returncode != 0:
        fail(f"commit {rev} is not in this repository's history (a shallow clone?): {listing.stderr.strip()}")
    files = {}
    for name in listing.stdout.split():
        if name.endswith(".yml"):
            files[name] = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{RULES_PATH}/{name}"],
                                         capture_output=True, text=True, timeout=60, check=True).stdout
    return files


def new_rule_files() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted((REPO / RULES_PATH).glob("*.yml"))}


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


def write_rules(files: dict[str, str], directory: Path, interval: str) -> dict[str, int]:
    """The rule files with every group evaluated every `interval`; each group's shipped interval (seconds)."""
    directory.mkdir(parents=True)
    shipped = yaml.safe_load((REPO / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    default = _seconds(shipped["global"]["evaluation_interval"])
    groups = {}
    for name, text in files.items():
        document = yaml.safe_load(text)
        for group in document["groups"]:
            groups[group["name"]] = _seconds(group["interval"]) if "interval" in group else default
            group["interval"] = interval
        (directory / name).write_text(yaml.safe_dump(document, sort_keys=False))
    return groups


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@dataclass
class Measured:
    groups: dict[str, list[float]]  # group -> evaluation seconds, one per evaluation measured
    intervals: dict[str, int]  # group -> seconds between evaluations as shipped
    rules: dict[tuple[str, int], tuple[str, list[float]]]  # (group, index) -> (rule name, seconds)
    slis: dict[str, float]
    rss_mb: float


def measure(name: str, files: dict[str, str], history: Path, history_end: int, exporters: Exporters,
            work: Path, interval_s: int, evaluations: int) -> Measured:
    """Evaluate one rule set on a copy of the history topped up to now, `evaluations` times after a warm-up."""
    run = work / name
    tsdb = run / "tsdb"
    shutil.copytree(history, tsdb)
    # Continue the history up to the current time, so that "now" has fresh samples as a live server's would.
    end = int(time.time()) // SCRAPE_S * SCRAPE_S
    tail = run / "tail.om"
    with tail.open("w") as out:
        copy.deepcopy(exporters).write(out, history_end + SCRAPE_S, (end - history_end) // SCRAPE_S)
        out.write("# EOF\n")
    backfill(tail, tsdb)
    tail.unlink()
    groups = write_rules(files, run / "rules", f"{interval_s}s")
    config = run / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"evaluation_interval": f"{interval_s}s"},
                                      "rule_files": [str(run / "rules" / "*.yml")]}))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (run / "prometheus.log").open("w")
    process = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
         "--storage.tsdb.retention.time=400d", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                fail(f"prometheus ({name} rules) exited with {process.returncode}: see {run / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                fail(f"prometheus ({name} rules) not ready after {START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        seen: dict[str, str] = {}
        group_times: dict[str, list[float]] = {group: [] for group in groups}
        rule_times: dict[tuple[str, int], tuple[str, list[float]]] = {}
        wanted = evaluations + 1  # the first evaluation is warm-up
        deadline = time.monotonic() + (wanted + 2) * interval_s * 4 + 60
        while min(len(times) for times in group_times.values()) < wanted:
            if time.monotonic() > deadline:
                fail(f"{name} rules: fewer than {wanted} evaluations of every group by the deadline "
                     f"({ {g: len(t) for g, t in group_times.items()} })")
            if process.poll() is not None:
                fail(f"prometheus ({name} rules) exited with {process.returncode}: see {run / 'prometheus.log'}")
            for group in _get(f"{base}/api/v1/rules")["data"]["groups"]:
                last = group["lastEvaluation"]
                if last.startswith("0001") or seen.get(group["name"]) == last:
                    continue
                seen[group["name"]] = last
                for rule in group["rules"]:
                    if rule["health"] == "err":
                        fail(f"{name} rules: {rule['name']} in {group['name']} failed: {rule.get('lastError')}")
                times = group_times[group["name"]]
                if len(times) >= wanted:
                    continue
                times.append(group["evaluationTime"])
                for index, rule in enumerate(group["rules"]):
                    rule_times.setdefault((group["name"], index), (rule["name"], []))[1].append(rule["evaluationTime"])
                print(f"  {name}: {group['name']} evaluation {len(times)}/{wanted}: "
                      f"{1000 * group['evaluationTime']:.1f} ms", flush=True)
            time.sleep(1.0)
        slis = {}
        for slo in n.SLOS:
            record = current_rules.ratio(slo, slo.window)
            result = _get(f"{base}/api/v1/query?query={urllib.request.quote(record)}")["data"]["result"]
            slis[record] = float(result[0]["value"][1]) if result else float("nan")
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        rss = next(float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith("process_resident_memory_bytes "))
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
        log.close()
    shutil.rmtree(tsdb)
    return Measured({g: t[1:] for g, t in group_times.items()}, groups,
                    {key: (rule, t[1:]) for key, (rule, t) in rule_times.items()}, slis, rss / 2**20)


def _ms(seconds: list[float]) -> float:
    return 1000 * statistics.median(seconds) if seconds else float("nan")


def report(old: Measured, new: Measured, exporters: Exporters) -> dict:
    figures: dict = {"groups": {}, "sli_windows": {}, "rules_30d": {}}
    print("\nrule group evaluation time, median (ms); evaluation seconds per hour at the shipped intervals")
    print(f"  {'group':20s} {'old':>8s} {'new':>8s} {'new/old':>8s} {'interval':>9s} {'old s/h':>8s} {'new s/h':>8s}")
    per_hour = {"old": 0.0, "new": 0.0}
    for group in dict.fromkeys([*old.groups, *new.groups]):
        o, w = _ms(old.groups.get(group, [])), _ms(new.groups.get(group, []))
        interval = new.intervals.get(group) or old.intervals[group]
        hourly = {label: ms / 1000 * 3600 / m.intervals[group] if group in m.intervals else 0.0
                  for label, ms, m in (("old", o, old), ("new", w, new))}
        for label, seconds in hourly.items():
            per_hour[label] += seconds
        figures["groups"][group] = {"old_ms": o if o == o else None, "new_ms": w, "interval_s": interval,
                                    "old_s_per_hour": hourly["old"], "new_s_per_hour": hourly["new"]}
        print(f"  {group:20s} {o:8.1f} {w:8.1f} {w / o if o == o and w == w else float('nan'):8.2f} "
              f"{interval:8d}s {hourly['old']:8.1f} {hourly['new']:8.1f}")
    figures["s_per_hour"] = per_hour
    print(f"  {'all groups':20s} {'':8s} {'':8s} {'':8s} {'':9s} {per_hour['old']:8.1f} {per_hour['new']:8.1f}")

    def window_ms(measured: Measured, group: str, window: str) -> float:
        return sum(_ms(times) for (g, _), (rule, times) in measured.rules.items()
                   if g == group and rule.startswith("job_model:") and rule.endswith(f"rate{window}"))

    print("\nSLI rules (job_model:...) per window, sum of the rules' medians (ms)")
    for window in (*current_rules.SLI_WINDOWS, n.SLO_WINDOW):
        group = "digits-slo-budget" if window == n.SLO_WINDOW else "digits-sli"
        o, w = window_ms(old, group, window), window_ms(new, group, window)
        figures["sli_windows"][window] = {"old_ms": o, "new_ms": w}
        print(f"  {window:4s} {o:8.1f} {w:8.1f}")
    print("\n30-day rules, median (ms)")
    for label, measured in (("old", old), ("new", new)):
        for (_, _), (rule, times) in measured.rules.items():
            if rule.endswith(f"rate{n.SLO_WINDOW}"):
                figures["rules_30d"][f"{label} {rule}"] = _ms(times)
                print(f"  {label}  {rule:45s} {_ms(times):8.1f}")
    for label, measured in (("old", old), ("new", new)):
        print(f"\nmost expensive {label} rules, median (ms)")
        ranked = sorted(((_ms(t), g, r) for (g, _), (r, t) in measured.rules.items()), reverse=True)[:6]
        for ms, group, rule in ranked:
            print(f"  {ms:10.2f}  {group:18s} {rule}")
    truth = exporters.truth
    expected = {current_rules.ratio(n.AVAILABILITY, n.SLO_WINDOW): truth["server"] / (truth["ok"] + truth["failed"]),
                current_rules.ratio(n.LATENCY, n.SLO_WINDOW):
                    1 - truth["fast"] / (truth["ok"] + truth["cancelled"])}
    print("\n30-day SLIs (the old latency SLI does not count abandoned requests as slow)")
    for record, value in expected.items():
        print(f"  {record:40s} old {old.slis.get(record, float('nan')):.5f}  new {new.slis.get(record, float('nan')):.5f}"
              f"  synthetic {value:.5f}")
    print(f"\nprometheus resident memory after the run: old {old.rss_mb:.0f} MB, new {new.rss_mb:.0f} MB")
    figures["slis"] = {"old": old.slis, "new": new.slis, "synthetic": expected}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=30.0, help="days of history (the SLO window is 30)")
    parser.add_argument("--instances", type=int, default=3, help="model servers in the history")
    parser.add_argument("--evaluations", type=int, default=5, help="evaluations measured per group, after one warm-up")
    parser.add_argument("--interval", type=int, default=15, help="seconds between evaluations of every group")
    parser.add_argument("--old-rev", default=OLD_REV, help="the commit whose rules are the 'old' set")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.days <= 0 or args.instances < 1 or args.evaluations < 1 or args.interval < 1:
        fail("--days, --instances, --evaluations and --interval must be positive")
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            fail(f"{tool} not found: apt-get install -y --no-install-recommends prometheus")
    old_files, new_files = old_rule_files(args.old_rev), new_rule_files()
    with tempfile.TemporaryDirectory(prefix="rule-evaluation-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        exporters = Exporters(args.instances)
        steps = int(args.days * 86400) // SCRAPE_S
        end = int(time.time()) // SCRAPE_S * SCRAPE_S
        start = end - steps * SCRAPE_S
        history_file, history = work / "history.om", work / "history"
        began = time.monotonic()
        print(f"writing {args.days:g} days x {args.instances} instances at {SCRAPE_S} s ...", flush=True)
        with history_file.open("w") as out:
            day = 86400 // SCRAPE_S
            for chunk_start in range(0, steps, day):
                chunk = min(day, steps - chunk_start)
                agg = exporters.write(out, start + chunk_start * SCRAPE_S, chunk)
                write_recorded(out, start + chunk_start * SCRAPE_S, agg)
                print(f"  day {chunk_start // day + 1}/{math.ceil(steps / day)}", flush=True)
            out.write("# EOF\n")
        size_gb = history_file.stat().st_size / 1e9
        print(f"  {size_gb:.1f} GB of OpenMetrics in {time.monotonic() - began:.0f} s; backfilling ...", flush=True)
        began = time.monotonic()
        backfill(history_file, history)
        history_file.unlink()
        blocks = sum(f.stat().st_size for f in history.rglob("*") if f.is_file()) / 2**20
        print(f"  TSDB of {blocks:.0f} MB in {time.monotonic() - began:.0f} s", flush=True)
        print(f"old rules ({args.old_rev}): {', '.join(old_files)}", flush=True)
        old = measure("old", old_files, history, end - SCRAPE_S, exporters, work, args.interval, args.evaluations)
        print(f"new rules (working tree): {', '.join(new_files)}", flush=True)
        new = measure("new", new_files, history, end - SCRAPE_S, exporters, work, args.interval, args.evaluations)
    figures = report(old, new, exporters)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
