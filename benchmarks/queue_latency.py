"""The batching queue's wait as load grows: what the autoscaler's custom metric reads.

`digits serve` (default batching settings, the default model) under closed-loop REST load from 1, 4,
16 and 32 clients, --seconds each; for each, requests/s and the mean time a request waited in the
batching queue (TF Serving's :tensorflow:serving:batching_session:queuing_latency, sum / count over
the window, as the Prometheus adapter rule in deploy/k8s/prometheus-adapter/ computes it). The
server runs on loopback as a child process and is stopped by PID.

    .venv/bin/python benchmarks/queue_latency.py [--model-dir serving_model/digits] [--seconds 15]

It sizes the production autoscaler's target (deploy/k8s/overlays/production/horizontalpodautoscaler.yaml):
a wait the server reaches only once its cores are saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def queue_totals(metrics_url: str) -> tuple[float, float]:
    """(sum of waits in microseconds, requests) of the queuing latency histogram."""
    from monitoring import names

    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    totals = []
    for suffix in ("_sum", "_count"):
        pattern = rf"^{re.escape(names.QUEUING_LATENCY + suffix)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$"
        totals.append(sum(float(value) for value in re.findall(pattern, text, re.MULTILINE)))
    return totals[0], totals[1]


def main() -> None:
    from serving.process import start_server
    from serving_latency import _digits, _load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "serving_model" / "digits")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    images = _digits(64)
    with start_server(args.model_dir, cwd=REPO) as server:
        url = server.rest_url
        metrics = f"{server.rest_url}/monitoring/prometheus/metrics"
        asyncio.run(_load(url, images, 4, seconds=3))  # warm up
        print(f"{'clients':>7} {'requests/s':>10} {'mean queue wait':>16}")
        for clients in (1, 4, 16, 32):
            wait_before, count_before = queue_totals(metrics)
            result = asyncio.run(_load(url, images, clients, seconds=args.seconds))
            wait_after, count_after = queue_totals(metrics)
            count = count_after - count_before
            mean_ms = (wait_after - wait_before) / count / 1000 if count else float("nan")
            print(f"{clients:>7} {result['requests_per_s']:>10.0f} {mean_ms:>13.1f} ms  ({result['errors']} errors)",
                  flush=True)


if __name__ == "__main__":
    main()
