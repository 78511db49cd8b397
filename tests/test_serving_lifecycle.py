"""`digits serve` under overload and at its edges in time: health checks while saturated, deadlines and
disconnects while queued, stopping at any moment within --shutdown-grace, and a version that fails to load.

A batch queue that waits 4 s (`--batch-wait always`, TF Serving's behaviour) holds a request
in flight for as long as a test needs, without relying on the machine's speed; the shutdown
tests hold theirs for 600 s, with graces of 1 s or 600 s, so that a server that exits at all
within their bound (60 s) did not wait for the request, or for the grace.
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
from monitoring import names
from prometheus_api import wait_for
from serving_clients import MetricsDelta, declaration_problems, grpc_predict, grpc_status, predict_rest, scrape

pytestmark = [pytest.mark.slow]

HOLD_S = 4.0  # how long the held server's batches wait for company
LONG_HOLD_MICROS = 600_000_000  # a batch the shutdown tests' requests never leave before the process ends
EXIT_BOUND_S = 60  # how long a stopping server may take here: far inside the waits it must not make


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

def _take_once_moved(delta: MetricsDelta, status: str, timeout: float = 60) -> None:
    """Scrapes until one more predict has ended with `status` (counted when its batch is processed)."""
    wait_for(lambda: delta.take()(":tensorflow:serving:request_count", model_name="digits", status=status) >= 1,
             timeout, interval=0.1, what=f"a request counted {status}")


def test_a_grpc_call_whose_deadline_passes_in_the_queue_is_dropped_as_tf_serving_drops_it(held_server, png):
    delta = MetricsDelta(held_server.rest_url)
    with pytest.raises(grpc.RpcError) as expired:
        grpc_predict(held_server.grpc_target, [png], timeout=0.5)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the client's own view
    _take_once_moved(delta, "RESOURCE_EXHAUSTED")  # its batch was processed, and the expired request dropped
    # batching_session.cc: RESOURCE_EXHAUSTED "Run() timeout exceeded while waiting in batching queue".
    assert delta(":tensorflow:serving:request_count", model_name="digits", status="RESOURCE_EXHAUSTED") == 1
    assert delta(":tensorflow:serving:batching_session:queuing_latency_count", thread_pool_name="") == 1
    assert delta(":tensorflow:serving:batching_session:wrapped_run_count") == 0  # the model never ran for it
    assert delta(":tensorflow:serving:runtime_latency_count", model_name="digits", API="Predict", runtime="TF1") == 0


def test_a_rest_client_that_hangs_up_while_queued_costs_no_model_call(held_server, png):
    delta = MetricsDelta(held_server.rest_url)
    with pytest.raises(requests.Timeout):
        predict_rest(held_server.rest_url, [png], timeout=0.5)  # gives up and closes its connection
    _take_once_moved(delta, "CANCELLED")  # decided when its batch is processed: the model's turn came and went
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
    for reader in process.readers:  # until they have taken everything it wrote
        reader.join(timeout=30)
    text = "".join(output)
    assert process.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("moment", ["importing TensorFlow", "loading the first version"])
def test_a_stop_signal_during_start_up_exits_0_at_once(pushed_model, signum, moment):
    """Nothing is in flight before the ports open: the signal ends the start-up at once, and a 600 s grace
    is not waited out (the process is gone within EXIT_BOUND_S)."""
    process, output = _spawn(pushed_model, "--shutdown-grace", 600)
    if moment == "importing TensorFlow":
        _wait_for_line(output, "starting: importing TensorFlow", process)
    else:
        _wait_for_line(output, "loading digits version", process)
    process.send_signal(signum)
    _stopped_within(process, output, EXIT_BOUND_S)
    assert "ready (" not in "".join(output)


def test_sigterm_ends_within_the_grace_even_with_a_request_that_would_take_longer(pushed_model, png):
    """A request held in its batch for 600 s when SIGTERM comes: the 1 s grace ends the wait, the request
    is abandoned, and the log says so."""
    with start_server(pushed_model, "--shutdown-grace", 1, "--batch-wait", "always",
                      "--batch-timeout-micros", LONG_HOLD_MICROS) as server:
        before = _queued_so_far(server)
        stuck = _in_background(predict_rest, server.rest_url, [png], "", 900)
        _wait_until_queued(server, before + 1)  # in flight when the signal comes
        server.process.send_signal(signal.SIGTERM)
        _stopped_within(server.process, server.output, EXIT_BOUND_S)
    stuck["thread"].join(30)
    assert "error" in stuck  # the connection was closed under it: the grace was over
    text = "".join(server.output)
    assert "shutting down: finishing 1 in-flight predict requests (up to 1.0 s)" in text
    assert "stopped at the end of the grace period with 1 predict requests unanswered" in text


def test_a_second_signal_stops_the_wait_at_once(pushed_model, png):
    """SIGTERM starts a drain that would wait up to 600 s for a request held for 600 s; a second signal
    (Ctrl-C here) ends it at once: the process exits 0 within EXIT_BOUND_S, the request abandoned."""
    with start_server(pushed_model, "--shutdown-grace", 600, "--batch-wait", "always",
                      "--batch-timeout-micros", LONG_HOLD_MICROS) as server:
        before = _queued_so_far(server)
        held = _in_background(predict_rest, server.rest_url, [png], "", 900)
        _wait_until_queued(server, before + 1)
        server.process.send_signal(signal.SIGTERM)
        _wait_for_line(server.output, "shutting down: finishing 1 in-flight predict requests", server.process)
        assert server.process.poll() is None and "value" not in held  # waiting for it
        server.process.send_signal(signal.SIGINT)
        _stopped_within(server.process, server.output, EXIT_BOUND_S)
    held["thread"].join(30)
    assert "error" in held
    text = "".join(server.output)
    assert "second stop signal: not waiting any longer" in text
    assert "stopped at the end of the grace period with 1 predict requests unanswered" in text


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


# -- a version that fails to load ----------------------------------------------------------------------------------

def _version_statuses(server) -> list[dict]:
    response = requests.get(f"{server.rest_url}/v1/models/digits", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["model_version_status"]


def _wait_for_end(server, version: int) -> list[dict]:
    """The status once `version` is END, newest first."""
    deadline = time.monotonic() + 120
    while True:
        statuses = _version_statuses(server)
        if statuses[0]["version"] == str(version) and statuses[0]["state"] == "END":
            return statuses
        assert time.monotonic() < deadline, f"version {version} never ended: {statuses}"
        time.sleep(0.1)


def test_a_version_that_fails_to_load_shows_end_while_the_previous_one_serves(pushed_model, png, tmp_path):
    """With `--num-versions 1`, each newer version would replace the only good one, but two pushes in a
    row fail to load: each shows END with its error, is not tried again, and version 1 keeps answering.

    The version-state gauge says the same as GetModelStatus (REST and gRPC), from the first failure on;
    and after loads, failed loads, predicts and a bad request, every family on the page is as declared
    in monitoring/names.py."""
    from tensorflow.core.protobuf import error_codes_pb2
    from tensorflow_serving.apis import get_model_status_pb2

    def version_state(server) -> dict[tuple, float]:
        return {tuple(dict(labels)[name] for name in names.METRICS[names.VERSION_STATE].labels): value
                for labels, value in scrape(server.rest_url)[names.VERSION_STATE].items()}

    (source,) = pushed_model.iterdir()
    model_dir = tmp_path / "digits"
    shutil.copytree(source, model_dir / "1")
    with start_server(model_dir, "--num-versions", 1) as server:
        for broken in (2, 3):  # the second failure comes at least one poll after the first one's
            (model_dir / str(broken)).mkdir()
            (model_dir / str(broken) / "saved_model.pb").write_bytes(b"not a SavedModel")
            statuses = _wait_for_end(server, broken)
            assert version_state(server)[("digits", str(broken), "END", "UNKNOWN")] == 1  # from its first failure
        assert [(status["version"], status["state"], status["status"]["error_code"]) for status in statuses] == [
            ("3", "END", "UNKNOWN"), ("2", "END", "UNKNOWN"), ("1", "AVAILABLE", "OK")]
        for status in statuses[:2]:
            assert status["status"]["error_message"].startswith(
                f"Failed to load servable digits version {status['version']}: "), status
        assert grpc_predict(server.grpc_target, [png]).model_spec.version.value == 1
        assert predict_rest(server.rest_url, [png]).status_code == 200
        attempts = scrape(server.rest_url)[":tensorflow:cc:saved_model:load_attempt_count"]
        assert {dict(labels)["model_path"]: value for labels, value in attempts.items()
                if dict(labels)["status"] == "fail"} == {str(model_dir / "2"): 1, str(model_dir / "3"): 1}

        assert predict_rest(server.rest_url, [b"not an image"]).status_code == 400
        page = requests.get(f"{server.rest_url}{names.METRICS_PATH}", timeout=30).text
        assert declaration_problems(page) == []
        gauge = version_state(server)
        assert gauge == {("digits", "3", "END", "UNKNOWN"): 1, ("digits", "2", "END", "UNKNOWN"): 1,
                         ("digits", "1", "AVAILABLE", "OK"): 1}
        assert {(version, state, code) for _, version, state, code in gauge} == {
            (status["version"], status["state"], status["status"]["error_code"]) for status in _version_statuses(server)}
        assert {(version, state, code) for _, version, state, code in gauge} == {
            (str(status.version), get_model_status_pb2.ModelVersionStatus.State.Name(status.state),
             error_codes_pb2.Code.Name(status.status.error_code))
            for status in grpc_status(server.grpc_target).model_version_status}
