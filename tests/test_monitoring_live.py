"""The monitoring stack against the real thing: Prometheus and Alertmanager (Debian binaries) scraping a
real `digits serve` that gets real REST and gRPC traffic, good and bad, all on loopback.

One stack and one dedicated server are shared by the module (the shared `model_server` must keep
running, and the last test here stops this one). Scrape and evaluation run every second and
Alertmanager groups for a second: for the test only. The rules are the committed ones, but for the
`for:` of DigitsModelServerDown, shortened from 2 minutes to SERVER_DOWN_FOR in a copy: that wait
exists for production, and promtool's unit tests check the committed one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import requests
import yaml

import grafana_lint
from conftest import REPO, start_server
from grafana_lint import selectors
from monitoring import local, names, rules
from prometheus_api import free_port, result, wait_for
from serving_clients import grpc_predict, predict_rest
from web.process import start_web

pytestmark = pytest.mark.slow

RULE_FILES = sorted((REPO / "monitoring" / "prometheus" / "rules").glob("*.yml"))
SERVER_DOWN_FOR = "5s"


def rules_with_a_short_server_down_wait(directory: Path) -> Path:
    """A copy of the committed rule files in which only DigitsModelServerDown's `for` is shorter."""
    directory.mkdir()
    changed = 0
    for path in RULE_FILES:
        document = yaml.safe_load(path.read_text())
        for group in document["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == "DigitsModelServerDown":
                    assert rule["for"] == "2m", rule  # what the copy shortens
                    rule["for"] = SERVER_DOWN_FOR
                    changed += 1
        (directory / path.name).write_text(yaml.safe_dump(document, sort_keys=False))
    assert changed == 1
    return directory


def rule_exprs() -> list[str]:
    return [rule["expr"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (its series selectors)."""
    return {selector.metric for selector in selectors(expr) if selector.metric}


def dashboard_exprs() -> list[str]:
    return grafana_lint.dashboard_exprs(grafana_lint.DASHBOARD)


@pytest.fixture(scope="module")
def monitored(pushed_model, tmp_path_factory, sample_tree):
    """(server, stack config, stack) with traffic sent and scraped at least twice."""
    server = start_server(pushed_model)
    data = tmp_path_factory.mktemp("monitoring")
    web_app = start_web("--serving-url", server.rest_url, "--feedback-dir", data / "feedback",
                        "--model-dir", pushed_model)
    host, port = server.rest_url.removeprefix("http://").split(":")
    config = local.StackConfig(
        data_dir=data, serving_targets=(f"{host}:{port}",), web_targets=(web_app.url.removeprefix("http://"),),
        prometheus_port=free_port(),
        alertmanager_port=free_port(), receiver_port=free_port(), scrape_interval="1s", evaluation_interval="1s",
        group_wait="1s", group_interval="1s", rules_dir=rules_with_a_short_server_down_wait(data / "rules"))
    receiver_log = (data / "receiver-stdout.log").open("wb")
    stack = local.MonitoringStack(config, receiver_output=receiver_log.fileno())
    try:
        stack.start()
        digits = [path.read_bytes() for path in sorted((sample_tree / "testing").glob("*/*.png"))[::50]]
        for _ in range(3):  # three rounds a few scrapes apart, so that rates have samples to work with
            assert predict_rest(server.rest_url, digits[:8]).status_code == 200
            grpc_predict(server.grpc_target, digits[8:16])
            # Client errors: a body that is not base64, and a model that does not exist.
            bad = requests.post(f"{server.rest_url}/v1/models/digits:predict",
                                json={"instances": [{"b64": "***"}]}, timeout=30)
            assert bad.status_code == 400
            assert predict_rest(server.rest_url, digits[:1], suffix="/versions/1").status_code == 404
            with pytest.raises(grpc.RpcError) as refused:
                grpc_predict(server.grpc_target, [b"not an image"])
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Through the web page's backend: three answers, one judged right, one corrected.
            answers = [requests.post(f"{web_app.url}/api/predict", data=digit, timeout=60).json()
                       for digit in digits[16:19]]
            for answer, verdict in zip(answers, (0, 1)):
                judged = {"id": answer["id"], "digit": (answer["digit"] + verdict) % 10}
                assert requests.post(f"{web_app.url}/api/feedback", json=judged, timeout=30).status_code == 200
            assert requests.post(f"{web_app.url}/api/predict", data=b"nope", timeout=30).status_code == 415
            _sleep_scrapes(config, 3)
        wait_for(lambda: result(config.prometheus_url, f'{rules.REQUESTS_BY_STATUS}{{status="INVALID_ARGUMENT"}}'),
                 timeout=60, what="the recorded request rate by status")
        yield server, config, stack
    finally:
        stack.stop()
        web_app.stop()
        server.stop()
        receiver_log.close()


def _sleep_scrapes(config: local.StackConfig, count: int) -> None:
    time.sleep(count * float(config.scrape_interval.removesuffix("s")))


def test_every_rule_expression_evaluates(monitored):
    _, config, _ = monitored
    for expr in rule_exprs():
        answer = result(config.prometheus_url, expr)
        assert isinstance(answer, list)


def test_prometheus_loaded_every_rule_without_error(monitored):
    _, config, _ = monitored
    groups = requests.get(f"{config.prometheus_url}/api/v1/rules", timeout=30).json()["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rule_exprs())
    assert [rule["name"] for rule in loaded if rule.get("health") == "err"] == []


def test_every_dashboard_expression_evaluates(monitored):
    _, config, _ = monitored
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for expr in exprs:
        result(config.prometheus_url, expr)


def test_the_slis_see_rest_and_grpc_and_ignore_client_errors(monitored):
    _, config, _ = monitored
    url = config.prometheus_url
    statuses = {sample["metric"]["status"] for sample in result(url, rules.REQUESTS_BY_STATUS)}
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= statuses
    apis = {sample["metric"]["API"] for sample in result(url, rules.PREDICTS_OK_BY_API)}
    assert apis == set(names.PREDICT_APIS)
    # Only client errors happened: the availability SLI is exactly 0, and there is traffic behind it.
    [errors] = result(url, rules.error_ratio("5m"))
    assert errors["metric"] == {"__name__": rules.error_ratio("5m"), "job": names.SERVING_JOB,
                                "model_name": names.DEFAULT_MODEL_NAME}
    assert float(errors["value"][1]) == 0
    [predicts] = result(url, rules.predicts("5m"))
    assert float(predicts["value"][1]) > 0
    [slow] = result(url, rules.slow_ratio("5m"))
    assert 0 <= float(slow["value"][1]) <= 1


def test_latency_quantiles_and_prediction_statistics_have_data(monitored):
    _, config, _ = monitored
    url = config.prometheus_url
    for api in names.PREDICT_APIS:
        [p99] = result(url, f'histogram_quantile(0.99, sum by (le) (rate({names.REQUEST_LATENCY}_bucket'
                            f'{{API="{api}"}}[1m])))')
        assert 0 < float(p99["value"][1]) < 60e6
    # Both the model server and the web app (for the answers it got) count predictions, each its own job.
    shares = result(url, rules.CLASS_SHARE)
    assert {sample["metric"]["job"] for sample in shares} == {names.SERVING_JOB, names.WEB_JOB}
    for job in (names.SERVING_JOB, names.WEB_JOB):
        total = sum(float(sample["value"][1]) for sample in shares if sample["metric"]["job"] == job)
        assert abs(total - 1) < 1e-6, job
    confidences = result(url, rules.CONFIDENCE_MEAN)
    assert {sample["metric"]["job"] for sample in confidences} == {names.SERVING_JOB, names.WEB_JOB}
    assert all(0 < float(sample["value"][1]) <= 1 for sample in confidences)


def test_drift_is_computed_against_the_served_versions_reference(monitored, pushed_model):
    _, config, _ = monitored
    url = config.prometheus_url
    [version] = [path.name for path in pushed_model.iterdir()]
    reference = result(url, rules.REFERENCE_SHARE)
    assert {sample["metric"]["model_version"] for sample in reference} == {version}
    for job in (names.SERVING_JOB, names.WEB_JOB):  # the web app exports it too (--model-dir)
        assert sorted(sample["metric"]["predicted_class"] for sample in reference
                      if sample["metric"]["job"] == job) == [str(k) for k in range(10)]
    # Per job: the model server's own answers, and the web app's (with --model-dir it exports the
    # reference too, as it must in front of the TF Serving container).
    psis = result(url, rules.PSI)
    assert sorted(psi["metric"]["job"] for psi in psis) == sorted([names.SERVING_JOB, names.WEB_JOB])
    assert all(psi["metric"]["model_version"] == version and float(psi["value"][1]) >= 0 for psi in psis)
    assert len(result(url, rules.REFERENCE_CONFIDENCE)) == 2


def test_the_web_apps_traffic_and_online_accuracy_are_recorded(monitored):
    """Half of what people judged was right: the recorded online accuracy says 0.5, per version."""
    _, config, _ = monitored
    url = config.prometheus_url
    [accuracy] = wait_for(lambda: result(url, rules.ONLINE_ACCURACY), timeout=60, what="online accuracy")
    assert accuracy["metric"]["job"] == names.WEB_JOB and accuracy["metric"]["model_version"].isdigit()
    assert float(accuracy["value"][1]) == pytest.approx(0.5)
    outcomes = {series["metric"]["outcome"] for series in result(url, f'{rules.WEB_REQUESTS_RATE}{{endpoint="predict"}}')}
    assert {"ok", "bad_request"} <= outcomes
    assert result(url, rules.web_latency(0.95))
    [errors] = result(url, rules.WEB_MODEL_ERROR_RATIO)
    assert float(errors["value"][1]) == 0


def test_every_metric_in_rules_and_dashboards_is_in_a_live_scrape(monitored):
    """Catches a `_total` too many, a TF Serving name misspelt, a metric that only exists in a test."""
    _, config, _ = monitored
    scraped = set(requests.get(f"{config.prometheus_url}/api/v1/label/__name__/values", timeout=30).json()["data"])
    used = set().union(*map(metric_names, rule_exprs() + dashboard_exprs())) - recorded_names()
    assert used, "no metric names found: the parser is broken"
    assert {names.REQUEST_COUNT, f"{names.REQUEST_LATENCY}_bucket", names.PREDICTIONS, "up"} <= used
    assert sorted(used - scraped) == []


def test_a_stopped_server_pages_through_alertmanager(monitored):
    """Last in this module: it stops the server. DigitsModelServerDown holds for SERVER_DOWN_FOR here."""
    server, config, _ = monitored
    server.stop()
    log = Path(config.data_dir) / "alerts.jsonl"

    def delivered():
        if not log.exists():
            return None
        for line in log.read_text().splitlines():
            record = json.loads(line)
            for alert in record["payload"]["alerts"]:
                if alert["labels"]["alertname"] == "DigitsModelServerDown" and alert["status"] == "firing":
                    return record["receiver"], alert
        return None

    receiver, alert = wait_for(delivered, timeout=120, interval=1, what="DigitsModelServerDown at the webhook")
    host, port = config.serving_targets[0].split(":")
    assert receiver == "pager"
    assert alert["labels"] == {"alertname": "DigitsModelServerDown", "severity": "critical",
                               "job": names.SERVING_JOB, "instance": f"{host}:{port}", "monitor": "digits"}
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#digitsmodelserverdown"
    assert f"{host}:{port}" in alert["annotations"]["description"]
