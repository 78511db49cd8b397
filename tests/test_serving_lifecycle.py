"""`digits serve` under overload and at its edges in time: health checks while saturated, deadlines and
disconnects while queued, and stopping at any moment within --shutdown-grace.

A batch queue that waits 4 s (`--batch-wait always`, TF Serving's behaviour) holds a request
in flight for as long as a test needs, without relying on the machine's speed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest
import requests

from conftest import REPO, start_server
from serving_clients import MetricsDelta, grpc_predict, grpc_status, predict_rest

pytestmark = [pytest.mark.slow]

HOLD_S = 4.0  # how long the held server's batches wait for company


@pytest.fixture(scope="module")
def png(sample_tree) -> bytes:
    return sorted((sample_tree / "testing" / "4").iterdir())[0].read_bytes()


@pytest.fixture(scope="module")
def held_server(pushed_model):
    """One predict in flight at most, and every batch waits HOLD_S for company before it runs."""
    server = start_server(pushed_model, "--max-concurrent-requests", 1, "--batch-wait", "always",
                          "--batch-timeout-micros", int(HOLD_S * 1e6))
    yield server
    assert server.stop() == 0


def _in_background(function, *args) -> dict:
    result: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            result["value"] = function(*args)
        except Exception as error:  # recorded for the test to look at
            result["error"] = error
        result["seconds"] = time.monotonic() - started

    result["thread"] = threading.Thread(target=run)
    result["thread"].start()
    return result


def _queued_so_far(server) -> int:
    """Requests that reached a batch queue (input_batch_size is recorded as each is queued)."""
    page = requests.get(f"{server.rest_url}/monitoring/prometheus/metrics", timeout=10).text
    for line in page.splitlines():
        if line.startswith(":tensorflow:serving:batching_session:input_batch_size_count"):
            return int(float(line.split()[-1]))
    return 0


def _wait_until_queued(server, count: int) -> None:
    deadline = time.monotonic() + 30
    while _queued_so_far(server) < count:
        assert time.monotonic() < deadline, "the request never reached the batch queue"
        time.sleep(0.02)


# -- overload: one limit for REST and gRPC, health checks always answered ------------------------------------------

def test_the_predict_limit_is_shared_and_health_checks_are_answered_while_saturated(held_server, png):
    from tensorflow_serving.apis import get_model_status_pb2

    before = _queued_so_far(held_server)
    holding = _in_background(predict_rest, held_server.rest_url, [png])
    _wait_until_queued(held_server, before + 1)
    try:
        # The one slot is taken by a REST predict: a gRPC predict is refused too (one ceiling, not two).
        with pytest.raises(grpc.RpcError) as refused:
            grpc_predict(held_server.grpc_target, [png])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many requests in flight (limit 1)" in refused.value.details()
        rest_refused = predict_rest(held_server.rest_url, [png])
        assert rest_refused.status_code == 429
        # Status and metadata over both APIs are answered, not queued behind the predict or refused.
        for _ in range(5):
            assert requests.get(f"{held_server.rest_url}/v1/models/digits", timeout=10).status_code == 200
            assert requests.get(f"{held_server.rest_url}/v1/models/digits/metadata", timeout=10).status_code == 200
            states = [status.state for status in grpc_status(held_server.grpc_target, timeout=10).model_version_status]
            assert states == [get_model_status_pb2.ModelVersionStatus.AVAILABLE]
        assert "value" not in holding  # all of that while the predict was still held
    finally:
        holding["thread"].join(60)
    assert holding["value"].status_code == 200


# -- deadlines and disconnects while queued --------------------------------------------------------------------------

def test_a_grpc_call_whose_deadline_passes_in_the_queue_is_dropped_as_tf_serving_drops_it(held_server, png):
    delta = MetricsDelta(held_server.rest_url)
    with pytest.raises(grpc.RpcError) as expired:
        grpc_predict(held_server.grpc_target, [png], timeout=0.5)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the client's own view
    time.sleep(HOLD_S + 0.5)  # the batch is processed, and the expired request dropped
    delta.take()
    # batching_session.cc: RESOURCE_EXHAUSTED "Run() timeout exceeded while waiting in batching queue".
    assert delta(":tensorflow:serving:request_count", model_name="digits", status="RESOURCE_EXHAUSTED") == 1
    assert delta(":tensorflow:serving:batching_session:queuing_latency_count", thread_pool_name="") == 1
    assert delta(":tensorflow:serving:batching_session:wrapped_run_count") == 0  # the model never ran for it
    assert delta(":tensorflow:serving:runtime_latency_count", model_name="digits", API="Predict", runtime="TF1") == 0


def test_a_rest_client_that_hangs_up_while_queued_costs_no_model_call(held_server, png):
    delta = MetricsDelta(held_server.rest_url)
    with pytest.raises(requests.Timeout):
        predict_rest(held_server.rest_url, [png], timeout=0.5)  # gives up and closes its connection
    time.sleep(HOLD_S + 0.5)
    delta.take()
    assert delta(":tensorflow:serving:request_count", model_name="digits", status="CANCELLED") == 1
    assert delta(":tensorflow:serving:batching_session:wrapped_run_count") == 0
    assert predict_rest(held_server.rest_url, [png]).status_code == 200  # and the slot was given back


# -- stopping at any moment ----------------------------------------------------------------------------------------

def _spawn(model_dir, *extra) -> tuple[subprocess.Popen, list[str]]:
    from serving.process import spawn_server

    return spawn_server(model_dir, "--poll-interval", "0.2", *extra, cwd=REPO)


def _wait_for_line(output: list[str], text: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in "".join(output):
            return
        assert process.poll() is None, "".join(output)[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"never saw {text!r}:\n" + "".join(output)[-3000:])


def _stopped_within(process: subprocess.Popen, output: list[str], seconds: float) -> None:
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        raise AssertionError(f"still running {seconds:.0f} s after the signal:\n" + "".join(output)[-3000:])
    time.sleep(0.2)  # the reader thread drains the pipe
    text = "".join(output)
    assert process.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("moment", ["importing TensorFlow", "loading the first version"])
def test_a_stop_signal_during_start_up_exits_0_at_once(pushed_model, signum, moment):
    process, output = _spawn(pushed_model, "--shutdown-grace", 2)
    if moment == "importing TensorFlow":
        _wait_for_line(output, "starting: importing TensorFlow", process)
    else:
        _wait_for_line(output, "loading digits version", process)
    process.send_signal(signum)
    _stopped_within(process, output, 2 + 10)  # the grace, and room for a loaded machine
    assert "ready (" not in "".join(output)


def test_sigterm_ends_within_the_grace_even_with_a_request_that_would_take_longer(pushed_model, png):
    process, output = _spawn(pushed_model, "--shutdown-grace", 1, "--batch-wait", "always",
                             "--batch-timeout-micros", 60_000_000)
    _wait_for_line(output, "ready (", process)
    rest_url = "http://127.0.0.1:" + "".join(output).split("REST    http://127.0.0.1:")[1].split("/")[0]
    stuck = _in_background(predict_rest, rest_url, [png], "", 120)  # its batch would wait 60 s
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _stopped_within(process, output, 1 + 10)
    stuck["thread"].join(30)
    assert "error" in stuck  # the connection was closed under it: the grace was over
    assert "stopped at the end of the grace period with 1 predict requests unanswered" in "".join(output)


def test_sigterm_during_a_version_load_ends_within_the_grace(pushed_model, tmp_path):
    (source,) = pushed_model.iterdir()
    model_dir = tmp_path / "digits"
    shutil.copytree(source, model_dir / "1")
    process, output = _spawn(model_dir, "--shutdown-grace", 1)
    _wait_for_line(output, "ready (", process)
    shutil.copytree(source, model_dir / "2")  # picked up by the poller
    _wait_for_line(output, "loading digits version 2", process)
    process.send_signal(signal.SIGTERM)
    _stopped_within(process, output, 1 + 10)
