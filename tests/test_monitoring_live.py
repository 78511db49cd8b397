"""The monitoring stack against the real thing: Prometheus, Alertmanager and the blackbox exporter (Debian
binaries) scraping and probing a real `digits serve` that gets real REST and gRPC traffic, good and bad,
all on loopback.

One stack and one dedicated server are shared by the module (the shared `model_server` must keep
running, and the last test here stops this one). Scrape and evaluation run every second and
Alertmanager groups for a second: for the test only. The rules are the generator's with runbook links
on the stack's receiver (as `digits monitor` writes them), but in a copy the `for:` of the alerts in
SHORTENED_FOR is shortened to SHORT_FOR and the SLO-budget group is evaluated at the global interval
instead of every 5 minutes: those waits exist for production, and promtool's unit tests check the
committed rules.

The server serves a copy of the pushed model whose output bias for names.PROBE_DIGIT is raised, so that
it answers the predict probe's digit (the tiny random-init model answers one class for every image,
whichever), with a reference profile of ten equal shares (as the MNIST eval split has) in place of its
own: the few answers sent here can then never match the reference, and PSI has a value to check.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path

import grpc
import pytest
import requests
import yaml

import grafana_lint
from components.reference import CLASS_SHARE_KEY, profile_path, read_reference_profile, to_json
from conftest import REPO, start_server
from data.contract import CLASS_NAMES
from grafana_lint import selectors
from model_copies import copy_version_answering
from monitoring import local, names, rules
from prometheus_api import free_port, result, wait_for
from serving.config import ServerConfig
from serving_clients import grpc_predict, predict_rest
from web.process import start_web

pytestmark = pytest.mark.slow

RULE_FILES = sorted((REPO / "monitoring" / "prometheus" / "rules").glob("*.yml"))
SHORT_FOR = "5s"
SHORTENED_FOR = {"DigitsModelServerDown": "2m", "DigitsPredictProbeFailing": "2m"}  # alert: committed `for`
BUDGET_GROUP = "digits-slo-budget"


def rules_without_production_waits(documents: dict[str, dict], directory: Path) -> Path:
    """The rule files in `directory`, with the `for` of the SHORTENED_FOR alerts shortened to SHORT_FOR and
    the SLO-budget group at the global evaluation interval; nothing else changes."""
    directory.mkdir()
    changed = []
    for name, document in documents.items():
        for group in document["groups"]:
            if group["name"] == BUDGET_GROUP:
                assert group.pop("interval") == "5m", group["name"]  # what the copy drops
                changed.append(group["name"])
            for rule in group["rules"]:
                if rule.get("alert") in SHORTENED_FOR:
                    assert rule["for"] == SHORTENED_FOR[rule["alert"]], rule  # what the copy shortens
                    rule["for"] = SHORT_FOR
                    changed.append(rule["alert"])
        (directory / name).write_text(rules.render(document))
    assert sorted(changed) == sorted([BUDGET_GROUP, *SHORTENED_FOR])
    return directory


KUBERNETES_RULES = "digits-kubernetes.yml"


def served_copy_answering_the_probe(pushed_model: Path, directory: Path) -> Path:
    """The pushed model's version, copied to answer names.PROBE_DIGIT, with a reference profile of ten
    equal shares."""
    (source,) = pushed_model.iterdir()
    version = copy_version_answering(source, directory / source.name, names.PROBE_DIGIT)
    profile = read_reference_profile(str(version))
    Path(profile_path(str(version))).write_text(
        to_json({**profile, CLASS_SHARE_KEY: dict.fromkeys(CLASS_NAMES, 1 / len(CLASS_NAMES))}))
    return directory


def rules_by_name(paths: list[Path] = RULE_FILES) -> list[tuple[str, str]]:
    """(recorded series or alert name, expression) of every rule, in file order."""
    return [(rule.get("record") or rule["alert"], rule["expr"]) for path in paths
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def rule_exprs(paths: list[Path] = RULE_FILES) -> list[str]:
    return [expr for _, expr in rules_by_name(paths)]


def recorded_names() -> set[str]:
    return {rule["record"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (its series selectors)."""
    return {selector.metric for selector in selectors(expr) if selector.metric}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, query refId, query ready for Prometheus) of every query of the dashboard."""
    return [(panel["title"], target["refId"], grafana_lint.substitute(target["expr"]))
            for panel in grafana_lint.panels(grafana_lint.load()) for target in panel.get("targets") or []]


@pytest.fixture(scope="module")
def served_model(pushed_model, tmp_path_factory) -> Path:
    return served_copy_answering_the_probe(pushed_model, tmp_path_factory.mktemp("served") / "digits")


@pytest.fixture(scope="module")
def monitored(served_model, tmp_path_factory, sample_tree):
    """(server, stack config, stack) with traffic sent and scraped at least twice."""
    server = start_server(served_model)
    data = tmp_path_factory.mktemp("monitoring")
    web_app = start_web("--serving-url", server.rest_url, "--feedback-dir", data / "feedback",
                        "--model-dir", served_model)
    host, port = server.rest_url.removeprefix("http://").split(":")
    config = local.StackConfig(
        data_dir=data, serving_targets=(f"{host}:{port}",), web_targets=(web_app.url.removeprefix("http://"),),
        prometheus_port=free_port(), alertmanager_port=free_port(), receiver_port=free_port(),
        blackbox_port=free_port(), grpc_targets=(server.grpc_target,), scrape_interval="1s", evaluation_interval="1s", group_wait="1s",
        group_interval="1s", resend_delay="1s")  # a fresh stack's first alerts: seconds, not a minute
    config = replace(config, rules_dir=rules_without_production_waits(local.local_rule_files(config),
                                                                      data / "short-rules"))
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
            # Refused before any handler: a body over the server's limit (counted apart, not a request).
            over = requests.post(f"{server.rest_url}/v1/models/digits:predict",
                                 data=b"x" * (ServerConfig.max_body_bytes + 1), timeout=60)
            assert over.status_code == 413
            # Through the web page's backend: three answers, one judged right, one corrected.
            answers = [requests.post(f"{web_app.url}/api/predict", data=digit, timeout=60).json()
                       for digit in digits[16:19]]
            for answer, verdict in zip(answers, (0, 1)):
                judged = {"id": answer["id"], "digit": (answer["digit"] + verdict) % 10}
                assert requests.post(f"{web_app.url}/api/feedback", json=judged, timeout=30).status_code == 200
            assert requests.post(f"{web_app.url}/api/predict", data=b"nope", timeout=30).status_code == 415
            _wait_scrapes(config, 3)
        wait_for(lambda: result(config.prometheus_url, f'{rules.REQUESTS_BY_STATUS}{{status="INVALID_ARGUMENT"}}'),
                 timeout=60, what="the recorded request rate by status")
        yield server, config, stack
    finally:
        stack.stop()
        web_app.stop()
        server.stop()
        receiver_log.close()


def _wait_scrapes(config: local.StackConfig, count: int) -> None:
    """Waits until Prometheus has scraped every target `count` more times (its stalest `up` sample moved)."""
    def stalest() -> float | None:
        series = result(config.prometheus_url, "min(timestamp(up))")
        return float(series[0]["value"][1]) if series else None

    seen = [stalest()]

    def scraped() -> bool:
        latest = stalest()
        if latest is not None and latest != seen[-1]:
            seen.append(latest)
        return len(seen) > count

    wait_for(scraped, timeout=60, interval=0.2, what=f"{count} more scrapes of every target")


@dataclass(frozen=True)
class Series:
    """After the traffic: at least one series, each with exactly these labels (its name aside), the
    `job` labels together exactly `jobs`, and `model_name` (where there is one) the served model."""
    labels: frozenset[str]
    jobs: frozenset[str]


@dataclass(frozen=True)
class Empty:
    """No series, for this reason. `unless`: the series it returns where a loaded machine can break
    `reason` (then their labels are checked instead)."""
    reason: str
    unless: Series | None = None


def series(*labels: str, jobs: tuple[str, ...] = (names.SERVING_JOB,)) -> Series:
    return Series(frozenset(labels), frozenset(jobs) if "job" in labels else frozenset())


JOB_MODEL = ("job", "model_name")
VERSION = ("job", "model_name", "model_version")
MODEL_VERSION = ("model_name", "model_version")  # drift: per model version, whichever job counted it
ANSWERING = (names.SERVING_JOB, names.WEB_JOB)  # the model server and the web app both count answers
WEB = (names.WEB_JOB,)
FEW_PREDICTS = f"fewer than {rules.MIN_REQUESTS_IN_WINDOW} predicts in every window"
FEW_PREDICTIONS = f"fewer than {rules.MIN_PREDICTIONS_FOR_DRIFT} predictions in the hour"
NO_SHEET_WAITS = "the fixture sends no sheet: none waits for a person"
# Series a healthy app does not export, each for this reason: absent from the scrape, not misspelt.
ABSENT_WHILE_HEALTHY = {names.WEB_SHEET_OLDEST_PENDING: f"{NO_SHEET_WAITS} (the series exists while one does)"}

# What each rule's expression returns once the fixture's traffic is recorded, by recorded series or
# alert name. Nothing is wrong, so every alert's expression is empty, each for its own reason.
RULE_RESULTS: dict[str, Series | Empty] = {
    rules.REQUESTS_BY_STATUS: series(*JOB_MODEL, "status"),
    rules.PREDICTS_OK_BY_API: series(*JOB_MODEL, "API"),
    # Every window: both SLIs; up to a day, the volumes; from the counters (up to 6h), the bad events.
    **{recorded(window): series(*JOB_MODEL) for window in (*rules.SLI_WINDOWS, names.SLO_WINDOW)
       for recorded in (*(partial(rules.ratio, slo) for slo in names.SLOS),
                        *((rules.predicts, partial(rules.events, names.LATENCY))
                          if window in rules.SLI_WINDOWS else ()),
                        *(partial(rules.bad_events, slo) for slo in names.SLOS if window in rules.RAW_WINDOWS))},
    rules.AVAILABILITY_BUDGET_REMAINING: series(*JOB_MODEL),
    rules.LATENCY_BUDGET_REMAINING: series(*JOB_MODEL),
    rules.PREDICTIONS_RATE_BY_JOB: series(*VERSION, jobs=ANSWERING),
    rules.PREDICTIONS_RATE: series(*MODEL_VERSION),
    rules.CLASS_SHARE: series(*MODEL_VERSION, "predicted_class"),
    rules.CONFIDENCE_MEAN: series(*MODEL_VERSION),
    rules.REFERENCE_SHARE: series(*MODEL_VERSION, "predicted_class"),
    rules.REFERENCE_CONFIDENCE: series(*MODEL_VERSION),
    rules.PSI: series(*MODEL_VERSION),
    rules.REFUSAL_SHARE: series(*MODEL_VERSION),
    rules.REFERENCE_REFUSAL: series(*MODEL_VERSION),
    rules.WEB_REQUESTS_RATE: series("job", "endpoint", "outcome", jobs=WEB),
    **{rules.web_latency(q): series("job", "endpoint", jobs=WEB) for q in rules.WEB_QUANTILES},
    rules.WEB_MODEL_ERROR_RATIO: series("job", jobs=WEB),
    rules.FEEDBACK_RATE: series(*VERSION, jobs=WEB),
    rules.ONLINE_ACCURACY: series(*VERSION, jobs=WEB),
    rules.CORRECTIONS_RATE: series(*VERSION, "predicted_class", "corrected_class", jobs=WEB),
    rules.PROBE_SUCCESS_RATIO: series("job", "module", jobs=(names.PROBE_JOB,)),
    rules.WATCHDOG: series(),  # always firing, by design: it has no labels to keep
    "DigitsPredictProbeFailing": Empty("the server answers the probe's digit"),
    "DigitsPredictsNotFound": Empty("predicts are answered"),
    "DigitsClientErrorsHigh": Empty(f"{FEW_PREDICTS} in 30 minutes"),
    **{name: Empty("no kube-state-metrics or cAdvisor outside Kubernetes")
       for name in ("DigitsNoReadyReplicas", "DigitsPodCrashLooping", "DigitsHPAAtMaximum", "DigitsContainerOOMKilled",
                    "DigitsCPUThrottling")},
    "DigitsModelServerDown": Empty("the model server answers every scrape"),
    "DigitsModelServerAbsent": Empty("the model server is a scrape target"),
    "DigitsAvailabilityBudgetBurn": Empty(f"no server error, and {FEW_PREDICTS}"),
    "DigitsLatencyBudgetBurn": Empty(f"{FEW_PREDICTS}, however slow this machine made them"),
    "DigitsModelLoadFailed": Empty("the one version loaded"),
    "DigitsNoModelVersionLoaded": Empty("the version is loaded"),
    "DigitsBatchQueueingSlow": Empty(
        f"requests come one at a time and wait the 2 ms batch timeout, far under the "
        f"{rules.QUEUING_P99_THRESHOLD_US} us threshold", unless=series("job", "instance")),
    "DigitsPredictTrafficStopped": Empty("predicts were answered in the last 30 minutes, and no day before exists"),
    "DigitsPredictionDrift": Empty(FEW_PREDICTIONS),
    "DigitsConfidenceDrop": Empty(FEW_PREDICTIONS),
    "DigitsRefusalsHigh": Empty(FEW_PREDICTIONS),
    "DigitsReferenceProfileMissing": Empty("the version has its reference profile"),
    "DigitsOnlineAccuracyLow": Empty(f"fewer than {rules.MIN_FEEDBACK_FOR_ACCURACY} judgements in the day "
                                     "(the accuracy itself, 0.5, is below the threshold)"),
    "DigitsWebAppDown": Empty("the web app answers every scrape"),
    "DigitsWebModelServerErrors": Empty("no predict of the page failed at the model server"),
    "DigitsSheetReviewBacklogGrowing": Empty(NO_SHEET_WAITS),
    "DigitsSheetWaitingTooLong": Empty(f"{NO_SHEET_WAITS}: the oldest sheet's series is absent"),
    "DigitsMonitoringTargetDown": Empty("Prometheus and Alertmanager answer their scrapes"),
    "DigitsAlertNotificationsFailing": Empty("no notification failed"),
    "DigitsRuleEvaluationFailing": Empty("every rule evaluates"),
}

# The same for every dashboard query, by panel title (and refId where a panel's queries differ).
# $model and $instance stand for every value (grafana_lint.LIVE_VALUES).
NO_SERVER_ERROR = "no request failed for the server's reasons: the fixture's errors are all the client's"
DASHBOARD_RESULTS: dict[str, Series | Empty | dict[str, Series | Empty]] = {
    "Availability (30d)": series(*JOB_MODEL),
    "Availability error budget left": series(*JOB_MODEL),
    "Latency (30d)": series(*JOB_MODEL),
    "Latency error budget left": series(*JOB_MODEL),
    "Availability SLI by window": series(*JOB_MODEL),
    "Latency SLI by window": series(*JOB_MODEL),
    "Requests by status": series(*JOB_MODEL, "status"),
    "Predicts by transport": {"A": series(*JOB_MODEL, "API", "transport"), "B": series(*JOB_MODEL)},
    "Failed requests, share of all": {"A": Empty(NO_SERVER_ERROR), "B": series(*JOB_MODEL, "status"),
                                      "C": Empty("no request was abandoned (CANCELLED)")},
    "Probe success by module": series("job", "module", jobs=(names.PROBE_JOB,)),
    "Probe duration": series("instance", "module"),
    "Client errors, share of predicts": series(*JOB_MODEL),
    "Refused requests": series("instance", "reason"),
    "Version states": series("model_version", "state", "error_code"),
    "Predict latency by transport": series("API", "transport"),
    "Request vs model run latency": series(),
    "Processed batch size": series("le"),
    "Batch queueing latency": series("instance"),
    "Batched model calls": series("instance"),
    "Mean batch and padding size": series("instance"),
    "Loaded versions": series("model_version"),
    "Model loads": series("model_path", "status"),
    # `> 0` keeps only a load seen in the range: the counters of a load that happened before the first
    # scrape are born with their value, so increase() sees none (and 0 / 0 is no point to draw).
    "Load and warmup time": Empty("the only load happened before Prometheus first scraped the server"),
    "Predicted digits vs reference": series("predicted_class"),
    "Prediction drift (PSI)": series(*MODEL_VERSION),
    "Predictions per second": series(*MODEL_VERSION),
    "Top-class confidence": series("le"),
    "Mean confidence vs reference": series(*MODEL_VERSION),
    "Refused or unsure vs reference": series(*MODEL_VERSION),
    "Online accuracy (people's judgements)": series(*VERSION, jobs=WEB),
    "Judgements per day": series(*VERSION, jobs=WEB),
    "Top corrections": series("predicted_class", "corrected_class"),
    "Web requests by outcome": series("job", "endpoint", "outcome", jobs=WEB),
    "Web API latency": series("job", "endpoint", jobs=WEB),
    "Page predicts failing at the model server": series("job", jobs=WEB),
    "Corrections waiting for review": series("job", jobs=WEB),
    # The web app declares every sheet series at 0 for its form when it starts: rates of 0 (and a share of
    # 0 / 0, NaN, drawn as a gap) until a sheet is read.
    "Sheets read per hour, by verdict": series(names.FORM_LABEL, "outcome"),
    "Sheets a person must look at": series(names.FORM_LABEL),
    "Counts and failed checks per hour": {"A": series(names.FORM_LABEL, "outcome"),
                                          "B": series(names.FORM_LABEL, names.CHECK_LABEL)},
    # The review queue's length is read from its (empty) directory: 0; both verdicts' counters start at 0.
    "Sheets waiting for a person": series(names.FORM_LABEL),
    "Oldest waiting sheet": Empty(f"{NO_SHEET_WAITS}: the oldest sheet's series is absent"),
    "Sheet reviews": series(names.FORM_LABEL, names.VERDICT_LABEL),
    "Model servers up": series("job", "instance"),
    "Scrape duration": series("job", "instance"),
}


def dashboard_result(title: str, ref: str) -> Series | Empty:
    expected = DASHBOARD_RESULTS[title]
    return expected[ref] if isinstance(expected, dict) else expected


def check_result(url: str, what: str, expr: str, expected: Series | Empty) -> None:
    """Fails, naming `what`, unless `expr` returns what `expected` says; waits (bounded) for series
    that a rule evaluation has yet to write."""
    if isinstance(expected, Empty):
        found = result(url, expr)
        if found and expected.unless:
            check_series(what, found, expected.unless)
        else:
            assert found == [], f"{what}: expected nothing ({expected.reason}), got {found}"
        return
    check_series(what, wait_for(lambda: result(url, expr), timeout=60, what=f"a result of {what}"), expected)


def check_series(what: str, found: list[dict], expected: Series) -> None:
    labels = [set(sample["metric"]) - {"__name__"} for sample in found]
    assert all(each == expected.labels for each in labels), f"{what}: labels {labels}, expected {set(expected.labels)}"
    assert {sample["metric"].get("job") for sample in found} - {None} == expected.jobs, f"{what}: {found}"
    assert {sample["metric"].get("model_name", names.DEFAULT_MODEL_NAME) for sample in found} == \
           {names.DEFAULT_MODEL_NAME}, f"{what}: {found}"


def test_every_rule_expression_returns_the_series_it_should(monitored):
    """Each recording rule's expression returns series with its aggregation's labels, from the jobs it
    reads; each alert's expression is empty, for the reason RULE_RESULTS states."""
    _, config, _ = monitored
    named = rules_by_name()
    assert {name for name, _ in named} == set(RULE_RESULTS)  # a new rule needs its expectation written
    for name, expr in named:
        check_result(config.prometheus_url, name, expr, RULE_RESULTS[name])


def test_prometheus_loaded_every_rule_without_error(monitored):
    _, config, _ = monitored
    groups = requests.get(f"{config.prometheus_url}/api/v1/rules", timeout=30).json()["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rule_exprs())
    assert [rule["name"] for rule in loaded if rule.get("health") == "err"] == []


def test_every_dashboard_query_returns_the_series_it_should(monitored):
    """Each panel's queries return series with the labels its legend and grouping need, or are empty
    for the reason DASHBOARD_RESULTS states."""
    _, config, _ = monitored
    queries = dashboard_queries()
    assert len(queries) >= 20
    assert {title for title, _, _ in queries} == set(DASHBOARD_RESULTS)  # a new panel needs its expectation
    for title, ref, expr in queries:
        check_result(config.prometheus_url, f"{title!r} {ref}", expr, dashboard_result(title, ref))


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
    # Both the model server and the web app (for the answers it got) count predictions, each its own job;
    # the drift series read the busier job's count, once per model version, not their sum.
    per_job = {sample["metric"]["job"]: float(sample["value"][1])
               for sample in result(url, rules.PREDICTIONS_RATE_BY_JOB)}
    assert set(per_job) == {names.SERVING_JOB, names.WEB_JOB} and per_job[names.SERVING_JOB] > per_job[names.WEB_JOB]
    recorded = one_evaluation(url, rules.PREDICTIONS_RATE_BY_JOB, rules.PREDICTIONS_RATE, rules.CLASS_SHARE)
    [(_, rate)] = recorded[rules.PREDICTIONS_RATE]
    assert rate == max(value for _, value in recorded[rules.PREDICTIONS_RATE_BY_JOB])
    shares = recorded[rules.CLASS_SHARE]
    assert all("job" not in labels for labels, _ in shares)
    assert sum(share for _, share in shares) == pytest.approx(1)
    [confidence] = result(url, rules.CONFIDENCE_MEAN)
    assert "job" not in confidence["metric"] and 0 < float(confidence["value"][1]) <= 1


def population_stability_index(live: dict[str, float], reference: dict[str, float], floor: float) -> float:
    """PSI as docs/monitoring.md defines it, written here apart from the rule: the sum over the classes
    of (live - reference) * ln(live / reference), shares floored at `floor`, a class never answered 0."""
    index = 0.0
    for name, reference_share in reference.items():
        live_share, reference_share = max(live.get(name, 0.0), floor), max(reference_share, floor)
        index += (live_share - reference_share) * math.log(live_share / reference_share)
    return index


def one_evaluation(url: str, *recorded: str) -> dict[str, list[tuple[dict, float]]]:
    """Recorded series name -> (labels, value), as the newest rule evaluation left them: one group's rules
    share its evaluation's timestamp, and separate instant queries could straddle two evaluations.
    Series that an earlier evaluation wrote and the newest did not (gone since) are left out."""
    window = result(url, f'{{__name__=~"{"|".join(recorded)}"}}[30s]')
    newest = max(stamp for series in window for stamp, _ in series["values"])
    found: dict[str, list[tuple[dict, float]]] = {name: [] for name in recorded}
    for series in window:
        values = dict(series["values"])
        if newest in values:
            found[series["metric"]["__name__"]].append((series["metric"], float(values[newest])))
    assert all(found.values()), f"not every series in the newest evaluation: {found}"
    return found


def test_drift_is_the_psi_of_the_live_shares_against_the_served_versions_reference(monitored, served_model):
    """The model server and the web app (with --model-dir, as it must in front of the TF Serving container)
    both export the served version's reference; the PSI Prometheus recorded, once per model version, is
    the one computed here from the class shares it recorded in the same evaluation and the served
    version's reference_profile.json."""
    _, config, _ = monitored
    url = config.prometheus_url
    [version] = [path.name for path in served_model.iterdir()]
    reference = read_reference_profile(str(served_model / version))[CLASS_SHARE_KEY]
    for job in ANSWERING:
        exported = result(url, f'{names.REFERENCE_CLASS_SHARE}{{job="{job}"}}')
        assert {sample["metric"][names.REFERENCE_CLASS_LABEL]: float(sample["value"][1]) for sample in exported} \
            == reference, job
    exported = result(url, rules.REFERENCE_SHARE)
    assert {sample["metric"]["model_version"] for sample in exported} == {version}
    assert {sample["metric"]["predicted_class"]: float(sample["value"][1]) for sample in exported} == reference
    recorded = one_evaluation(url, rules.CLASS_SHARE, rules.PSI)
    live = {labels["predicted_class"]: share for labels, share in recorded[rules.CLASS_SHARE]}
    [(labels, psi)] = recorded[rules.PSI]
    assert labels["model_version"] == version and "job" not in labels
    assert psi == pytest.approx(population_stability_index(live, reference, rules.PSI_FLOOR), rel=1e-9)
    # Answers to 16 images a round cannot fall into ten classes in equal shares.
    assert psi > 0, live
    assert len(result(url, rules.REFERENCE_CONFIDENCE)) == 1


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
    """Catches a `_total` too many, a TF Serving name misspelt, a metric that only exists in a test. The
    Kubernetes group reads kube-state-metrics and cAdvisor, which exist only in a cluster (its promtool
    cases use series shaped as those exporters write them); ABSENT_WHILE_HEALTHY, only when something
    is wrong, and nothing else is missing."""
    _, config, _ = monitored
    scraped = set(requests.get(f"{config.prometheus_url}/api/v1/label/__name__/values", timeout=30).json()["data"])
    off_cluster = [path for path in RULE_FILES if path.name != KUBERNETES_RULES]
    exprs = rule_exprs(off_cluster) + [expr for *_, expr in dashboard_queries()]
    used = set().union(*map(metric_names, exprs)) - recorded_names()
    assert used, "no metric names found: the parser is broken"
    assert {names.REQUEST_COUNT, f"{names.REQUEST_LATENCY}_bucket", names.PREDICTIONS, "up"} <= used
    assert sorted(used - scraped) == sorted(ABSENT_WHILE_HEALTHY), ABSENT_WHILE_HEALTHY


def firing(name: str, **labels: str) -> dict[str, str]:
    """The labels Prometheus would send for alert `name`: the rule's own (severity, and the windows of a
    burn-rate alert, picked by `long_window`) and the labels its expression keeps, given here."""
    [rule] = [rule for rule in rules.alerting_rules() if rule["alert"] == name
              and rule["labels"].get("long_window") == labels.get("long_window")]
    return {"alertname": name, **rule["labels"], **labels}


@dataclass(frozen=True)
class Posted:
    labels: dict[str, str]
    held_back_by: str | None = None  # the key of the alert that inhibits it, per alertmanager.yml


SERVING, SERVER, OTHER_SERVER = names.SERVING_JOB, "serving-1:8501", "serving-2:8501"
MODEL = {"model_name": names.DEFAULT_MODEL_NAME}
VERSION_7 = {**MODEL, "model_version": "7"}
# What docs/runbook.md says the inhibit rules do, one situation each (their alerts are posted together).
# One server down holds back only that instance's own alerts: the job's SLO pages stay live, since the
# other instances may be failing too (one pod of several down must not hide a latency burn).
INHIBITION_SITUATIONS: dict[str, dict[str, Posted]] = {
    "a server down": {
        "down": Posted(firing("DigitsModelServerDown", job=SERVING, instance=SERVER)),
        "queueing": Posted(firing("DigitsBatchQueueingSlow", job=SERVING, instance=SERVER), "down"),
        "no version": Posted(firing("DigitsNoModelVersionLoaded", job=SERVING, instance=SERVER, **MODEL), "down"),
        # The job's SLOs, the other instances and what the failures themselves say are news.
        "latency page": Posted(firing("DigitsLatencyBudgetBurn", job=SERVING, long_window="1h", **MODEL)),
        "availability page": Posted(firing("DigitsAvailabilityBudgetBurn", job=SERVING, long_window="1h", **MODEL)),
        "queueing elsewhere": Posted(firing("DigitsBatchQueueingSlow", job=SERVING, instance=OTHER_SERVER)),
        "traffic stopped": Posted(firing("DigitsPredictTrafficStopped", job=SERVING, **MODEL)),
        "load failed": Posted(firing("DigitsModelLoadFailed", job=SERVING, instance=SERVER,
                                    model_path="/models/digits/7", status="fail")),
        "drift": Posted(firing("DigitsPredictionDrift", **VERSION_7)),
    },
    "a server down in another namespace": {
        "down": Posted(firing("DigitsModelServerDown", job=SERVING, instance=SERVER, namespace="staging")),
        "queueing": Posted(firing("DigitsBatchQueueingSlow", job=SERVING, instance=SERVER, namespace="production")),
    },
    "no server at all": {
        "absent": Posted(firing("DigitsModelServerAbsent", job=SERVING)),
        "latency page": Posted(firing("DigitsLatencyBudgetBurn", job=SERVING, long_window="1h", **MODEL), "absent"),
        "availability page": Posted(firing("DigitsAvailabilityBudgetBurn", job=SERVING, long_window="1h", **MODEL),
                                    "absent"),
        "traffic stopped": Posted(firing("DigitsPredictTrafficStopped", job=SERVING, **MODEL), "absent"),
        "not found": Posted(firing("DigitsPredictsNotFound", job=SERVING, **MODEL), "absent"),
        "drift": Posted(firing("DigitsPredictionDrift", **VERSION_7)),
        "web app down": Posted(firing("DigitsWebAppDown", job=names.WEB_JOB, instance="web:8080")),
        "probe": Posted(firing("DigitsPredictProbeFailing", job=names.PROBE_JOB, instance="http://serving:8501",
                               module=names.PROBE_PREDICT_MODULE)),
    },
    "the whole job gone in one namespace": {
        "absent": Posted(firing("DigitsModelServerAbsent", job=SERVING, namespace="staging")),
        "staging page": Posted(firing("DigitsLatencyBudgetBurn", job=SERVING, long_window="1h", namespace="staging",
                                      **MODEL), "absent"),
        "production page": Posted(firing("DigitsLatencyBudgetBurn", job=SERVING, long_window="1h",
                                         namespace="production", **MODEL)),
    },
    "a page and tickets": {
        "page": Posted(firing("DigitsAvailabilityBudgetBurn", job=SERVING, long_window="1h", **MODEL)),
        "its ticket": Posted(firing("DigitsAvailabilityBudgetBurn", job=SERVING, long_window="1d", **MODEL), "page"),
        "slow-burn ticket": Posted(firing("DigitsAvailabilityBudgetBurn", job=SERVING, long_window="3d", **MODEL),
                                   "page"),
        "another model's ticket": Posted(firing("DigitsAvailabilityBudgetBurn", job=SERVING, long_window="1d",
                                               model_name="letters")),
        "another alert's ticket": Posted(firing("DigitsLatencyBudgetBurn", job=SERVING, long_window="1d", **MODEL)),
        "a ticket alone": Posted(firing("DigitsPredictionDrift", **VERSION_7)),
    },
}


def post_alerts(alertmanager_url: str, alerts: list[dict[str, str]], starts: datetime, ends: datetime) -> None:
    """Sends alerts as Prometheus does: POST /api/v2/alerts (an `endsAt` in the past resolves them)."""
    body = [{"labels": labels, "annotations": {}, "startsAt": _rfc3339(starts), "endsAt": _rfc3339(ends)}
            for labels in alerts]
    response = requests.post(f"{alertmanager_url}/api/v2/alerts", json=body, timeout=30)
    assert response.status_code == 200, response.text


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_states(alertmanager_url: str, posted: dict[str, Posted]) -> dict[str, tuple[str, list[str]]]:
    """Key -> (status.state, the keys of its status.inhibitedBy) for every posted alert Alertmanager lists."""
    listed = requests.get(f"{alertmanager_url}/api/v2/alerts", timeout=30).json()
    keys = {alert["fingerprint"]: key for alert in listed for key, sent in posted.items()
            if alert["labels"] == sent.labels}
    return {keys[alert["fingerprint"]]: (alert["status"]["state"],
                                         [keys.get(source, source) for source in alert["status"]["inhibitedBy"]])
            for alert in listed if alert["fingerprint"] in keys}


@pytest.mark.parametrize("situation", INHIBITION_SITUATIONS)
def test_alertmanager_holds_back_what_the_inhibit_rules_say(monitored, situation):
    """Alerts posted to the real Alertmanager as Prometheus sends them: those the inhibit rules name are
    `suppressed`, `inhibitedBy` the alert that holds them back; the others stay `active`. The alerts are
    resolved afterwards, so that each situation is judged alone."""
    _, config, _ = monitored
    posted = INHIBITION_SITUATIONS[situation]
    expected = {key: ("suppressed", [sent.held_back_by]) if sent.held_back_by else ("active", [])
                for key, sent in posted.items()}
    now = datetime.now(timezone.utc)
    post_alerts(config.alertmanager_url, [sent.labels for sent in posted.values()], now, now + timedelta(minutes=10))
    try:
        # Inhibition is judged on the sources Alertmanager has taken in: wait (bounded) until it agrees.
        deadline = time.monotonic() + 30
        while (states := alert_states(config.alertmanager_url, posted)) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert states == expected
    finally:
        post_alerts(config.alertmanager_url, [sent.labels for sent in posted.values()], now,
                    datetime.now(timezone.utc))


def delivered(config: local.StackConfig, alertname: str, **labels: str) -> tuple[str, dict] | None:
    """(receiver path, alert) of the first firing `alertname` with these labels that Alertmanager delivered
    to the receiver (other tests post alerts of other instances), or None yet."""
    log = Path(config.data_dir) / "alerts.jsonl"
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        record = json.loads(line)
        for alert in record["payload"]["alerts"]:
            if (alert["labels"]["alertname"] == alertname and alert["status"] == "firing"
                    and labels.items() <= alert["labels"].items()):
                return record["receiver"], alert
    return None


def await_delivery(config: local.StackConfig, alertname: str, timeout: float = 120, **labels: str) -> tuple[str, dict]:
    return wait_for(lambda: delivered(config, alertname, **labels), timeout=timeout, interval=0.5,
                    what=f"{alertname} {labels} at the receiver")


def assert_runbook_link_opens(config: local.StackConfig, alert: dict) -> None:
    """The alert links to its own section of the runbook, served by the stack's receiver on loopback."""
    link = alert["annotations"]["runbook_url"]
    anchor = alert["labels"]["alertname"].lower()
    assert link == f"{config.runbook_url}#{anchor}"
    page = requests.get(link, timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert f'id="{anchor}"' in page.text


def probe(config: local.StackConfig, module: str, target: str) -> dict[str, float]:
    """One probe through the stack's blackbox exporter, as Prometheus asks for it: its samples by name."""
    page = requests.get(f"{config.blackbox_url}/probe", params={"module": module, "target": target}, timeout=60)
    assert page.status_code == 200, page.text
    return {line.split()[0]: float(line.split()[1]) for line in page.text.splitlines()
            if line.startswith("probe_") and "{" not in line.split()[0]}


def test_the_probes_read_the_served_digit_and_the_grpc_health(monitored):
    """The server answers the probe's digit and says SERVING to the gRPC health check: Prometheus records
    both probes as successes, per instance (the predict URL, the gRPC address) and module, and the
    predict probe's request was a real predict (HTTP 200, the answer matched)."""
    server, config, _ = monitored
    target = local.predict_url(server.rest_url.removeprefix("http://"))
    expected = {(target, names.PROBE_PREDICT_MODULE), (server.grpc_target, names.PROBE_GRPC_MODULE)}

    def probed() -> list[dict] | None:
        found = result(config.prometheus_url, f'{names.PROBE_SUCCESS}{{job="{names.PROBE_JOB}"}}')
        return found if {(s["metric"]["instance"], s["metric"]["module"]) for s in found} == expected else None

    for success in wait_for(probed, timeout=60, what="both probes' results"):
        assert set(success["metric"]) == {"__name__", "job", "instance", "module"}
        assert success["value"][1] == "1", success
    samples = probe(config, names.PROBE_PREDICT_MODULE, target)
    assert (samples["probe_success"], samples["probe_http_status_code"], samples["probe_failed_due_to_regex"]) == \
           (1, 200, 0)
    [up] = result(config.prometheus_url, f'up{{job="{names.BLACKBOX_JOB}"}}')
    assert up["value"][1] == "1"


def test_the_watchdog_reaches_the_dead_mans_switch(monitored):
    """DigitsWatchdog fires from the first evaluation and Alertmanager sends it to its own receiver."""
    _, config, _ = monitored
    receiver, alert = await_delivery(config, rules.WATCHDOG)
    assert receiver == "watchdog"
    assert alert["labels"]["severity"] == "none"
    assert_runbook_link_opens(config, alert)


def test_a_version_that_fails_to_load_reaches_the_receiver(monitored, served_model):
    """A broken version dropped into the model directory: the server keeps serving the loaded one, and
    DigitsModelLoadFailed names the broken version at the tickets receiver."""
    server, config, _ = monitored
    [loaded] = [path.name for path in served_model.iterdir()]
    broken = served_model / str(int(loaded) + 1)
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    receiver, alert = await_delivery(config, "DigitsModelLoadFailed", model_version=broken.name)
    assert receiver == "tickets" and alert["labels"]["severity"] == "warning"
    assert_runbook_link_opens(config, alert)
    # The loaded version still answers, and answers right.
    assert probe(config, names.PROBE_PREDICT_MODULE, local.predict_url(config.serving_targets[0]))["probe_success"] == 1


def test_a_server_without_a_version_pages_from_the_probe(monitored, pushed_model, tmp_path):
    """A model server that is up with no version loaded answers every predict NOT_FOUND; the predict
    probe pages (DigitsPredictProbeFailing at the pager). `digits serve` never unloads its last version
    (serving/version_policy.py), so the state is made by starting one on an empty model directory; the
    stack is told about it by a configuration reload. Then a version that answers another digit: the
    probe still fails, on the answer."""
    _, config, stack = monitored
    model_dir = tmp_path / "digits"
    model_dir.mkdir()
    empty = start_server(model_dir)
    try:
        address = empty.rest_url.removeprefix("http://")
        target = local.predict_url(address)
        reload_prometheus(stack, replace(config, serving_targets=(*config.serving_targets, address)))
        receiver, alert = await_delivery(config, "DigitsPredictProbeFailing", instance=target)
        assert receiver == "pager" and alert["labels"]["module"] == names.PROBE_PREDICT_MODULE
        assert alert["labels"]["severity"] == "critical"
        assert_runbook_link_opens(config, alert)
        samples = probe(config, names.PROBE_PREDICT_MODULE, target)
        assert (samples["probe_success"], samples["probe_http_status_code"]) == (0, 404)

        (source,) = pushed_model.iterdir()
        wrong_digit = (names.PROBE_DIGIT + 1) % len(CLASS_NAMES)
        copy_version_answering(source, tmp_path / "staged", wrong_digit).rename(model_dir / source.name)
        wait_for(lambda: available_versions(empty.rest_url) == [source.name], timeout=120, what="the version loaded")
        samples = probe(config, names.PROBE_PREDICT_MODULE, target)
        assert (samples["probe_success"], samples["probe_http_status_code"], samples["probe_failed_due_to_regex"]) == \
               (0, 200, 1)
    finally:
        empty.stop()


def available_versions(rest_url: str) -> list[str]:
    states = requests.get(f"{rest_url}/v1/models/{names.DEFAULT_MODEL_NAME}", timeout=30).json()
    # A server with no version at all answers NOT_FOUND: {"error": ...}, no status list.
    return [state["version"] for state in states.get("model_version_status", []) if state["state"] == "AVAILABLE"]


def reload_prometheus(stack: local.MonitoringStack, config: local.StackConfig) -> None:
    """Rewrites the stack's prometheus.yml for `config` and has Prometheus reload it (SIGHUP); returns once
    it scrapes every serving target of `config`."""
    (Path(config.data_dir) / "prometheus.yml").write_text(yaml.safe_dump(local.prometheus_config(config)))
    stack.processes["prometheus"].send_signal(signal.SIGHUP)

    def scraping() -> bool:
        active = requests.get(f"{config.prometheus_url}/api/v1/targets", timeout=30).json()["data"]["activeTargets"]
        return set(config.serving_targets) <= {target["labels"]["instance"] for target in active}

    wait_for(scraping, timeout=60, what="Prometheus scraping the reloaded targets")


def test_a_stopped_server_pages_through_alertmanager(monitored):
    """Last in this module: it stops the server. DigitsModelServerDown holds for SHORT_FOR here."""
    server, config, _ = monitored
    server.stop()
    instance = config.serving_targets[0]
    receiver, alert = await_delivery(config, "DigitsModelServerDown", instance=instance)
    assert receiver == "pager"
    assert alert["labels"] == {"alertname": "DigitsModelServerDown", "severity": "critical",
                               "job": names.SERVING_JOB, "instance": instance, "monitor": "digits"}
    assert instance in alert["annotations"]["description"]
    assert_runbook_link_opens(config, alert)
