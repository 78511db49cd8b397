"""The monitoring configs, checked by the real tools: promtool, amtool, and the generator itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from monitoring import local, names, outages, rules
from conftest import REPO, run_digits
from log_lines import error_lines
from prometheus_api import free_port

MONITORING = REPO / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus" / "prometheus.yml"
ALERTMANAGER_YML = MONITORING / "alertmanager" / "alertmanager.yml"
RULE_FILES = sorted((MONITORING / "prometheus" / "rules").glob("*.yml"))
PROMTOOL_TESTS = sorted((MONITORING / "prometheus" / "tests").glob("*.yml"))
RUNBOOK = REPO / "docs" / "runbook.md"
ARTIFACTS = REPO / "build" / "test-artifacts" / "monitoring"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} missing: run `bash .ci/tasks.sh setup` (installs prometheus and prometheus-alertmanager)"
    return path


def run_tool(*command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def all_alerts() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def test_committed_rules_are_what_the_generator_writes():
    result = run_tool(sys.executable, "-m", "monitoring.rules", "--check")
    assert result.returncode == 0, result.stderr


def test_committed_outage_matrix_is_what_the_generator_writes():
    """monitoring/prometheus/tests/outage_matrix_test.yml and the README's table, from monitoring/outages.py."""
    result = run_tool(sys.executable, "-m", "monitoring.outages", "--check")
    assert result.returncode == 0, result.stderr


def test_the_outage_matrix_pages_or_tickets_every_failure_in_every_shape():
    """Nothing in the table "does not page": every cell names an alert that pages (critical) or tickets
    (warning) and exists in the rules, every service-wide failure is tested in all three shapes, and the
    Kubernetes rows name alerts of the Kubernetes group."""
    alert_names = {alert["alert"] for alert in all_alerts()}
    for outage in outages.OUTAGES:
        assert outage.severity in ("critical", "warning") and outage.alert in alert_names, outage.key
    failures = {outage.failure: set() for outage in outages.OUTAGES}
    for outage in outages.OUTAGES:
        failures[outage.failure] |= {shape.key for shape in outage.shapes}
    assert all(shapes == {"serve", "container", "k8s"} for shapes in failures.values()), failures
    assert {alert for _, alert, _ in outages.KUBERNETES_ROWS} <= alert_names


def test_generator_check_notices_a_hand_edit(tmp_path):
    for path in RULE_FILES:
        shutil.copy(path, tmp_path / path.name)
    edited = tmp_path / RULE_FILES[0].name
    edited.write_text(edited.read_text().replace("severity: critical", "severity: info", 1))
    result = run_tool(sys.executable, "-m", "monitoring.rules", "--check", "--out", str(tmp_path))
    assert result.returncode == 1 and "out of date" in result.stderr


def test_promtool_accepts_the_config_and_rules():
    result = run_tool(tool("promtool"), "check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout


def test_promtool_unit_tests_pass():
    """Every file at once, in parallel: the outage matrix alone is a minute of promtool on one core."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda path: run_tool(tool("promtool"), "test", "rules", str(path), timeout=600),
                                PROMTOOL_TESTS))
    failed = [result.stdout + result.stderr for result in results if result.returncode != 0]
    assert not failed, "\n".join(failed)


def promtool_cases() -> list[dict]:
    return [case for path in PROMTOOL_TESTS for case in yaml.safe_load(path.read_text())["tests"]]


def alerts_without_both_cases(alert_names: set[str], cases: list[dict]) -> dict[str, list[str]]:
    """Alert name -> what its promtool cases lack: a case that expects it firing, and a case that
    checks it and never expects it (it stays silent there, not merely pending in a firing case)."""
    fired, silent = set(), set()
    for case in cases:
        expected: dict[str, bool] = {}
        for check in case.get("alert_rule_test", []):
            expected[check["alertname"]] = expected.get(check["alertname"], False) or bool(check.get("exp_alerts"))
        # The outage matrix asks for firing alerts by name: ALERTS{alertname="...",alertstate="firing"}.
        for check in case.get("promql_expr_test", []):
            match = re.search(r'ALERTS\{alertname="([^"]+)",alertstate="firing"', check["expr"])
            if match:
                name = match.group(1)
                expected[name] = expected.get(name, False) or bool(check.get("exp_samples"))
        fired |= {name for name, fires in expected.items() if fires}
        silent |= {name for name, fires in expected.items() if not fires}
    lacking = {name: [what for what, seen in (("a firing case", fired), ("a stays-silent case", silent))
                      if name not in seen] for name in alert_names}
    return {name: what for name, what in sorted(lacking.items()) if what}


def test_every_alert_has_a_firing_and_a_stays_silent_promtool_case():
    """What docs/monitoring.md promises: every alert fires on a series that should page or ticket, and
    some case checks it on series that should not and expects nothing. A new alert without both fails.
    The Watchdog alone is never silent: its silence is what the dead man's switch pages on."""
    lacking = alerts_without_both_cases({alert["alert"] for alert in all_alerts()}, promtool_cases())
    assert lacking == {rules.WATCHDOG: ["a stays-silent case"]}


def test_the_case_check_names_an_alert_without_a_silent_case_or_without_any():
    """The check above on a broken copy of the cases: DigitsModelServerAbsent's stays-silent cases taken
    out (its own, and the outage matrix's), and an alert that no case mentions."""
    cases = [case for case in promtool_cases() if case["name"] != "a present server is not absent"
             and not case["name"].startswith("DigitsModelServerAbsent stays silent")]
    alert_names = {alert["alert"] for alert in all_alerts()} | {"DigitsSomethingNew"}
    assert alerts_without_both_cases(alert_names, cases) == {
        "DigitsModelServerAbsent": ["a stays-silent case"],
        "DigitsSomethingNew": ["a firing case", "a stays-silent case"],
        rules.WATCHDOG: ["a stays-silent case"],
    }


def test_every_alert_carries_what_on_call_needs():
    runbook = RUNBOOK.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in runbook.splitlines() if line.startswith(("## ", "### "))}
    for alert in all_alerts():
        name, labels, annotations = alert["alert"], alert["labels"], alert["annotations"]
        assert "for" in alert, name
        url = annotations["runbook_url"]
        assert url.startswith(f"{rules.RUNBOOK_BASE}#") and url.startswith("http"), f"{name}: {url} is not absolute"
        assert url.split("#", 1)[1] in anchors, f"{name}: no section {url} in docs/runbook.md"
        if name == rules.WATCHDOG:  # always firing, routed to the dead man's switch; no labels to template
            assert labels["severity"] == "none" and alert["expr"] == "vector(1)"
            continue
        assert labels["severity"] in ("critical", "warning"), name
        assert "{{" not in annotations["summary"], f"{name}: the summary is static, the description templated"
        assert "{{ $labels." in annotations["description"], name
        assert any(word in annotations["description"] for word in ("model", "instance", "pod", "namespace")), name


def test_drift_is_a_warning_held_for_an_hour_never_a_page():
    for alert in all_alerts():
        if alert["alert"] in ("DigitsPredictionDrift", "DigitsConfidenceDrop"):
            assert alert["labels"]["severity"] == "warning"
            assert alert["for"] in ("1h", "2h", "3h"), alert["for"]


def test_burn_rate_alerts_follow_the_workbook():
    """Pairs 1h/5m 14.4x and 6h/30m 6x page; 1d/2h 3x and 3d/6h 1x ticket; each with a traffic guard."""
    for name in ("DigitsAvailabilityBudgetBurn", "DigitsLatencyBudgetBurn"):
        found = {(a["labels"]["long_window"], a["labels"]["short_window"], a["labels"]["severity"])
                 for a in all_alerts() if a["alert"] == name}
        assert found == {("1h", "5m", "critical"), ("6h", "30m", "critical"),
                         ("1d", "2h", "warning"), ("3d", "6h", "warning")}
        for alert in (a for a in all_alerts() if a["alert"] == name):
            assert f">= {rules.MIN_REQUESTS_IN_WINDOW}" in alert["expr"]


def test_the_latency_threshold_is_a_bucket_bound_in_both_spellings():
    """TF Serving and Prometheus 2 write the bound `121440` (absl::StrCat of 10 * 1.8**16 = 121439.53: six
    significant digits); Prometheus 3 stores it as `121440.0`. The rules select both, and nothing else."""
    assert names.LATENCY_THRESHOLD_US in names.LATENCY_BUCKETS_US
    text = "".join(path.read_text() for path in RULE_FILES)
    regex = names.bucket_regex(names.LATENCY_THRESHOLD_US)
    assert f'le=~"{regex}"' in text and not re.search(r'[{,]le="', text)
    pattern = re.compile(regex.replace("\\\\", "\\"))  # PromQL's string escaping undone
    assert [bool(pattern.fullmatch(le)) for le in ("121440", "121440.0", "1214400", "121440x0", "1.2144e+05")] == [
        True, True, False, False, False]


def test_rules_match_rest_and_grpc_predicts():
    text = "".join(path.read_text() for path in RULE_FILES)
    assert 'API=~"predict|Predict"' in text
    assert 'API="predict"' not in text and 'API="Predict"' not in text


def test_amtool_accepts_the_alertmanager_config():
    result = run_tool(tool("amtool"), "check-config", str(ALERTMANAGER_YML))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("labels, receiver", [
    (["severity=critical", "alertname=DigitsModelServerDown"], "pager"),
    (["severity=warning", "alertname=DigitsPredictionDrift"], "tickets"),
    (["alertname=SomethingUnlabelled"], "tickets"),
    (["severity=none", "alertname=DigitsWatchdog"], "deadmansswitch"),
])
def test_alertmanager_routes_pages_and_tickets(labels, receiver):
    result = run_tool(tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == receiver


def test_alertmanager_config_has_no_secrets():
    text = ALERTMANAGER_YML.read_text().lower()
    for secret in ("password", "api_key", "routing_key:", "service_key:", "token:", "auth_password"):
        assert secret not in text


def test_prometheus_config_scrapes_the_server_where_tf_serving_exports():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[names.SERVING_JOB]["metrics_path"] == names.METRICS_PATH
    assert {names.PROMETHEUS_JOB, names.ALERTMANAGER_JOB} <= set(jobs)
    # The web app serves prometheus-client's page at Prometheus' default path.
    assert "metrics_path" not in jobs[names.WEB_JOB]
    assert config["rule_files"] == ["rules/*.yml"]


def test_loopback_configs_are_the_committed_ones_with_local_addresses(tmp_path):
    config = local.StackConfig(data_dir=tmp_path, serving_targets=("127.0.0.1:18501",), prometheus_port=19090,
                               alertmanager_port=19093, receiver_port=19095, blackbox_port=19115, group_wait="1s")
    prometheus = local.prometheus_config(config)
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    assert targets == {names.SERVING_JOB: ["127.0.0.1:18501"], names.PROMETHEUS_JOB: ["127.0.0.1:19090"],
                       names.ALERTMANAGER_JOB: ["127.0.0.1:19093"], names.BLACKBOX_JOB: ["127.0.0.1:19115"],
                       names.PROBE_JOB: ["http://127.0.0.1:18501/v1/models/digits:predict"]}
    assert prometheus["rule_files"] == [str(tmp_path.resolve() / "rules" / "*.yml")]
    committed = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert [job["metrics_path"] for job in prometheus["scrape_configs"] if "metrics_path" in job] == \
           [job["metrics_path"] for job in committed["scrape_configs"] if "metrics_path" in job]
    # The probe job: the module from its target group, scraped at the loopback exporter.
    [probe] = [job for job in prometheus["scrape_configs"] if job["job_name"] == names.PROBE_JOB]
    assert probe["static_configs"] == [{"targets": ["http://127.0.0.1:18501/v1/models/digits:predict"],
                                        "labels": {"__param_module": names.PROBE_PREDICT_MODULE}}]
    assert [relabel["replacement"] for relabel in probe["relabel_configs"]
            if relabel.get("target_label") == "__address__"] == ["127.0.0.1:19115"]
    alertmanager = local.alertmanager_config(config)
    urls = [hook["url"] for receiver in alertmanager["receivers"] for hook in receiver["webhook_configs"]]
    committed_paths = [urlsplit(hook["url"]).path for receiver in yaml.safe_load(ALERTMANAGER_YML.read_text())[
        "receivers"] for hook in receiver.get("webhook_configs", [])]
    assert urls == [f"http://127.0.0.1:19095{path}" for path in committed_paths]
    assert {"/pager", "/tickets"} <= set(committed_paths)
    assert alertmanager["route"]["group_wait"] == "1s"
    assert alertmanager["inhibit_rules"] == yaml.safe_load(ALERTMANAGER_YML.read_text())["inhibit_rules"]
    # With a web app to scrape, its job is kept and pointed at it.
    with_web = local.prometheus_config(local.StackConfig(data_dir=tmp_path, web_targets=("127.0.0.1:18080",)))
    assert {job["job_name"]: job["static_configs"][0]["targets"] for job in with_web["scrape_configs"]}[
        names.WEB_JOB] == ["127.0.0.1:18080"]
    # gRPC health probes only where asked for (neither TF Serving nor `digits serve` implements them yet).
    with_grpc = local.prometheus_config(local.StackConfig(data_dir=tmp_path, grpc_targets=("127.0.0.1:18500",)))
    [probe] = [job for job in with_grpc["scrape_configs"] if job["job_name"] == names.PROBE_JOB]
    assert probe["static_configs"][1] == {"targets": ["127.0.0.1:18500"],
                                          "labels": {"__param_module": names.PROBE_GRPC_MODULE}}


def test_the_local_rules_link_to_the_runbook_on_the_receiver(tmp_path):
    """`digits monitor` writes the generator's rules with every runbook link on its own receiver."""
    config = local.StackConfig(data_dir=tmp_path, receiver_port=19095)
    links = [rule["annotations"]["runbook_url"] for document in local.local_rule_files(config).values()
             for group in document["groups"] for rule in group["rules"] if "alert" in rule]
    assert links and all(link.startswith("http://127.0.0.1:19095/runbook#") for link in links)


def test_a_scrape_job_without_a_loopback_target_is_refused(tmp_path, monkeypatch):
    committed = yaml.safe_load(PROMETHEUS_YML.read_text())
    committed["scrape_configs"].append({"job_name": "mystery", "static_configs": [{"targets": ["x:1"]}]})
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(committed))
    monkeypatch.setattr(local, "PROMETHEUS_CONFIG", path)
    with pytest.raises(local.MonitoringError, match="mystery"):
        local.prometheus_config(local.StackConfig(data_dir=tmp_path))


def test_monitor_without_the_binaries_says_how_to_install_them(tmp_path):
    result = run_digits("monitor", "--data-dir", tmp_path / "m", env={"PATH": str(Path(sys.executable).parent)},
                        timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: prometheus not found: install them with `apt-get install prometheus prometheus-alertmanager "
        "prometheus-blackbox-exporter` (Debian/Ubuntu) or put them on PATH")
    assert "Traceback" not in result.stderr


def test_monitor_refuses_a_bad_serving_address(tmp_path):
    result = run_digits("monitor", "--serving", "nowhere", "--data-dir", tmp_path / "m", timeout=60)
    assert result.returncode == 2 and "expected HOST:PORT" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def alert_receiver(tmp_path):
    port = free_port()
    log = tmp_path / "alerts.jsonl"
    process = subprocess.Popen([sys.executable, str(local.ALERT_RECEIVER), "--port", str(port), "--log", str(log)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        local.wait_ready("alert receiver", process, f"http://127.0.0.1:{port}/healthz", tmp_path / "none.log", 30)
        yield f"http://127.0.0.1:{port}", process, log
    finally:
        process.terminate()
        process.wait(timeout=30)


def _post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_alert_receiver_prints_each_alert_and_logs_the_payload(alert_receiver):
    url, process, log = alert_receiver
    payload = {"version": "4", "status": "firing", "alerts": [{
        "status": "firing",
        "labels": {"alertname": "DigitsModelServerDown", "severity": "critical", "instance": "127.0.0.1:1",
                   "job": names.SERVING_JOB},
        "annotations": {"description": "down", "runbook_url": "docs/runbook.md#digitsmodelserverdown"}}]}
    assert _post(f"{url}/pager", json.dumps(payload).encode()) == (200, "ok\n")
    assert _post(f"{url}/pager", b"not json")[0] == 400
    assert _post(f"{url}/pager", b'{"alerts": 3}')[0] == 400
    [record] = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["receiver"] == "pager" and record["payload"] == payload
    process.terminate()
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert ("[pager] FIRING critical DigitsModelServerDown instance=127.0.0.1:1 job=digits-serving: down "
            "(runbook: docs/runbook.md#digitsmodelserverdown)") in out.splitlines()


def test_alert_receiver_serves_the_runbook_with_each_alerts_anchor(tmp_path):
    """GET /runbook is docs/runbook.md as HTML; every alert's link anchor is an element id on it."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(local.ALERT_RECEIVER), "--port", str(port),
                                "--runbook", str(RUNBOOK)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        local.wait_ready("alert receiver", process, f"http://127.0.0.1:{port}/healthz", tmp_path / "none.log", 30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/runbook", timeout=10) as response:
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            page = response.read().decode()
    finally:
        process.terminate()
        process.wait(timeout=30)
    ids = set(re.findall(r'id="([^"]+)"', page))
    anchors = {alert["annotations"]["runbook_url"].split("#")[1] for alert in all_alerts()}
    assert "digitsmodelserverdown" in anchors and sorted(anchors - ids) == []


@pytest.mark.parametrize("width, height", [(390, 844), (1280, 900)], ids=["phone", "desktop"])
def test_a_runbook_link_opens_its_section_readable_on_a_phone(tmp_path, browser, width, height):
    """What an on-call person sees when a page's link opens in Chromium: the alert's heading at the top of
    the window, its causes painted as a list, and nothing wider than the screen (long queries scroll
    inside their own block), at phone and desktop width."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(local.ALERT_RECEIVER), "--port", str(port),
                                "--runbook", str(RUNBOOK)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    page = browser.new_page(viewport={"width": width, "height": height})
    try:
        local.wait_ready("alert receiver", process, f"http://127.0.0.1:{port}/healthz", tmp_path / "none.log", 30)
        page.goto(f"http://127.0.0.1:{port}/runbook#digitspredictprobefailing")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"runbook-{width}.png"))
        heading = page.locator("#digitspredictprobefailing").bounding_box()
        assert abs(heading["y"]) < 5 and heading["x"] >= 0 and heading["x"] + heading["width"] <= width
        causes = page.locator("#digitspredictprobefailing ~ ul").first.locator("li")
        assert causes.count() >= 5 and causes.first.bounding_box()["height"] > 0
        assert page.evaluate("document.documentElement.scrollWidth") == width
    finally:
        page.close()
        process.terminate()
        process.wait(timeout=30)


def test_alert_receiver_refuses_a_missing_runbook_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(local.ALERT_RECEIVER), "--port", str(free_port()),
                             "--runbook", str(tmp_path / "nope.md")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --runbook {tmp_path / 'nope.md'}: no such file"


BLACKBOX_YML = MONITORING / "blackbox" / "blackbox.yml"


def blackbox_modules() -> dict:
    return yaml.safe_load(BLACKBOX_YML.read_text())["modules"]


def test_the_blackbox_exporter_accepts_its_config():
    result = run_tool(tool("prometheus-blackbox-exporter"), f"--config.file={BLACKBOX_YML}", "--config.check")
    assert result.returncode == 0 and "Config file is ok" in result.stderr, result.stderr
    assert set(blackbox_modules()) == set(names.PROBE_MODULES)


def test_the_predict_probe_sends_a_real_digit_and_wants_it_named():
    """The probe's body is probe_digit.json, which is the first PROBE_DIGIT of the embedded MNIST digits as
    `python -m monitoring.blackbox.probe_digit` makes it; the answer must name that digit."""
    from data.contract import PREDICTED_CLASS_OUTPUT
    from monitoring.blackbox.probe_digit import BODY_FILE, probe_body

    module = blackbox_modules()[names.PROBE_PREDICT_MODULE]
    assert (module["prober"], module["http"]["method"], module["http"]["valid_status_codes"]) == ("http", "POST", [200])
    assert module["http"]["body"] == BODY_FILE.read_text().strip() == probe_body()
    [pattern] = module["http"]["fail_if_body_not_matches_regexp"]
    assert pattern == rf'"{PREDICTED_CLASS_OUTPUT}":\s*{names.PROBE_DIGIT}\b'
    answer = {"predictions": [{PREDICTED_CLASS_OUTPUT: names.PROBE_DIGIT, "probabilities": [0.1] * 10}]}
    assert re.search(pattern, json.dumps(answer)) and re.search(pattern, json.dumps(answer, indent=4))
    wrong = {"predictions": [{PREDICTED_CLASS_OUTPUT: names.PROBE_DIGIT + 10}]}
    assert not re.search(pattern, json.dumps(wrong))
    grpc = blackbox_modules()[names.PROBE_GRPC_MODULE]
    assert grpc["prober"] == "grpc" and grpc["grpc"]["tls"] is False and grpc["grpc"]["service"] == ""


def test_monitor_starts_both_and_ctrl_c_stops_everything(tmp_path):
    """`digits monitor` prints its URLs, serves Prometheus and Alertmanager, and SIGINT stops all of it."""
    import signal
    import time

    ports = {name: free_port() for name in ("prometheus", "alertmanager", "receiver", "blackbox")}
    process = subprocess.Popen(
        [sys.executable, "-m", "digits", "monitor", "--data-dir", str(tmp_path / "m"), "--serving", "127.0.0.1:1",
         "--prometheus-port", str(ports["prometheus"]), "--alertmanager-port", str(ports["alertmanager"]),
         "--receiver-port", str(ports["receiver"]), "--blackbox-port", str(ports["blackbox"])],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # SIGABRT dumps every thread's stack
    try:
        deadline = time.monotonic() + 60
        lines = []
        while not any(line.startswith("alerts are printed below") for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines) + process.stderr.read()
            lines.append(process.stdout.readline())
        assert f"Prometheus    http://127.0.0.1:{ports['prometheus']}" in "".join(lines)
        for port, path in ((ports["prometheus"], "/-/ready"), (ports["alertmanager"], "/-/ready"),
                           (ports["receiver"], "/healthz"), (ports["receiver"], "/runbook"),
                           (ports["blackbox"], "/-/healthy")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                assert response.status == 200
        children = subprocess.run(["pgrep", "-f", str(tmp_path / "m")], capture_output=True, text=True,
                                  check=False).stdout.split()
        assert len(children) >= 4  # prometheus, alertmanager, the exporter, the receiver (and `digits monitor`)
        process.send_signal(signal.SIGINT)
        try:
            # Stopping is bounded by design at 3 x (10 s SIGTERM grace + 10 s after SIGKILL).
            out, err = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            out, err = process.communicate(timeout=30)
            pytest.fail(f"`digits monitor` still running 90 s after Ctrl-C; where it was:\n{err[-6000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        if process.returncode != 0:  # what it started, if it could not stop them itself
            for pid in subprocess.run(["pgrep", "-f", str(tmp_path / "m")], capture_output=True, text=True,
                                      check=False).stdout.split():
                os.kill(int(pid), signal.SIGKILL)
    assert process.returncode == 0, err
    assert out.strip().endswith("stopped") and "Traceback" not in err
    assert error_lines(err) == [], err  # a successful run is quiet
    still = subprocess.run(["pgrep", "-f", str(tmp_path / "m")], capture_output=True, text=True, check=False)
    assert still.stdout.split() == []
    for port in ports.values():
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
