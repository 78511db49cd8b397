"""`digits serve` answers the standard gRPC health check (grpc.health.v1.Health/Check, serving/health.py):
SERVING while a version of the model is AVAILABLE, NOT_SERVING while none is, NOT_FOUND for a service it
does not have, and the blackbox exporter's `grpc_health` probe (monitoring/blackbox/blackbox.yml, as
`digits monitor` runs it) reads the same.

The calls are raw unary calls with the messages written byte by byte from the protocol's proto
(grpc/doc/health-checking.md), so they check the wire format, not serving/health.py against itself.
"""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
import requests

from conftest import require_tool, start_server
from monitoring import local, names
from monitoring.cli import DEFAULT_GRPC_TARGETS
from prometheus_api import free_port, wait_for
from serving.health import MODEL_SERVICE, PREDICTION_SERVICE
from serving_clients import MetricsDelta, grpc_predict

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
# HealthCheckResponse {ServingStatus status = 1;}: field 1, varint.
ANSWERS = {b"\x08\x01": "SERVING", b"\x08\x02": "NOT_SERVING"}
MODEL_SERVICES = ("", PREDICTION_SERVICE, names.DEFAULT_MODEL_NAME)
TIMEOUT_S = 30
UNSERVED_VERSION = 999_999  # a version no test model has


def check_request(service: str) -> bytes:
    """HealthCheckRequest {string service = 1;}: field 1, length-delimited (proto3 leaves "" out)."""
    name = service.encode()
    assert len(name) < 128  # a one-byte length
    return b"\x0a" + bytes([len(name)]) + name if name else b""


def health(target: str, service: str) -> str:
    """The serving status a Check of `service` answers."""
    with grpc.insecure_channel(target) as channel:
        answer = channel.unary_unary(CHECK)(check_request(service), timeout=TIMEOUT_S)
    return ANSWERS.get(answer, f"unexpected answer {answer!r}")


def health_error(target: str, method: str, service: str) -> grpc.StatusCode:
    """The status code a health call that must fail ends with."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(CHECK) if method == CHECK else channel.unary_stream(WATCH)
        with pytest.raises(grpc.RpcError) as error:
            answer = call(check_request(service), timeout=TIMEOUT_S)
            list(answer) if method == WATCH else answer
    return error.value.code()


@pytest.fixture(scope="module")
def blackbox_url(tmp_path_factory):
    """The blackbox exporter with the committed blackbox.yml on a loopback port (it starts in well under
    a second); stopped by PID."""
    binary = require_tool(local.BINARIES["blackbox exporter"][0], "the gRPC health probe cannot be run")
    url = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path_factory.mktemp("blackbox") / "blackbox_exporter.log").open("wb")
    process = subprocess.Popen([binary, f"--config.file={local.BLACKBOX_CONFIG}",
                                f"--web.listen-address={url.removeprefix('http://')}"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _healthy(url) or process.poll() is not None, timeout=60, what="the blackbox exporter")
        assert process.poll() is None, f"the blackbox exporter exited with {process.returncode}; see {log.name}"
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/healthy", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def grpc_probe(blackbox_url: str, target: str) -> dict[str, float]:
    """The `grpc_health` module's probe of `target`: its samples, by name and label text."""
    page = requests.get(f"{blackbox_url}/probe", params={"module": names.PROBE_GRPC_MODULE, "target": target},
                        timeout=60)
    assert page.status_code == 200, page.text
    return {line.split()[0]: float(line.split()[1]) for line in page.text.splitlines()
            if line.startswith("probe_")}


def test_the_served_model_is_serving_and_health_checks_are_not_counted(model_server):
    """With its version loaded, the server (""), PredictionService and the model are SERVING, and so is
    ModelService; the checks add nothing to request_count (TF Serving counts only predicts), while a
    predict between the same two scrapes is counted."""
    delta = MetricsDelta(model_server.rest_url)
    for service in (*MODEL_SERVICES, MODEL_SERVICE):
        assert health(model_server.grpc_target, service) == "SERVING", service
    assert delta.take().total(names.REQUEST_COUNT) == 0
    with pytest.raises(grpc.RpcError) as error:
        grpc_predict(model_server.grpc_target, [b"not read"], version=UNSERVED_VERSION, timeout=TIMEOUT_S)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert delta.take()(names.REQUEST_COUNT, model_name=names.DEFAULT_MODEL_NAME, status="NOT_FOUND") == 1


def test_an_unknown_service_is_not_found_and_watch_is_unimplemented(model_server):
    """A service the server does not have is NOT_FOUND, as the protocol says; Watch ends UNIMPLEMENTED
    (documented: clients then must not retry it, and gRPC's client-side health checking treats the server as
    healthy)."""
    for service in ("tensorflow.serving.SessionService", "grpc.health.v1.Health", "digits-other"):
        assert health_error(model_server.grpc_target, CHECK, service) == grpc.StatusCode.NOT_FOUND, service
    assert health_error(model_server.grpc_target, WATCH, "") == grpc.StatusCode.UNIMPLEMENTED


def test_the_blackbox_grpc_probe_succeeds_on_digits_serve(model_server, blackbox_url):
    """The blackbox exporter's grpc_health module (service "") reads SERVING from `digits serve`."""
    samples = grpc_probe(blackbox_url, model_server.grpc_target)
    assert samples["probe_success"] == 1
    assert samples['probe_grpc_healthcheck_response{serving_status="SERVING"}'] == 1
    assert samples["probe_grpc_status_code"] == 0


def test_a_server_without_a_version_is_not_serving_until_one_loads(pushed_model, blackbox_url, tmp_path):
    """A server up on an empty model directory (predicts answer NOT_FOUND) is NOT_SERVING for the server,
    PredictionService and the model, its ModelService SERVING (it answers status), and the blackbox probe
    fails on it; once a version is copied in and loads, the same checks read SERVING and the probe succeeds.
    A server of its own: ~20 s to start, ~10 s to load the version."""
    model_dir = tmp_path / names.DEFAULT_MODEL_NAME
    model_dir.mkdir()
    with start_server(model_dir) as server:
        for service in MODEL_SERVICES:
            assert health(server.grpc_target, service) == "NOT_SERVING", service
        assert health(server.grpc_target, MODEL_SERVICE) == "SERVING"
        samples = grpc_probe(blackbox_url, server.grpc_target)
        assert samples["probe_success"] == 0
        assert samples['probe_grpc_healthcheck_response{serving_status="NOT_SERVING"}'] == 1

        (source,) = pushed_model.iterdir()
        shutil.copytree(source, tmp_path / "staged")
        (tmp_path / "staged").rename(model_dir / source.name)  # appears whole
        wait_for(lambda: health(server.grpc_target, "") == "SERVING", timeout=180, what="the version loaded")
        for service in MODEL_SERVICES:
            assert health(server.grpc_target, service) == "SERVING", service
        assert grpc_probe(blackbox_url, server.grpc_target)["probe_success"] == 1


@pytest.mark.parametrize(("args", "probed"), [
    ([], DEFAULT_GRPC_TARGETS),  # `digits serve` at its defaults: REST 127.0.0.1:8501, gRPC 127.0.0.1:8500
    (["--grpc", "127.0.0.1:18500"], ("127.0.0.1:18500",)),
    (["--serving", "127.0.0.1:8501"], ()),  # servers named: maybe the TF Serving container, no health service
    (["--serving", "127.0.0.1:18501", "--grpc", "127.0.0.1:18500"], ("127.0.0.1:18500",)),
])
def test_digits_monitor_health_checks_the_default_servers_grpc_port(monkeypatch, args, probed):
    """`digits monitor` probes 127.0.0.1:8500 with grpc_health while it watches the default server, and only
    the --grpc addresses once --serving names the servers (the stack itself is not started here)."""
    from click.testing import CliRunner

    from monitoring import cli

    configs = []

    class Stack:
        def __init__(self, config):
            configs.append(config)

        def start(self, on_starting=None):
            raise local.MonitoringError("not started in this test")

        def stop(self):
            pass

    monkeypatch.setattr(cli, "MonitoringStack", Stack)
    monkeypatch.setattr(cli.signal, "signal", lambda *_: None)  # the test process keeps its own handlers
    result = CliRunner().invoke(cli.monitor_command, args)
    assert result.exit_code == 1 and "not started in this test" in result.output, result.output
    [config] = configs
    assert config.grpc_targets == probed
    [probe_job] = [job for job in local.prometheus_config(config)["scrape_configs"]
                   if job["job_name"] == names.PROBE_JOB]
    assert [group["targets"] for group in probe_job["static_configs"]
            if group["labels"]["__param_module"] == names.PROBE_GRPC_MODULE] == ([list(probed)] if probed else [])
