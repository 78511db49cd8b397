"""The Grafana dashboard and its provisioning: generated, current, and clean by the lint of grafana_lint.py.

Grafana does not run here, so the dashboard is proven by its generator (`--check`), by lint rules
in the spirit of Grafana's dashboard-linter (each shown to catch a deliberately broken copy), by
promtool parsing every query, and by promtool evaluating every query, as Grafana would send it, on
series shaped as the exporters write them, with and without Kubernetes' labels.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import yaml

import grafana_lint as lint
from monitoring import names

TOOLS_PYTHON = lint.REPO / ".venv-tools" / "bin" / "python"
SETUP_HINT = "run `bash .ci/tasks.sh setup` (it makes .venv-tools, the Python 3.11 tool environment)"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return lint.load()


def run_generator(*args: str) -> subprocess.CompletedProcess:
    if not TOOLS_PYTHON.exists():
        pytest.fail(f"{TOOLS_PYTHON} is missing: {SETUP_HINT}")
    return subprocess.run([str(TOOLS_PYTHON), str(lint.GENERATOR), *args], cwd=lint.REPO,
                          capture_output=True, text=True, timeout=120)


# -- Generated and current ---------------------------------------------------------------------------

def test_committed_dashboard_is_what_the_generator_makes():
    result = run_generator("--check")
    assert result.returncode == 0, result.stderr or result.stdout


def test_check_reports_a_hand_edited_dashboard(tmp_path):
    edited = tmp_path / "digits-serving.json"
    edited.write_text(lint.DASHBOARD.read_text(encoding="utf-8").replace('"30s"', '"5s"'), encoding="utf-8")
    result = run_generator("--check", "--out", str(edited))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "out of date" in result.stderr


def test_dashboard_basics(dashboard):
    assert dashboard["uid"] == lint.generator_constant("UID") == "digits-serving"
    assert dashboard["title"] == "Digits model serving"
    assert dashboard["refresh"] == "30s"
    assert dashboard["time"] == {"from": "now-6h", "to": "now"}
    assert dashboard["tags"]
    # The rows docs/runbook.md sends the on-call engineer to.
    assert [row["title"] for row in lint.rows(dashboard)] == [
        "SLOs", "Probes", "Traffic", "Latency", "Batching", "Model versions", "Predictions & drift", "Web app & feedback",
        "Tally forms", "Scrape health"]
    ids = [panel["id"] for panel in lint.panels(dashboard) + lint.rows(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


# -- Lint: the committed dashboard is clean ----------------------------------------------------------

def test_every_panel_has_a_title(dashboard):
    assert lint.untitled_panels(dashboard) == []


def test_every_panel_has_a_description(dashboard):
    assert lint.undescribed_panels(dashboard) == []


def test_every_panel_has_a_unit(dashboard):
    assert lint.panels_without_unit(dashboard) == []


def test_every_panel_has_a_query(dashboard):
    assert lint.panels_without_targets(dashboard) == []


def test_every_panel_reads_the_datasource_variable(dashboard):
    assert lint.foreign_datasources(dashboard) == []


def test_every_range_is_the_rate_interval(dashboard):
    assert lint.fixed_ranges(dashboard) == []


def test_every_series_is_filtered_by_the_template_variables(dashboard):
    assert lint.unfiltered_series(dashboard) == []


def test_counters_only_inside_rate_or_increase(dashboard):
    assert lint.bare_counters(dashboard) == []


def test_no_exported_inputs():
    assert lint.exported_inputs(lint.DASHBOARD.read_text(encoding="utf-8")) == []


def test_datasource_variable_is_prometheus_and_defaults_to_the_provisioned_one(dashboard):
    assert lint.missing_datasource_variable(dashboard) == []


def test_every_series_read_exists(dashboard):
    assert lint.unknown_series(dashboard) == []


def test_template_variables(dashboard):
    """Cluster, then namespace, then model and instance, each listing the values of the one before."""
    variables = lint.variables(dashboard)
    assert [name for name in variables] == ["datasource", "cluster", "namespace", "model", "instance"]
    serving = f'job="{names.SERVING_JOB}"'
    where = f'{serving}, cluster=~"$cluster", namespace=~"$namespace"'
    assert variables["cluster"]["query"] == f"label_values(up{{{serving}}}, cluster)"
    assert variables["namespace"]["query"] == f'label_values(up{{{serving}, cluster=~"$cluster"}}, namespace)'
    assert variables["model"]["query"] == f"label_values({names.REQUEST_COUNT}{{{where}}}, model_name)"
    instance = variables["instance"]
    assert instance["query"] == f"label_values(up{{{where}}}, instance)"
    assert instance["multi"] and instance["includeAll"] and instance["allValue"] == ".*"


def test_cluster_and_namespace_variables_default_to_all_including_absent_labels(dashboard):
    assert lint.topology_variables(dashboard) == []


def _panel(dashboard: dict, title: str) -> dict:
    [panel] = [panel for panel in lint.panels(dashboard) if panel["title"] == title]
    return panel


def _steps(panel: dict) -> list:
    return [step["value"] for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]


@pytest.mark.parametrize("slo", names.SLOS, ids=lambda slo: slo.name)
def test_slo_panels_follow_the_slo_description(dashboard, slo):
    """Each SLO of monitoring/names.py has its SLI over its window against the objective, its budget left,
    and its SLI over the windows of its burn-rate alerts (the shortest short one and every long one) against
    the budget, with the alerts' factors in the description: nothing typed twice."""
    from monitoring import rules

    name = slo.name.capitalize()
    stat = _panel(dashboard, f"{name} ({slo.window})")
    assert [t["expr"] for t in stat["targets"]] == [
        f'1 - {rules.ratio(slo, slo.window)}{{cluster=~"$cluster", namespace=~"$namespace", model_name=~"$model"}}']
    assert _steps(stat) == [None, slo.objective]
    [budget] = _panel(dashboard, f"{name} error budget left")["targets"]
    assert budget["expr"].startswith(rules.budget_remaining(slo) + "{")
    by_window = _panel(dashboard, f"{name} SLI by window")
    shortest = min((burn.short for burn in slo.burn_rate_windows), key=rules.WINDOW_SECONDS.__getitem__)
    windows = [shortest, *sorted({burn.long for burn in slo.burn_rate_windows}, key=rules.WINDOW_SECONDS.__getitem__)]
    assert [t["expr"].partition("{")[0] for t in by_window["targets"]] == [rules.ratio(slo, w) for w in windows]
    assert _steps(by_window) == [None, slo.budget]
    assert all(f"{burn.factor:g}x ({burn.long} and {burn.short})" in by_window["description"]
               for burn in slo.burn_rate_windows)


# -- Lint: each rule catches a broken copy ------------------------------------------------------------

def _first(dashboard: dict, panel_type: str | None = None, nested: bool = False) -> dict:
    """The first panel (of a type; inside a collapsed row if `nested`) of a copy to break."""
    candidates = ([p for row in lint.rows(dashboard) for p in row.get("panels") or []] if nested
                  else [p for p in dashboard["panels"] if p["type"] != "row"])
    return next(p for p in candidates if panel_type in (None, p["type"]))


def _replace_expr(dashboard: dict, old: str, new: str) -> None:
    target = next(t for p in lint.panels(dashboard) for t in p["targets"] if old in t["expr"])
    target["expr"] = target["expr"].replace(old, new, 1)


def _remove_variable(dashboard: dict, name: str) -> None:
    dashboard["templating"]["list"] = [v for v in dashboard["templating"]["list"] if v["name"] != name]


BREAKERS = {
    "title": (lint.untitled_panels, lambda d: _first(d, nested=True).update(title="")),
    "description": (lint.undescribed_panels, lambda d: _first(d, nested=True).pop("description")),
    "unit": (lint.panels_without_unit, lambda d: _first(d, "timeseries")["fieldConfig"]["defaults"].pop("unit")),
    "query": (lint.panels_without_targets, lambda d: _first(d, "stat").update(targets=[])),
    "panel datasource": (lint.foreign_datasources,
                         lambda d: _first(d, "heatmap", nested=True).update(datasource={"type": "prometheus",
                                                                                        "uid": "other"})),
    "query datasource": (lint.foreign_datasources,
                         lambda d: _first(d, "gauge")["targets"][0].update(datasource={"type": "loki",
                                                                                       "uid": "${datasource}"})),
    "fixed range": (lint.fixed_ranges, lambda d: _replace_expr(d, "[$__rate_interval]", "[5m]")),
    "instance filter": (lint.unfiltered_series, lambda d: _replace_expr(d, ', instance=~"$instance"', "")),
    "model filter": (lint.unfiltered_series, lambda d: _replace_expr(d, ', model_name=~"$model"}', "}")),
    "namespace filter": (lint.unfiltered_series, lambda d: _replace_expr(d, ', namespace=~"$namespace"', "")),
    "cluster filter": (lint.unfiltered_series, lambda d: _replace_expr(d, 'cluster=~"$cluster", ', "")),
    "answers of the server only": (lint.unfiltered_series, lambda d: _replace_expr(
        d, f'job=~"{names.SERVING_JOB}|{names.WEB_JOB}"', f'job="{names.SERVING_JOB}"')),
    "probe job": (lint.unfiltered_series, lambda d: _replace_expr(
        d, f'{names.PROBE_DURATION}{{job="{names.PROBE_JOB}", ', f"{names.PROBE_DURATION}{{")),
    "namespace variable": (lint.topology_variables, lambda d: _remove_variable(d, "namespace")),
    "namespace All": (lint.topology_variables, lambda d: lint.variables(d)["namespace"].pop("allValue")),
    "cluster default": (lint.topology_variables,
                        lambda d: lint.variables(d)["cluster"]["current"].update(value=["prod"])),
    "cluster single value": (lint.topology_variables, lambda d: lint.variables(d)["cluster"].update(includeAll=False)),
    "job filter": (lint.unfiltered_series, lambda d: _replace_expr(d, f'job="{names.SERVING_JOB}", ', "")),
    "model path filter": (lint.unfiltered_series, lambda d: _replace_expr(d, "$model/[0-9]+", "digits/[0-9]+")),
    "bare counter": (lint.bare_counters, lambda d: _first(d, "timeseries")["targets"][0].update(
        expr=f'sum({names.REQUEST_COUNT}{{job="{names.SERVING_JOB}", instance=~"$instance", model_name=~"$model"}})')),
    "counter range": (lint.bare_counters, lambda d: _replace_expr(d, "[$__rate_interval])", ")")),
    "datasource variable": (lint.missing_datasource_variable, lambda d: _remove_variable(d, "datasource")),
    "datasource default": (lint.missing_datasource_variable,
                           lambda d: lint.variables(d)["datasource"]["current"].update(value="grafanacloud-prom")),
    "unknown series": (lint.unknown_series,
                       lambda d: _replace_expr(d, names.REQUEST_LATENCY, names.REQUEST_LATENCY + "s")),
    "unknown recorded series": (lint.unknown_series, lambda d: _replace_expr(d, ":ratio_rate5m", ":ratio_rate7m")),
    "unknown variable series": (lint.unknown_series, lambda d: lint.variables(d)["model"].update(
        query="label_values(request_count, model_name)")),
}


@pytest.mark.parametrize("case", BREAKERS)
def test_lint_reports_a_broken_copy(dashboard, case):
    rule, breaker = BREAKERS[case]
    broken = copy.deepcopy(dashboard)
    breaker(broken)
    assert rule(dashboard) == []
    problems = rule(broken)
    assert problems, f"{rule.__name__} missed a broken copy ({case})"
    assert all(isinstance(problem, str) and problem for problem in problems)


@pytest.mark.parametrize("needle", ["__inputs", "${DS_"])
def test_lint_reports_exported_inputs(dashboard, needle):
    broken = copy.deepcopy(dashboard)
    if needle == "__inputs":
        broken["__inputs"] = [{"name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}]
    else:
        _first(broken)["datasource"]["uid"] = "${DS_PROMETHEUS}"
    assert lint.exported_inputs(json.dumps(broken)) == [f"the dashboard contains {needle!r}"]


def test_selectors_skip_functions_keywords_label_lists_and_strings():
    expr = ('label_replace(histogram_quantile(0.99, sum by (le, API) (rate(m_bucket{a="x}", b=~"$model"}'
            '[$__rate_interval]))), "t", "REST", "API", "predict") / on (job) group_left (API) other'
            ' and ignoring (le) count without (x) (up) > bool 1')
    found = [(s.metric, s.function, s.range, s.matchers) for s in lint.selectors(expr)]
    assert found == [
        ("m_bucket", "rate", "$__rate_interval", {"a": ("=", "x}"), "b": ("=~", "$model")}),
        ("other", None, None, {}),
        ("up", "count", None, {}),
    ]


def test_dashboard_exprs_fill_in_the_variables_for_prometheus():
    queries = lint.dashboard_exprs(lint.DASHBOARD)
    assert len(queries) == len(lint.exprs(lint.load()))
    assert not any("$" in query for query in queries)
    assert any('instance=~".*"' in query and 'model_name=~".*"' in query and 'namespace=~".*"' in query
               and 'cluster=~".*"' in query and "[1m]" in query and "offset 1m" in query for query in queries)


# -- The lint's knowledge matches what `digits serve` exports -----------------------------------------

def test_model_labels_known_to_the_lint_match_the_server():
    from serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    metrics.record_request("digits", "OK", "predict", "REST", 0.01)
    metrics.record_runtime("digits", "Predict", 0.005)
    metrics.record_load("/models/digits/1", ok=True, seconds=1.0, warmup_seconds=0.5)
    metrics.record_batching(SimpleNamespace(queued_s=[0.001], input_sizes=[1], batch_size=2, padding=1))
    metrics.record_predictions("digits", 1, [3], [0.9])
    metrics.set_loaded_versions("digits", [1])
    metrics.set_version_states("digits", [(1, "AVAILABLE", "OK")])
    metrics.record_refused(names.REFUSED_BODY_TOO_LARGE)
    labels: dict[str, set[str]] = {}
    for line in metrics.render().splitlines():
        if line and not line.startswith("#"):
            series, _, _ = line.partition("{")
            labels.setdefault(lint.base_name(series), set()).update(
                pair.split("=")[0] for pair in line[line.index("{") + 1:line.rindex("}")].split(",") if pair)
    assert labels, "the server rendered no series"
    for metric, found in labels.items():
        # Prometheus adds job and instance; cluster and namespace come from Kubernetes or external labels.
        wanted = set(lint.required_filters(metric, set())) - {"job", "instance", *names.TOPOLOGY_LABELS}
        assert wanted <= found, f"{metric} has {sorted(found)}, the lint expects {sorted(wanted)}"
        assert not ({"model_name", "model_path"} & found) - wanted, f"{metric}: the lint ignores its model label"


# -- Every query parses as PromQL -------------------------------------------------------------------------

def test_promtool_parses_every_query(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(f"promtool is missing: {SETUP_HINT}")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}:check", "expr": expr}
        for index, expr in enumerate(lint.dashboard_exprs(lint.DASHBOARD))]}]}
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- Every query, evaluated by promtool as Grafana would send it ------------------------------------------
# Input series shaped as the exporters write them (Prometheus adds job and instance; the Prometheus
# Operator and external labels add namespace and cluster, absent outside Kubernetes), one for each series
# selector of the dashboard, with the labels its matchers ask for and the declared ones (names.METRICS).

SCRAPE = "15s"
SAMPLES = 40  # ten minutes of scrapes, evaluated at the end
# A label value for each label a selector does not pin down (a regex, a negative matcher, or none).
LABEL_VALUES = {
    "job": names.SERVING_JOB, "instance": "127.0.0.1:8501", "model_name": names.DEFAULT_MODEL_NAME,
    "model_path": f"/models/{names.DEFAULT_MODEL_NAME}/1", "model_version": "1", "status": "OK", "API": "predict",
    "entrypoint": "REST", "runtime": "TF1", "thread_pool_name": "batch_threads", "execution_batch_size": "2",
    names.CLASS_LABEL: "7", names.REFERENCE_CLASS_LABEL: "7", names.CORRECTED_CLASS_LABEL: "1",
    names.VERDICT_LABEL: names.VERDICT_RIGHT, "endpoint": names.WEB_PREDICT_ENDPOINT, "outcome": "ok",
    "reason": names.REFUSED_BODY_TOO_LARGE, "state": "AVAILABLE", "error_code": "OK",
    "module": names.PROBE_PREDICT_MODULE, names.FORM_LABEL: "polling-station-tally",
    names.CHECK_LABEL: "valid votes and rejected ballots add up to the votes cast",
}
NOT_EQUAL = {"status": "INTERNAL"}  # for `status!="OK"`
# The labels of a recorded series, by the words of its level (job_model_status: job, model_name, status).
LEVEL_LABELS = {"job": "job", "model": "model_name", "version": "model_version", "class": names.CLASS_LABEL,
                "status": "status", "api": "API", "module": "module", "endpoint": "endpoint", "outcome": "outcome"}


def _value(label: str, operator: str, value: str) -> str:
    if operator == "=":
        return value
    if operator == "!=":
        return NOT_EQUAL[label]
    default = LABEL_VALUES.get(label, "")
    return default if re.fullmatch(value, default) else value.split("|")[0]


def _series_read(expr: str, recorded: set[str]) -> set[tuple[str, tuple]]:
    """(metric, labels) of a series for each selector of `expr` (topology labels left to the caller)."""
    found = set()
    for each in lint.selectors(expr):
        labels = {label: _value(label, operator, value) for label, (operator, value) in each.matchers.items()
                  if label not in names.TOPOLOGY_LABELS and label != "le"}
        if each.metric in recorded:
            declared = [LEVEL_LABELS[word] for word in each.metric.split(":")[0].split("_") if word in LEVEL_LABELS]
        else:
            declared = list(names.METRICS[lint.base_name(each.metric)].labels) \
                if lint.base_name(each.metric) in names.METRICS else ["module"] * (each.metric in lint.PROBE_SERIES)
        labels.update({label: LABEL_VALUES[label] for label in declared if label not in labels and label != "le"})
        labels.setdefault("job", names.PROBE_JOB if each.metric in lint.PROBE_SERIES else names.SERVING_JOB)
        found.add((each.metric, tuple(sorted(labels.items()))))
    return found


def _input_series(exprs: list[str], topology: dict[str, str]) -> list[dict]:
    """Counters rising by one a second, every bucket of a histogram, gauges and recorded series at 1."""
    recorded = lint.recorded_series()
    series = []
    for metric, labels in sorted(set().union(*(_series_read(expr, recorded) for expr in exprs))):
        labels = {**dict(labels), **topology}
        buckets = [{}]
        if metric.endswith("_bucket"):
            bounds = names.METRICS[lint.base_name(metric)].buckets
            buckets = [{"le": le} for le in [*map(names.bucket_label, bounds), "+Inf"]]
        values = f"0+15x{SAMPLES}" if lint.is_counter(metric) else f"1+0x{SAMPLES}"
        for le in buckets:
            text = ", ".join(f'{key}="{value}"' for key, value in {**labels, **le}.items())
            series.append({"series": f"{metric}{{{text}}}", "values": values})
    return series


def _returns_series(expr: str) -> str:
    """1 when `expr` returns any series, else 0: one sample either way, for promtool to compare."""
    return f"count(\n{expr}\n) > bool 0 or vector(0)"


def _promtool_test(tmp_path, cases: list[dict]) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(f"promtool is missing: {SETUP_HINT}")
    path = tmp_path / "dashboard_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": SCRAPE, "tests": cases}, width=10_000))
    return subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)


def _shown_in(dashboard: dict, topology: dict[str, str], chosen: dict[str, str], shown: int) -> dict:
    """A promtool case: every query, with the variables `chosen` (else "All"), on series with the labels
    `topology`, returns series (`shown` 1) or none (0)."""
    raw = lint.exprs(dashboard)
    values = {**lint.LIVE_VALUES, **chosen}
    return {"interval": SCRAPE, "input_series": _input_series([lint.substitute(e) for e in raw], topology),
            "promql_expr_test": [{"expr": _returns_series(lint.substitute(expr, values)),
                                   "eval_time": f"{SAMPLES * 15}s",
                                   "exp_samples": [{"labels": "{}", "value": shown}]} for expr in raw]}


KUBERNETES = {"cluster": "eu", "namespace": "prod"}


def _namespace_cases(dashboard: dict) -> list[dict]:
    return [
        _shown_in(dashboard, {}, {}, 1),  # outside Kubernetes: no such labels, "All" still shows them
        _shown_in(dashboard, KUBERNETES, {"namespace": "prod"}, 1),
        _shown_in(dashboard, KUBERNETES, {"namespace": "staging"}, 0),  # another namespace's series: none
    ]


def test_every_query_shows_series_without_kubernetes_labels_and_only_the_chosen_namespace(dashboard, tmp_path):
    """Every query, as Grafana sends it, returns series on series shaped as the exporters write them
    outside Kubernetes (no cluster or namespace label; both variables "All"), returns them in the
    namespace chosen, and returns none when another namespace is chosen."""
    result = _promtool_test(tmp_path, _namespace_cases(dashboard))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr


@pytest.mark.parametrize("case", ["namespace filter dropped", "series without the label left out"])
def test_the_namespace_evaluation_catches_a_broken_copy(dashboard, tmp_path, case):
    broken = copy.deepcopy(dashboard)
    if case == "namespace filter dropped":
        _replace_expr(broken, ', namespace=~"$namespace"', "")
    else:
        _replace_expr(broken, 'namespace=~"$namespace"', 'namespace=~"$namespace", namespace!=""')
    result = _promtool_test(tmp_path, _namespace_cases(broken))
    output = result.stdout + result.stderr
    wrong = "got: {} 1E+00" if case == "namespace filter dropped" else "got: {} 0E+00"
    assert result.returncode == 1 and wrong in output, output[-3000:]


def _confidence_heatmap(dashboard: dict) -> str:
    [panel] = [panel for panel in lint.panels(dashboard) if panel["title"] == "Top-class confidence"]
    [target] = panel["targets"]
    return lint.substitute(target["expr"])


def test_the_confidence_heatmap_counts_answers_once_wherever_they_are_counted(dashboard, tmp_path):
    """The same answers counted by `digits serve` and by the web app in front of it show once (one per
    second in each bucket, not two); counted only by the web app (in front of TF Serving), they show too."""
    bounds = [*map(names.bucket_label, names.CONFIDENCE_BUCKETS), "+Inf"]

    def buckets(*jobs: str) -> list[dict]:
        return [{"series": f'{names.CONFIDENCE}_bucket{{job="{job}", instance="{job}:80", '
                           f'model_name="{names.DEFAULT_MODEL_NAME}", model_version="1", le="{le}"}}',
                 "values": f"0+15x{SAMPLES}"} for job in jobs for le in bounds]

    once = [{"labels": f'{{le="{le}"}}', "value": 1} for le in bounds]
    expr = _confidence_heatmap(dashboard)
    cases = [{"interval": SCRAPE, "input_series": buckets(*jobs),
              "promql_expr_test": [{"expr": expr, "eval_time": f"{SAMPLES * 15}s", "exp_samples": once}]}
             for jobs in ((names.SERVING_JOB, names.WEB_JOB), (names.WEB_JOB,), (names.SERVING_JOB,))]
    result = _promtool_test(tmp_path, cases)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr


def _query_of(dashboard: dict, title: str, ref: str = "A") -> str:
    [panel] = [panel for panel in lint.panels(dashboard) if panel["title"] == title]
    return lint.substitute(next(t["expr"] for t in panel["targets"] if t["refId"] == ref))


def test_the_review_queue_panels_count_a_queue_once_and_its_oldest_sheet_in_seconds(dashboard, tmp_path):
    """Two instances of the web app read the same queue directory: 7 sheets waiting show as 7, not 14; the
    oldest, queued at 0 s, has waited the evaluation time in seconds; reviews show per hour. With nothing
    waiting the app exports no oldest-sheet series, and the panel draws no line."""
    form = LABEL_VALUES[names.FORM_LABEL]

    def web(metric: str, instance: str, values: str, **labels: str) -> dict:
        text = ", ".join(f'{key}="{value}"' for key, value in {"form": form, **labels}.items())
        return {"series": f'{metric}{{job="{names.WEB_JOB}", instance="{instance}", {text}}}', "values": values}

    def at_end(title: str, samples: list[dict]) -> dict:
        return {"expr": _query_of(dashboard, title), "eval_time": f"{SAMPLES * 15}s", "exp_samples": samples}

    instances = ("web-1:8080", "web-2:8080")
    queue = [web(names.WEB_SHEETS_PENDING, instance, f"7x{SAMPLES}") for instance in instances]
    oldest = [web(names.WEB_SHEET_OLDEST_PENDING, instance, f"0x{SAMPLES}") for instance in instances]
    reviews = [web(names.WEB_SHEET_REVIEWS, "web-1:8080", f"0+1x{SAMPLES}", verdict=names.SHEET_CONFIRMED),
               web(names.WEB_SHEET_REVIEWS, "web-1:8080", f"0x{SAMPLES}", verdict=names.SHEET_REJECTED)]
    cases = [
        {"interval": SCRAPE, "input_series": queue + oldest + reviews, "promql_expr_test": [
            at_end("Sheets waiting for a person", [{"labels": f'{{form="{form}"}}', "value": 7}]),
            at_end("Oldest waiting sheet", [{"labels": f'{{form="{form}"}}', "value": SAMPLES * 15}]),
            at_end("Sheet reviews", [  # one review a scrape: 240 an hour
                {"labels": f'{{form="{form}", verdict="{names.SHEET_CONFIRMED}"}}', "value": 240},
                {"labels": f'{{form="{form}", verdict="{names.SHEET_REJECTED}"}}', "value": 0}]),
        ]},
        {"interval": SCRAPE, "input_series": [web(names.WEB_SHEETS_PENDING, "web-1:8080", f"0x{SAMPLES}")],
         "promql_expr_test": [at_end("Sheets waiting for a person", [{"labels": f'{{form="{form}"}}', "value": 0}]),
                              at_end("Oldest waiting sheet", [])]},
    ]
    result = _promtool_test(tmp_path, cases)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr


def test_first_failures_show_although_their_counters_are_born_at_one(dashboard, tmp_path):
    """A version's first failed load, its load time, a status's first error and a first refused request
    show in the interval they happened, though each counter series appears with the value 1 (or its
    first amount) and increase() alone reads nothing; an interval later they are gone."""
    server = f'job="{names.SERVING_JOB}", instance="{LABEL_VALUES["instance"]}"'
    path = f'model_path="/models/{names.DEFAULT_MODEL_NAME}/2"'
    born = SAMPLES - 3  # the scrape that first sees the series
    new = f"_x{born} 1x3"

    def at(seconds: int, expr: str, samples: list[dict]) -> dict:
        return {"expr": expr, "eval_time": f"{seconds}s", "exp_samples": samples}

    first_seen, interval_later = (born + 1) * 15, (born + 1) * 15 + 75
    case = {"interval": SCRAPE, "input_series": [
        {"series": f"up{{{server}}}", "values": f"1+0x{SAMPLES + 8}"},
        {"series": f'{names.LOAD_ATTEMPT_COUNT}{{{server}, {path}, status="{names.LOAD_STATUS_FAIL}"}}', "values": new},
        {"series": f"{names.LOAD_LATENCY}{{{server}, {path}}}", "values": f"_x{born} 2000000x3"},
        {"series": f'{names.REQUEST_COUNT}{{{server}, model_name="{names.DEFAULT_MODEL_NAME}", status="OK"}}',
         "values": f"0+15x{SAMPLES + 8}"},
        {"series": f'{names.REQUEST_COUNT}{{{server}, model_name="{names.DEFAULT_MODEL_NAME}", '
                   f'status="RESOURCE_EXHAUSTED"}}', "values": new},
        {"series": f'{names.REFUSED_REQUESTS}{{{server}, reason="{names.REFUSED_BODY_TOO_LARGE}"}}', "values": new},
    ], "promql_expr_test": [
        at(first_seen, _query_of(dashboard, "Model loads"),
           [{"labels": f'{{{path}, status="{names.LOAD_STATUS_FAIL}"}}', "value": 1}]),
        at(first_seen, _query_of(dashboard, "Load and warmup time"), [{"labels": f"{{{path}}}", "value": 2000000}]),
        at(first_seen, _query_of(dashboard, "Refused requests"),
           [{"labels": f'{{instance="{LABEL_VALUES["instance"]}", reason="{names.REFUSED_BODY_TOO_LARGE}"}}',
             "value": 1}]),
        at(first_seen, _returns_series(_query_of(dashboard, "Failed requests, share of all") + " > 0"),
           [{"labels": "{}", "value": 1}]),
        at(interval_later, _query_of(dashboard, "Model loads"),
           [{"labels": f'{{{path}, status="{names.LOAD_STATUS_FAIL}"}}', "value": 0}]),
        at(interval_later, _returns_series(_query_of(dashboard, "Failed requests, share of all") + " > 0"),
           [{"labels": "{}", "value": 0}]),
    ]}
    result = _promtool_test(tmp_path, [case])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr


# -- Provisioning ---------------------------------------------------------------------------------------

def test_datasource_provisioning():
    document = yaml.safe_load(lint.DATASOURCE_PROVISIONING.read_text())
    assert document["apiVersion"] == 1
    [datasource] = document["datasources"]
    assert datasource["uid"] == lint.generator_constant("DATASOURCE_UID")
    assert datasource["uid"] == lint.variables(lint.load())["datasource"]["current"]["value"]
    assert (datasource["name"], datasource["type"], datasource["url"]) == ("Prometheus", "prometheus",
                                                                           "http://prometheus:9090")
    assert datasource["isDefault"] is True and datasource["editable"] is False
    # $__rate_interval is four times this: it must be the interval Prometheus really scrapes at.
    prometheus = yaml.safe_load((lint.REPO / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_dashboard_provisioning():
    document = yaml.safe_load(lint.DASHBOARD_PROVISIONING.read_text())
    assert document["apiVersion"] == 1
    [provider] = document["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert provider["folder"] == "Digits"
    assert provider["disableDeletion"] is True and provider["allowUiUpdates"] is False
