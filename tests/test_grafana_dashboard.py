"""The Grafana dashboard and its provisioning: generated, current, and clean by the lint of grafana_lint.py.

Grafana does not run here, so the dashboard is proven by its generator (`--check`), by lint rules
in the spirit of Grafana's dashboard-linter (each shown to catch a deliberately broken copy), and by
promtool parsing every query.
"""

from __future__ import annotations

import copy
import json
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
        "SLOs", "Traffic", "Latency", "Batching", "Model versions", "Predictions & drift", "Web app & feedback",
        "Scrape health"]
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
    variables = lint.variables(dashboard)
    assert {"datasource", "model", "instance"} <= set(variables)
    serving = f'job="{names.SERVING_JOB}"'
    assert variables["model"]["query"] == f"label_values({names.REQUEST_COUNT}{{{serving}}}, model_name)"
    instance = variables["instance"]
    assert instance["query"] == f"label_values(up{{{serving}}}, instance)"
    assert instance["multi"] and instance["includeAll"] and instance["allValue"] == ".*"


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
    "model filter": (lint.unfiltered_series, lambda d: _replace_expr(d, '{model_name=~"$model"}', "")),
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
    assert any('instance=~".*"' in query and 'model_name=~".*"' in query and "[1m]" in query for query in queries)


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
    labels: dict[str, set[str]] = {}
    for line in metrics.render().splitlines():
        if line and not line.startswith("#"):
            series, _, _ = line.partition("{")
            labels.setdefault(lint.base_name(series), set()).update(
                pair.split("=")[0] for pair in line[line.index("{") + 1:line.rindex("}")].split(",") if pair)
    assert labels, "the server rendered no series"
    for metric, found in labels.items():
        wanted = set(lint.required_filters(metric, set())) - {"job", "instance"}  # Prometheus adds those two
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
