"""What `digits serve` counts when a request fails: any exception in a gRPC method is INTERNAL and counted,
uploads refused before a handler are counted apart from request_count, and every sample matches its
declaration in monitoring/names.py.

The REST app and the gRPC server are the real ones (serving/rest.py, serving/grpc_service.py) on loopback,
in this process, in front of a model manager that stands in for TensorFlow: no model is loaded, so
the tests can make the service fail where a bug would, and scrape the real metrics page.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import requests

from monitoring import names
from serving_clients import MetricsDelta, b64, declaration_problems, grpc_predict, grpc_status, predict_rest

MAX_BODY_BYTES, BODY_TIMEOUT_S = 2000, 0.5
TIMEOUT_S = 60


class _NoModels:
    """A model manager with no version: what the service asks of it is never reached in these tests."""

    name = names.DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class _Server:
    service: object
    rest_url: str
    grpc_target: str


@contextlib.contextmanager
def _serving(tmp_path) -> Iterator[_Server]:
    """serving/rest.py's app and serving/grpc_service.py's server on loopback ports, over one service."""
    from aiohttp import web

    from serving.config import ServerConfig
    from serving.grpc_service import make_server
    from serving.metrics import ServingMetrics
    from serving.rest import make_app
    from serving.service import PredictionService
    from serving.workers import Workers

    config = ServerConfig(model_base_path=tmp_path, rest_port=0, grpc_port=0, max_body_bytes=MAX_BODY_BYTES,
                          body_timeout_s=BODY_TIMEOUT_S)
    service = PredictionService(_NoModels(), ServingMetrics(), config.max_concurrent_requests)
    workers = Workers(2, "test-rest")
    # The REST app's loop lives in its own thread, set up there too: the main thread may already run one
    # (the session's Playwright browser does, once a test has used it).
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(config, service, workers), access_log=None)
    ready: concurrent.futures.Future[int] = concurrent.futures.Future()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            ready.set_result(runner.addresses[0][1])
        except BaseException as error:  # the test fails with it, not with a timeout
            ready.set_exception(error)
            return
        loop.run_forever()
        loop.run_until_complete(_cancel_all())  # connections aiohttp still lingers on, waiting for a body's rest
        loop.close()

    thread = threading.Thread(target=run, name="test-rest-loop", daemon=True)
    thread.start()
    rest_port = ready.result(TIMEOUT_S)
    grpc_server, grpc_port = make_server(config, service, port=0)
    grpc_server.start()
    try:
        yield _Server(service, f"http://127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}")
    finally:
        grpc_server.stop(None)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT_S)
        workers.stop()


async def _cancel_all() -> None:
    left = asyncio.all_tasks() - {asyncio.current_task()}
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)


def _request_counts(delta: MetricsDelta) -> dict[tuple, float]:
    """request_count's changes, by label set, the unchanged ones left out."""
    label_sets = {*delta.before.get(names.REQUEST_COUNT, {}), *delta.after.get(names.REQUEST_COUNT, {})}
    changes = {labels: delta(names.REQUEST_COUNT, **dict(labels)) for labels in label_sets}
    return {labels: change for labels, change in changes.items() if change}


# -- any exception in any method: INTERNAL, one line, counted ---------------------------------------------------

def test_an_unexpected_exception_is_internal_with_one_line_and_counted_over_grpc_and_rest(tmp_path, monkeypatch,
                                                                                          caplog):
    """A bug (here a RuntimeError from the service's predict, then from its status lookup) is answered
    INTERNAL / 500 with one line naming no more than its type, logged once with its traceback on the
    server, and counted as INTERNAL in request_count, so that the availability SLO sees it."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nwith a second line")

    with _serving(tmp_path) as server, caplog.at_level(logging.ERROR):
        monkeypatch.setattr(server.service, "predict", broken)
        monkeypatch.setattr(server.service, "statuses", broken)
        internal = {"model_name": "digits", "status": "INTERNAL"}

        delta = MetricsDelta(server.rest_url)
        with pytest.raises(grpc.RpcError) as raised:
            grpc_predict(server.grpc_target, [b"an image"], timeout=TIMEOUT_S)
        assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.INTERNAL,
                                                                 "internal error: RuntimeError")
        assert _request_counts(delta.take()) == {tuple(sorted(internal.items())): 1}

        # GetModelStatus is not counted when it answers (nor by TF Serving), but a bug in it is.
        delta = MetricsDelta(server.rest_url)
        with pytest.raises(grpc.RpcError) as raised:
            grpc_status(server.grpc_target, timeout=TIMEOUT_S)
        assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.INTERNAL,
                                                                 "internal error: RuntimeError")
        assert _request_counts(delta.take()) == {tuple(sorted(internal.items())): 1}

        delta = MetricsDelta(server.rest_url)
        response = predict_rest(server.rest_url, [b"an image"], timeout=TIMEOUT_S)
        assert (response.status_code, response.json()) == (500, {"error": "internal error: RuntimeError"})
        assert _request_counts(delta.take()) == {tuple(sorted(internal.items())): 1}
    logged = [record for record in caplog.records if record.exc_info and record.exc_info[0] is RuntimeError]
    assert [record.getMessage() for record in logged] == [
        "gRPC Predict failed", "gRPC GetModelStatus failed", "POST /v1/models/digits:predict failed"]


def test_each_grpc_method_answers_through_the_guarded_path(tmp_path):
    """Classify and Regress are counted as TF Serving counts them (UNIMPLEMENTED here: predict signatures
    only); MultiInference and HandleReloadConfigRequest answer UNIMPLEMENTED with one line, uncounted."""
    from tensorflow_serving.apis import (classification_pb2, inference_pb2, model_management_pb2,
                                         model_service_pb2_grpc, prediction_service_pb2_grpc, regression_pb2)

    with _serving(tmp_path) as server, grpc.insecure_channel(server.grpc_target) as channel:
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        classify = classification_pb2.ClassificationRequest()
        classify.model_spec.name = "digits"
        regress = regression_pb2.RegressionRequest()
        regress.model_spec.name = "digits"
        delta = MetricsDelta(server.rest_url)
        for method, request in ((prediction.Classify, classify), (prediction.Regress, regress),
                                (prediction.MultiInference, inference_pb2.MultiInferenceRequest()),
                                (models.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest())):
            with pytest.raises(grpc.RpcError) as raised:
                method(request, timeout=TIMEOUT_S)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED and "\n" not in raised.value.details()
        assert _request_counts(delta.take()) == {(("model_name", "digits"), ("status", "UNIMPLEMENTED")): 2}


# -- refused before any handler: not in request_count ------------------------------------------------------------

def _stalled_upload(rest_url: str) -> tuple[int, dict]:
    """Sends the headers and half the announced body, then nothing: the server's answer (read up to its
    Content-Length: aiohttp keeps the connection open a while for the rest of the body)."""
    body = json.dumps({"instances": [b64(b"x" * 100)]}).encode()
    head = (f"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    host, port = rest_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as stalled:
        stalled.sendall(head + body[: len(body) // 2])
        received = b""
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < _length(received):
            chunk = stalled.recv(65536)
            assert chunk, f"the server closed the connection mid-answer: {received!r}"
            received += chunk
    head, _, answer = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(answer)


def _length(response: bytes) -> int:
    """The Content-Length of an HTTP response whose head has arrived."""
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    return int(head.split("content-length:")[1].split("\r\n")[0])


def test_over_size_and_stalled_uploads_are_refused_and_counted_apart_from_request_count(tmp_path):
    """Ten bodies over --max-body-bytes (eight announced, two chunked) get 413 and a stalled one 408, as
    before; they are the client's doing, so request_count does not move (no server error to spend the
    availability budget) and refused_requests counts each by its reason."""
    big = json.dumps({"instances": [b64(b"x" * MAX_BODY_BYTES)]}).encode()

    def chunks():
        for start in range(0, len(big), 500):
            yield big[start:start + 500]

    with _serving(tmp_path) as server:
        delta = MetricsDelta(server.rest_url)
        url = f"{server.rest_url}/v1/models/digits:predict"
        answers = [requests.post(url, data=big, timeout=TIMEOUT_S) for _ in range(8)]
        answers += [requests.post(url, data=chunks(), timeout=TIMEOUT_S) for _ in range(2)]
        assert [answer.status_code for answer in answers] == [413] * 10
        assert all("(--max-body-bytes)" in answer.json()["error"] for answer in answers)
        assert _stalled_upload(server.rest_url) == (408, {
            "error": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s (--body-timeout)"})
        delta.take()
    assert _request_counts(delta) == {}
    refused = names.REFUSED_REQUESTS.removesuffix("_total")  # scrape() names counters as the parser does
    assert delta(refused, reason=names.REFUSED_BODY_TOO_LARGE) == 10
    assert delta(refused, reason=names.REFUSED_BODY_TIMEOUT) == 1


# -- every sample as declared -------------------------------------------------------------------------------------

def test_recording_a_sample_unlike_its_declaration_raises():
    """Label names out of the declared order, a label too many, another kind or an undeclared name: each is
    a bug in the caller, refused where it is recorded, and nothing of it reaches the page."""
    from serving.metrics import ServingMetrics, UndeclaredSample

    metrics = ServingMetrics()
    mistakes = [
        lambda: metrics._count(names.REQUEST_COUNT, (("status", "OK"), ("model_name", "digits"))),
        lambda: metrics._count(names.REQUEST_COUNT, (("model_name", "digits"), ("status", "OK"), ("API", "x"))),
        lambda: metrics._observe(names.REQUEST_COUNT, (("model_name", "digits"), ("status", "OK")), 1.0),
        lambda: metrics._set_gauge(names.VERSION_STATE, ("model_name", "model_version", "state"), {}),
        lambda: metrics._count("digits_serving_undeclared_total", ()),
    ]
    for mistake in mistakes:
        with pytest.raises(UndeclaredSample):
            mistake()
    assert metrics.render() == "\n"
    metrics.record_request("digits", "OK", "predict", "REST", 0.01)  # the public recorders are declared
    assert declaration_problems(metrics.render()) == []


# -- histogram sums as each exporter prints them ----------------------------------------------------------------

def test_histogram_sums_are_printed_as_their_exporter_prints_them(model_server, sample_tree):
    """On a real scrape after a predict: the `_sum` of TF Serving's histograms has six significant digits,
    as TF Serving prints it (absl::StrCat of a double, util/prometheus_exporter.cc); ours keep full
    precision (their rate(sum)/rate(count) feeds the rules), and some do use more than six digits."""
    png = sorted((sample_tree / "testing" / "5").iterdir())[0].read_bytes()
    assert predict_rest(model_server.rest_url, [png], timeout=TIMEOUT_S).status_code == 200
    page = requests.get(f"{model_server.rest_url}{names.METRICS_PATH}", timeout=TIMEOUT_S).text
    sums: dict[str, list[str]] = {"tfserving": [], "digits": []}
    for line in page.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0].endswith("_sum"):
            sums[names.METRICS[series.split("{")[0].removesuffix("_sum")].origin].append(value)
    assert sums["tfserving"] and sums["digits"], sums
    assert all(value == f"{float(value):.6g}" for value in sums["tfserving"]), sums["tfserving"]
    assert all(value == repr(float(value)) for value in sums["digits"]), sums["digits"]
    assert any(value != f"{float(value):.6g}" for value in sums["digits"]), sums["digits"]
