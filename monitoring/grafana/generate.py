"""The Grafana SRE dashboard of the digits model server, as code (grafana-foundation-sdk, Grafana 11.6).

`.venv-tools/bin/python monitoring/grafana/generate.py` rewrites dashboards/digits-serving.json;
`--check` exits 1 when the committed JSON differs from what this file generates, so edit this file,
not the JSON (a hand edit in Grafana cannot drift silently: provisioning also forbids saving one).
Metric names come from monitoring/names.py and recorded series from monitoring/rules.py: the panels
read the same SLIs as the alerts, so a number means the same thing on the dashboard and in a page.
"""

from __future__ import annotations

import argparse
import itertools
import json
import string
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script by the tool environment, which does not install this project
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from grafana_foundation_sdk.builders import barchart, common as common_builders, dashboard, gauge, heatmap
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, units
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from monitoring import names as n
from monitoring import rules as r

UID = "digits-serving"
TITLE = "Digits model serving"
OUT = Path(__file__).resolve().parent / "dashboards" / f"{UID}.json"
# provisioning/datasources/prometheus.yml gives the provisioned Prometheus this uid; the datasource
# variable defaults to it, and every panel reads `${datasource}` (never an exported `${DS_...}` input,
# which file provisioning cannot resolve).
DATASOURCE_UID = "prometheus"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label matchers: every series is of the chosen clusters and namespaces (absent labels outside
# Kubernetes: "All" is `.*`, which matches a missing label too); raw model-server series are the
# model server's, on the chosen instances, of the chosen model.
JOB = f'job="{n.SERVING_JOB}"'
# What the model answered is counted by `digits serve` and by the web app in front of any model server
# (the only count in front of the TF Serving container): queries read both and take, per bucket or
# class, the larger of the two jobs' counts (`answered`), so traffic through the web app to `digits
# serve` is not counted twice.
ANSWERING = r.ANSWERING
PROBE = r.PROBE
TOPOLOGY = tuple(f'{label}=~"${label}"' for label in n.TOPOLOGY_LABELS)
WHERE = ", ".join(n.TOPOLOGY_LABELS)  # kept by the aggregations that would otherwise merge namespaces
INSTANCE = 'instance=~"$instance"'
MODEL = 'model_name=~"$model"'
MODEL_PATH = 'model_path=~".*/$model/[0-9]+"'  # load metrics carry the version directory, not the name
PREDICT = f'API=~"{n.PREDICT_API_REGEX}"'
RATE_INTERVAL = "$__rate_interval"  # Grafana: at least four scrape intervals (timeInterval of the datasource)
ALL = ".*"  # the value of "All" in every multi-value variable: also matches a label that is absent

QUANTILES = (0.5, 0.95, 0.99)
BUDGET_LOW = 0.25  # an error budget below a quarter turns orange

RED, ORANGE, GREEN = "red", "orange", "green"
WEB_JOB = f'job="{n.WEB_JOB}"'
GRID_WIDTH = 24


# -- PromQL --------------------------------------------------------------------------------------

def selector(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join(matchers)}}}"


def served(metric: str, *matchers: str) -> str:
    """A series of the model server that carries model_name."""
    return selector(metric, JOB, *TOPOLOGY, INSTANCE, MODEL, *matchers)


def answered(metric: str) -> str:
    """A series of what the model answered, from whichever job counts it (server or web app)."""
    return selector(metric, ANSWERING, *TOPOLOGY, INSTANCE, MODEL)


def process(metric: str, *matchers: str) -> str:
    """A per-process series of the model server (batching, refusals, up): no model label."""
    return selector(metric, JOB, *TOPOLOGY, INSTANCE, *matchers)


def loads(metric: str) -> str:
    """A SavedModel load metric: labelled by version directory (model_path)."""
    return selector(metric, JOB, *TOPOLOGY, INSTANCE, MODEL_PATH)


def probed(metric: str) -> str:
    """A series of the blackbox exporter's probes: `instance` is the probed target, not a scrape of ours."""
    return selector(metric, PROBE, *TOPOLOGY)


def recorded(name: str, *matchers: str) -> str:
    """A series recorded by monitoring/rules.py: already a rate, per cluster, namespace, job and model."""
    return selector(name, *TOPOLOGY, MODEL, *matchers)


def recorded_by_job(name: str) -> str:
    """A recorded series without a model label (the web app's, the probes')."""
    return selector(name, *TOPOLOGY)


def rate(series: str) -> str:
    return f"rate({series}[{RATE_INTERVAL}])"


def counted(counter: str) -> str:
    """Per series, the counter's increase over the rate interval, counting a series born inside it from 0.

    TF Serving and `digits serve` create a counter series at its first increment, with the value 1 (a
    version's first failed load, the first RESOURCE_EXHAUSTED): increase() sees nothing of that event.
    As monitoring/rules.py `counter_rate` does, the series absent one interval ago add their first value,
    only where Prometheus scraped the model server then (else every series would look newly born);
    labelled `born` so that `or` keeps both parts and a sum adds them. Unlike the rules, which count
    requests (born at 1) and read only instant values, the first value itself: a load-latency counter is
    born with a whole load's microseconds, and a panel is evaluated only while someone looks at it."""
    window = f"[{RATE_INTERVAL}]"
    return (f"increase({counter}{window})\n  or\n  label_replace(\n"
            f"    (min_over_time({counter}{window}) unless present_over_time({counter}{window} offset {RATE_INTERVAL}))\n"
            f"    and on () count({process('up')} offset {RATE_INTERVAL}) > 0,\n"
            f'    "born", "in_window", "", "")')


def answered_buckets(metric: str, by: str) -> str:
    """Observations per second of `metric` (a histogram of what the model answered) per `by` and le: per
    cluster and namespace the larger of the server's and the web app's count, which see the same answers
    where the web app sends its predicts to `digits serve`, and only the web app's in front of TF Serving."""
    keep = ", ".join(filter(None, (WHERE, by, "le")))
    return (f"sum by ({', '.join(filter(None, (by, 'le')))}) (\n  max by ({keep}) (\n"
            f"    sum by ({keep}, job) ({rate(answered(metric + '_bucket'))})\n  )\n)")


def quantile(q: float, by: str, buckets: str) -> str:
    """histogram_quantile over `buckets` (a selector of a _bucket series), kept apart by `by`."""
    return f"histogram_quantile({q:g}, sum by (le{', ' + by if by else ''}) ({rate(buckets)}))"


def mean(by: str, metric: str, select) -> str:
    """Mean observation of a histogram over the rate interval: rate of _sum over rate of _count."""
    return f"sum by ({by}) ({rate(select(metric + '_sum'))})\n/\nsum by ({by}) ({rate(select(metric + '_count'))})"


def by_transport(expr: str) -> str:
    """Adds `transport`: TF Serving labels a REST predict API="predict" and a gRPC one "Predict"."""
    rest, grpc = n.PREDICT_APIS
    return (f'label_replace(label_replace({expr}, "transport", "REST", "API", "{rest}"), '
            f'"transport", "gRPC", "API", "{grpc}")')


def percentile(q: float) -> str:
    return f"p{q * 100:g}"


# -- Panels --------------------------------------------------------------------------------------

def query(expr: str, legend: str, *, instant: bool = False, fmt: PromQueryFormat | None = None):
    target = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)
    target = target.instant() if instant else target.range()
    return target.format(fmt) if fmt else target


def thresholds(base: str, *steps: tuple[float, str]):
    return (dashboard.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE)
            .steps([model.Threshold(color=base),
                    *(model.Threshold(value=value, color=color) for value, color in steps)]))


def panel(builder, title: str, description: str, unit: str, targets, *, width: int = 12, height: int = 8):
    """What every panel has (the lint in tests/grafana_lint.py checks it): a title, a description,
    a unit, the dashboard's datasource variable, and queries with stable refIds."""
    builder = builder.title(title).description(description).unit(unit).datasource(DATASOURCE)
    for ref_id, target in zip(string.ascii_uppercase, targets, strict=False):
        builder = builder.with_target(target.ref_id(ref_id))
    return builder.span(width).height(height)


def graph(title: str, description: str, unit: str, targets, **layout):
    """A time series with a multi-series tooltip and a legend that shows the last and top values."""
    builder = (timeseries.Panel()
               .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE)
                       .placement(common.LegendPlacement.BOTTOM).show_legend(True).calcs(["lastNotNull", "max"]))
               .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                        .sort(common.SortOrder.DESCENDING))
               .fill_opacity(10).line_width(1).show_points(common.VisibilityMode.NEVER).span_nulls(False))
    return panel(builder, title, description, unit, targets, **layout)


def with_threshold_line(builder, base: str, *steps: tuple[float, str]):
    return (builder.thresholds(thresholds(base, *steps))
            .thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE)))


def dashed(builder, regexp: str):
    return builder.override_by_regexp(regexp, [model.DynamicConfigValue(
        id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})])


def single_stat(title: str, description: str, expr: str, objective: float):
    """The 30-day SLI against its objective: red below it."""
    builder = (stat.Panel().graph_mode(common.BigValueGraphMode.NONE).color_mode(common.BigValueColorMode.BACKGROUND)
               .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
               .decimals(2).thresholds(thresholds(RED, (objective, GREEN))))
    return panel(builder, title, description, units.PercentUnit, [query(expr, "{{model_name}}")], width=6, height=5)


def budget_gauge(title: str, description: str, expr: str):
    builder = (gauge.Panel().min(0).max(1).decimals(0).show_threshold_markers(True)
               .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
               .thresholds(thresholds(RED, (0, ORANGE), (BUDGET_LOW, GREEN))))
    return panel(builder, title, description, units.PercentUnit, [query(expr, "{{model_name}}")], width=6, height=5)


def bucket_heatmap(title: str, description: str, expr: str, bucket_unit: str, cell_unit: str):
    """Observations per second in each bucket, from `expr` by le (Grafana takes the cumulative `le`
    buckets apart)."""
    builder = (heatmap.Panel().calculate(False)
               .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
               .y_axis(heatmap.YAxisConfig().unit(bucket_unit))
               .cell_values(heatmap.CellValues().unit(cell_unit))
               .color(heatmap.HeatmapColorOptions().mode(HeatmapColorMode.SCHEME).scheme("Oranges")
                      .fill("dark-orange").exponent(0.5).steps(64).reverse(False))
               .show_legend())
    return panel(builder, title, description, cell_unit, [query(expr, "{{le}}", fmt=PromQueryFormat.HEATMAP)])


# -- Rows ----------------------------------------------------------------------------------------

def percent(share: float) -> str:
    return f"{share * 100:g}%"


def windows_shown(slo: n.SLO) -> tuple[str, ...]:
    """The SLI windows of the SLO's burn-rate alerts: the shortest short window (what is happening now)
    and every long window, shortest first."""
    shortest = min((burn.short for burn in slo.burn_rate_windows), key=r.WINDOW_SECONDS.__getitem__)
    longs = sorted({burn.long for burn in slo.burn_rate_windows}, key=r.WINDOW_SECONDS.__getitem__)
    return (shortest, *longs)


def burn_rates_said(slo: n.SLO) -> str:
    """'pages at 14.4x (1h and 5m) ...; tickets at ...': the burn-rate alerts of `slo`, in words."""
    said = []
    for severity, verb in (("critical", "pages"), ("warning", "opens a ticket")):
        burns = [f"{burn.factor:g}x ({burn.long} and {burn.short})"
                 for burn in slo.burn_rate_windows if burn.severity == severity]
        if burns:
            said.append(f"{verb} at {' or '.join(burns)}")
    return "; ".join(said)


def slo_panels() -> list:
    """For each SLO of monitoring/names.py: its SLI over the SLO window against the objective, the error
    budget left, and the SLI over the windows its burn-rate alerts use."""
    stats, graphs = [], []
    for slo in n.SLOS:
        name = slo.name.capitalize()
        stats += [
            single_stat(
                f"{name} ({slo.window})",
                f"Share of predicts over the last {slo.window} that were good, {slo.good_means} "
                f"(1 - {r.ratio(slo, slo.window)}). Objective: {percent(slo.objective)}; red below it.",
                f"1 - {recorded(r.ratio(slo, slo.window))}", slo.objective),
            budget_gauge(
                f"{name} error budget left",
                f"What is left of the {slo.window} {slo.name} error budget ({percent(slo.budget)} of predicts may "
                f"be bad: {slo.bad_means}): 100% untouched, 0% spent, negative: the SLO is missed.",
                recorded(r.budget_remaining(slo))),
        ]
        graphs.append(with_threshold_line(graph(
            f"{name} SLI by window",
            f"Share of predicts that {slo.bad_means}, over the windows of the burn-rate alerts. The red line "
            f"is the share that spends exactly the {slo.window} budget ({percent(slo.budget)}); the alert "
            f"{burn_rates_said(slo)} that rate, in both windows.",
            units.PercentUnit,
            [query(recorded(r.ratio(slo, window)), f"{window} {{{{model_name}}}}") for window in windows_shown(slo)]),
            GREEN, (slo.budget, RED)).min(0))
    return stats + graphs


def status_is(regex: str) -> str:
    return f'status=~"{regex}"'


def requests_counted(*matchers: str) -> str:
    """Requests per rate interval by job and model (with a born series' first one), of the statuses
    `matchers` select."""
    return f"sum by ({WHERE}, job, model_name) ({counted(served(n.REQUEST_COUNT, *matchers))})"


def traffic_panels() -> list:
    # Predicts, as monitoring/rules.py counts them: the successful ones (request_latency) and every failed
    # request (request_count has no API label); `or` keeps both, their label sets never match.
    failed = counted(served(n.REQUEST_COUNT, 'status!="OK"'))
    predicts = (f"sum by ({WHERE}, job, model_name) (\n  {counted(served(f'{n.REQUEST_LATENCY}_count', PREDICT))}\n"
                f"  or\n  {failed}\n)")
    every_request = requests_counted()
    return [
        graph(
            "Requests by status",
            "Requests per second by gRPC status code (5-minute rate). TF Serving counts every request here, "
            "REST model-status and metadata GETs too, not only predicts.",
            units.RequestsPerSecond,
            [query(recorded(r.REQUESTS_BY_STATUS), "{{status}}")], width=8),
        graph(
            "Predicts by transport",
            "Successful predicts per second over REST and gRPC (5-minute rate), and all predicts, failed "
            "ones included.",
            units.RequestsPerSecond,
            [query(by_transport(recorded(r.PREDICTS_OK_BY_API)), "{{transport}} OK"),
             query(recorded(r.predicts("5m")), "all predicts")], width=8),
        graph(
            "Failed requests, share of all",
            "Failed requests as a share of all requests, by status, over the rate interval; a status's first "
            "error counts (its counter is born at 1). Server errors "
            f"({', '.join(n.SERVER_ERROR_STATUSES)}) spend the availability budget; client errors "
            f"({', '.join(n.CLIENT_ERROR_STATUSES)}) do not; abandoned requests ({', '.join(n.ABANDONED_STATUSES)}) "
            "spend the latency budget.",
            units.PercentUnit,
            [query(f"sum by ({WHERE}, job, model_name, status) ({counted(served(n.REQUEST_COUNT, status_is(regex)))})"
                   f"\n/ ignoring (status) group_left\n{every_request}", legend)
             for regex, legend in ((n.SERVER_ERROR_REGEX, "server {{status}}"),
                                   (n.CLIENT_ERROR_REGEX, "client {{status}}"),
                                   (n.ABANDONED_REGEX, "abandoned {{status}}"))], width=8).min(0),
        with_threshold_line(graph(
            "Client errors, share of predicts",
            "Predicts refused as the client's error (bad input, unknown model or version) as a share of all "
            "predicts, over the rate interval. They spend no budget; DigitsClientErrorsHigh opens a ticket "
            f"when this stays above the red line ({r.CLIENT_ERROR_THRESHOLD:.0%}) over {r.CLIENT_ERROR_WINDOW} "
            f"with at least {r.MIN_REQUESTS_IN_WINDOW} predicts. A NOT_FOUND for every predict, none answered, "
            "is the served model gone: DigitsPredictsNotFound pages.",
            units.PercentUnit,
            [query(f"{requests_counted(status_is(n.CLIENT_ERROR_REGEX))}\n/\n{predicts}",
                   "{{model_name}} {{namespace}}")], width=12),
            GREEN, (r.CLIENT_ERROR_THRESHOLD, RED)).min(0),
        graph(
            "Refused requests",
            "Requests the model server refused before any handler saw them, per rate interval, by reason: a "
            f"body too large ({n.REFUSED_BODY_TOO_LARGE}) or one that stalled ({n.REFUSED_BODY_TIMEOUT}). "
            "The client's doing; not in the request count, so no SLO sees them (TF Serving's gRPC transport "
            "refuses an over-size message the same way).",
            units.Short,
            [query(f"sum by ({WHERE}, instance, reason) ({counted(process(n.REFUSED_REQUESTS))})",
                   "{{reason}} {{instance}}")], width=12)
        .draw_style(common.GraphDrawStyle.BARS).fill_opacity(80).min(0).decimals(0),
    ]


def latency_panels() -> list:
    request_buckets = served(f"{n.REQUEST_LATENCY}_bucket", PREDICT)
    runtime_buckets = served(f"{n.RUNTIME_LATENCY}_bucket", PREDICT)
    return [
        with_threshold_line(graph(
            "Predict latency by transport",
            "p50, p95 and p99 of the time to answer a successful predict, REST and gRPC apart. The red "
            f"line is the latency SLO threshold ({n.LATENCY_THRESHOLD_US / 1000:.0f} ms).",
            units.Microseconds,
            [query(by_transport(quantile(q, "API", request_buckets)), f"{percentile(q)} {{{{transport}}}}")
             for q in QUANTILES]),
            GREEN, (n.LATENCY_THRESHOLD_US, RED)),
        dashed(graph(
            "Request vs model run latency",
            "p50 and p99 of the whole predict request against the model call alone (runtime latency; a "
            "batched call counts the whole batch's run). The gap is time in the batching queue, decoding "
            "and transport.",
            units.Microseconds,
            [*(query(quantile(q, "", request_buckets), f"request {percentile(q)}") for q in (0.5, 0.99)),
             *(query(quantile(q, "", runtime_buckets), f"model run {percentile(q)}") for q in (0.5, 0.99))]),
            "^model run.*"),
    ]


def batching_panels() -> list:
    return [
        bucket_heatmap(
            "Processed batch size",
            "Model calls per second by the size of the batch they ran (after padding to an allowed size).",
            f"sum by (le) ({rate(process(f'{n.BATCH_SIZE}_bucket'))})", units.Short, units.OpsPerSecond),
        with_threshold_line(graph(
            "Batch queueing latency",
            "p50 and p99 of the time a request waits in the batching queue before its batch runs. The red "
            f"line is the p99 above which DigitsBatchQueueingSlow fires ({r.QUEUING_P99_THRESHOLD_US / 1000:g} ms).",
            units.Microseconds,
            [query(quantile(q, "instance", process(f"{n.QUEUING_LATENCY}_bucket")),
                   f"{percentile(q)} {{{{instance}}}}") for q in (0.5, 0.99)]),
            GREEN, (r.QUEUING_P99_THRESHOLD_US, RED)),
        graph(
            "Batched model calls",
            "Model calls per second made by the batcher, each running one batch.",
            units.OpsPerSecond,
            [query(f"sum by (instance) ({rate(process(n.WRAPPED_RUN_COUNT))})", "{{instance}}")]),
        graph(
            "Mean batch and padding size",
            "Mean number of examples per model call, and how many of them were padding added to reach an "
            "allowed batch size.",
            units.Short,
            [query(mean("instance", n.BATCH_SIZE, process), "batch {{instance}}"),
             query(mean("instance", n.PADDING_SIZE, process), "padding {{instance}}")]).min(0),
    ]


def version_panels() -> list:
    by_path = f"{WHERE}, model_path"
    load_count = f"sum by ({by_path}) ({counted(loads(n.LOAD_ATTEMPT_COUNT))})"
    return [
        graph(
            "Loaded versions",
            "Number of server instances that have each version of the model loaded. Exported by `digits "
            "serve` (TF Serving itself has no such metric).",
            units.Short,
            [query(f"count by ({WHERE}, model_version) ({served(n.LOADED_VERSIONS)})",
                   "version {{model_version}} {{namespace}}")],
            width=12).min(0).decimals(0),
        panel(
            table.Panel().show_header(True)
            .with_transformation(model.DataTransformerConfig(id_val="organize", options={
                "excludeByName": {"Time": True},
                "renameByName": {"model_version": "version", "error_code": "error", "Value": "instances"}}))
            .with_transformation(model.DataTransformerConfig(id_val="sortBy", options={
                "sort": [{"field": "version", "desc": True}]})),
            "Version states",
            "Each version `digits serve` knows, in the state GetModelStatus reports (AVAILABLE, or END with "
            "the error that failed its load), and on how many instances. A failed load shows from its first "
            "failure on and stays while the version stays failed (DigitsModelLoadFailed). TF Serving exports "
            "no such metric: there, see the failed loads in \"Model loads\".",
            units.Short,
            [query(f"count by ({WHERE}, model_version, state, error_code) ({served(n.VERSION_STATE)} == 1)", "",
                   instant=True, fmt=PromQueryFormat.TABLE)], width=12),
        graph(
            "Model loads",
            "SavedModel load attempts per rate interval, by version directory and outcome. A version's first "
            "failed load counts too (TF Serving's counter is born at 1 on it, with a model_path of its own).",
            units.Short,
            [query(f"sum by ({by_path}, status) ({counted(loads(n.LOAD_ATTEMPT_COUNT))})",
                   "{{status}} {{model_path}} {{namespace}}")],
            width=12).draw_style(common.GraphDrawStyle.BARS).fill_opacity(80).min(0).decimals(0),
        graph(
            "Load and warmup time",
            "Mean time to load a version (load latency per load attempt) and to run its warmup requests; "
            "a point where a load happened, the first load of a version included (its counters are born "
            "with it).",
            units.Microseconds,
            # `> 0` keeps the intervals with a load: elsewhere 0 / 0 is NaN.
            [query(f"sum by ({by_path}) ({counted(loads(n.LOAD_LATENCY))})\n/\n{load_count}\n> 0",
                   "load {{model_path}} {{namespace}}"),
             query(f"sum by ({by_path}) ({counted(loads(n.WARMUP_LATENCY + '_sum'))})\n/\n"
                   f"sum by ({by_path}) ({counted(loads(n.WARMUP_LATENCY + '_count'))})\n> 0",
                   "warmup {{model_path}} {{namespace}}")],
            width=12).show_points(common.VisibilityMode.ALWAYS).point_size(6),
    ]


def drift_panels() -> list:
    traffic = recorded(r.PREDICTIONS_RATE)

    def traffic_weighted(shares: str) -> str:
        # Several versions may serve at once: weigh each version's shares by its predictions.
        return (f"sum by ({n.CLASS_LABEL}) (\n  {shares}\n  * on ({r.MODEL_VERSION}) group_left\n  {traffic}\n)\n"
                f"/ on () group_left\nsum ({traffic})")

    guard = r.MIN_PREDICTIONS_FOR_DRIFT / r.WINDOW_SECONDS[r.DRIFT_WINDOW]
    return [
        panel(
            barchart.Panel().x_field(n.CLASS_LABEL).show_value(common.VisibilityMode.NEVER)
            .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
            .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                    .placement(common.LegendPlacement.BOTTOM).show_legend(True))
            .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(model.DataTransformerConfig(id_val="organize", options={
                "excludeByName": {"Time": True},
                "renameByName": {"Value #A": "live", "Value #B": "reference"},
            }))
            .with_transformation(model.DataTransformerConfig(id_val="sortBy", options={
                "sort": [{"field": n.CLASS_LABEL, "desc": False}]})),
            "Predicted digits vs reference",
            f"Share of predictions per digit over the last {r.DRIFT_WINDOW}, against the share the served "
            "version predicted on its eval split (the reference profile). With several versions serving, "
            "each is weighed by its traffic.",
            units.PercentUnit,
            [query(traffic_weighted(recorded(r.CLASS_SHARE)), "live", instant=True, fmt=PromQueryFormat.TABLE),
             query(traffic_weighted(recorded(r.REFERENCE_SHARE)), "reference", instant=True,
                   fmt=PromQueryFormat.TABLE)]),
        with_threshold_line(graph(
            "Prediction drift (PSI)",
            f"Population stability index of the predicted digits over {r.DRIFT_WINDOW} against the reference, "
            f"per version. Below 0.1 is stable; the red line ({r.PSI_THRESHOLD:g}) is where "
            f"DigitsPredictionDrift fires (with at least {r.MIN_PREDICTIONS_FOR_DRIFT} predictions in the hour).",
            "none",
            [query(recorded(r.PSI), "version {{model_version}}")]),
            GREEN, (r.PSI_THRESHOLD, RED)).min(0),
        with_threshold_line(graph(
            "Predictions per second",
            f"Predictions per second per version over {r.DRIFT_WINDOW} (one request may hold many). Below the "
            f"red line ({r.MIN_PREDICTIONS_FOR_DRIFT} per {r.DRIFT_WINDOW}) the drift alerts stay silent.",
            units.CountsPerSecond,
            [query(recorded(r.PREDICTIONS_RATE), "version {{model_version}}")], width=8),
            RED, (guard, GREEN)).min(0),
        bucket_heatmap(
            "Top-class confidence",
            "Predictions per second by the probability the model gave its answer (the top class), as "
            "`digits serve` or the web app in front of the model server counted them: per namespace the "
            "larger of the two counts, which see the same answers where the web app asks `digits serve`.",
            answered_buckets(n.CONFIDENCE, ""), units.PercentUnit, units.CountsPerSecond).span(8),
        dashed(graph(
            "Mean confidence vs reference",
            f"Mean top-class probability over {r.DRIFT_WINDOW}, per version, against its mean on the eval "
            f"split. DigitsConfidenceDrop fires below the dashed alert line (reference - {r.CONFIDENCE_DROP:g}).",
            units.PercentUnit,
            [query(recorded(r.CONFIDENCE_MEAN), "live v{{model_version}}"),
             query(recorded(r.REFERENCE_CONFIDENCE), "reference v{{model_version}}"),
             query(f"{recorded(r.REFERENCE_CONFIDENCE)} - {r.CONFIDENCE_DROP:g}", "alert below v{{model_version}}")],
            width=8), "^(reference|alert).*"),
        dashed(graph(
            "Refused or unsure vs reference",
            f"Share of the answers over {r.DRIFT_WINDOW} that the model called \"not a digit\" or \"unsure\" "
            "(its decision output: a person should look), per version, against the share on its eval split. "
            f"DigitsRefusalsHigh fires above the dashed alert line (the larger of {r.REFUSAL_RATIO:g} x the "
            f"reference and the reference + {r.REFUSAL_MARGIN:g}).",
            units.PercentUnit,
            [query(recorded(r.REFUSAL_SHARE), "live v{{model_version}}"),
             query(recorded(r.REFERENCE_REFUSAL), "reference v{{model_version}}"),
             query(f"({recorded(r.REFERENCE_REFUSAL)} * {r.REFUSAL_RATIO:g} > {recorded(r.REFERENCE_REFUSAL)} + "
                   f"{r.REFUSAL_MARGIN:g}) or ({recorded(r.REFERENCE_REFUSAL)} + {r.REFUSAL_MARGIN:g})",
                   "alert above v{{model_version}}")],
            width=8), "^(reference|alert).*"),
    ]


def web_panels() -> list:
    """The web page (`digits web`): people's judgements of the answers, and the page's own API."""
    day = r.WINDOW_SECONDS[r.ONLINE_WINDOW]
    return [
        with_threshold_line(graph(
            "Online accuracy (people's judgements)",
            f"Share of the answers people judged right on the web page over {r.ONLINE_WINDOW}, per version. "
            "People correct wrong answers more readily than they confirm right ones, so this reads below the "
            f"held-out accuracy. DigitsOnlineAccuracyLow fires below the red line ({r.ONLINE_ACCURACY_THRESHOLD:.0%}) "
            f"over at least {r.MIN_FEEDBACK_FOR_ACCURACY} judgements.",
            units.PercentUnit,
            [query(recorded(r.ONLINE_ACCURACY), "version {{model_version}}")], width=8),
            RED, (r.ONLINE_ACCURACY_THRESHOLD, GREEN)).min(0).max(1),
        with_threshold_line(graph(
            "Judgements per day",
            f"Answers people judged (right or corrected) per day, from the last {r.ONLINE_WINDOW}, per version. "
            f"Below the line ({r.MIN_FEEDBACK_FOR_ACCURACY}) the online-accuracy alert stays silent.",
            units.Short,
            [query(f"{recorded(r.FEEDBACK_RATE)} * {day}", "version {{model_version}}")], width=8),
            RED, (r.MIN_FEEDBACK_FOR_ACCURACY, GREEN)).min(0),
        panel(
            table.Panel().show_header(True)
            .with_transformation(model.DataTransformerConfig(id_val="organize", options={
                "excludeByName": {"Time": True},
                "renameByName": {n.CLASS_LABEL: "model said", n.CORRECTED_CLASS_LABEL: "person said",
                                 "Value": "per day"}}))
            .with_transformation(model.DataTransformerConfig(id_val="sortBy", options={
                "sort": [{"field": "per day", "desc": True}]})),
            "Top corrections",
            f"The most frequent (answer, correction) pairs per day over the last {r.ONLINE_WINDOW}: a weak digit "
            "shows as one pair on top. The corrected images wait for a reviewer; accepted ones are training data "
            "(docs/web.md: review).",
            units.Short,
            [query(f"topk(10, sum by ({n.CLASS_LABEL}, {n.CORRECTED_CLASS_LABEL}) "
                   f"({recorded(r.CORRECTIONS_RATE)}) * {day}) > 0",
                   "", instant=True, fmt=PromQueryFormat.TABLE)], width=8),
        graph(
            "Web requests by outcome",
            "Requests per second to the page's API by endpoint and outcome (5-minute rate): ok, the person's "
            "image refused (bad_request, no_ink, too_large), or the model server's fault (model_*).",
            units.RequestsPerSecond,
            [query(recorded_by_job(r.WEB_REQUESTS_RATE), "{{endpoint}} {{outcome}}")], width=8).min(0),
        graph(
            "Web API latency",
            "p50 and p95 of the time the page's API takes to answer, the model server's answer included "
            "(5-minute rate), per endpoint.",
            units.Seconds,
            [query(recorded_by_job(r.web_latency(q)), f"{percentile(q)} {{{{endpoint}}}}") for q in r.WEB_QUANTILES], width=8).min(0),
        with_threshold_line(graph(
            "Page predicts failing at the model server",
            "Share of the page's predicts that failed because the model server was down, slow or answered "
            f"wrongly (10-minute rate). DigitsWebModelServerErrors fires above the red line "
            f"({r.WEB_MODEL_ERROR_THRESHOLD:.0%}).",
            units.PercentUnit,
            [query(recorded_by_job(r.WEB_MODEL_ERROR_RATIO), "{{job}}")], width=8),
            GREEN, (r.WEB_MODEL_ERROR_THRESHOLD, RED)).min(0),
        graph(
            "Corrections waiting for review",
            "Corrections people sent that no reviewer has accepted or rejected yet (digits feedback review, or "
            "the review page); none of them reaches a training set. A jump is a flood: see who sent it with "
            "digits feedback list. The app refuses more past --max-pending (web outcome queue_full).",
            units.Short,
            [query(f"sum by (job) ({selector(n.WEB_FEEDBACK_PENDING, WEB_JOB, *TOPOLOGY)})", "{{job}}")],
            width=8).min(0),
    ]


def web_sheet(metric: str, *matchers: str) -> str:
    """A series of the web app's tally-form reading (POST /api/read-sheet) or review queue. The queue's
    gauges are read from one directory by every instance of the app: panels take their max, not the sum."""
    return selector(metric, WEB_JOB, *TOPOLOGY, *matchers)


def per_hour(metric: str, by: str, *matchers: str) -> str:
    return f"sum by ({WHERE}, {by}) ({rate(web_sheet(metric, *matchers))}) * 3600"


def sheet_panels() -> list:
    """Photos of tally forms read through the web app (`digits web --form`): what a person still has to do."""
    outcomes = ", ".join(n.SHEET_OUTCOMES)
    accepted = f'outcome="{n.SHEET_ACCEPTED}"'
    return [
        graph(
            "Sheets read per hour, by verdict",
            f"Tally-form photos sent to POST /api/read-sheet per hour, per form, by verdict ({outcomes}): "
            f"{n.SHEET_ACCEPTED} needs no person; {n.SHEET_NEEDS_REVIEW}, a digit the model was unsure of; "
            f"{n.SHEET_INCONSISTENT}, counts read without doubt that do not add up (the form itself, or a misread "
            f"the model stood by); {n.SHEET_UNREADABLE}, refused as no image, too large or not the form.",
            units.Short,
            [query(per_hour(n.WEB_SHEETS, f"{n.FORM_LABEL}, outcome"), "{{form}} {{outcome}}")], width=8).min(0),
        graph(
            "Sheets a person must look at",
            "Share of the sheets sent that were not accepted without a person (any verdict but "
            f"{n.SHEET_ACCEPTED}, unreadable photos included), per form. A rise after a rollout is the model "
            "reading worse; a rise of inconsistent sheets alone is the forms, or a confident misreading.",
            units.PercentUnit,
            [query(f"1 - sum by ({WHERE}, {n.FORM_LABEL}) ({rate(web_sheet(n.WEB_SHEETS, accepted))})\n"
                   f"  / sum by ({WHERE}, {n.FORM_LABEL}) ({rate(web_sheet(n.WEB_SHEETS))})", "{{form}}")],
            width=8).min(0).max(1),
        graph(
            "Counts and failed checks per hour",
            f"The counts of the sheets read per hour by outcome ({', '.join(n.COUNT_OUTCOMES)}), and the "
            "arithmetic checks that failed on counts read without doubt, per check: one check failing often "
            "is a form people fill in wrongly.",
            units.Short,
            [query(per_hour(n.WEB_SHEET_COUNTS, f"{n.FORM_LABEL}, outcome"), "counts {{outcome}}"),
             query(per_hour(n.WEB_SHEET_CHECK_FAILURES, f"{n.FORM_LABEL}, {n.CHECK_LABEL}"), "failed: {{check}}")],
            width=8).min(0),
        with_threshold_line(graph(
            "Sheets waiting for a person",
            "Sheets in the review queue, per form: not accepted alone, waiting for a reviewer to confirm, "
            f"correct or reject them on /review/sheets. DigitsSheetReviewBacklogGrowing opens a ticket when at "
            f"least {r.SHEET_BACKLOG_MIN} wait (the orange line) and more than {r.SHEET_BACKLOG_WINDOW} before, "
            "for 30 minutes.",
            units.Short,
            [query(f"max by ({WHERE}, {n.FORM_LABEL}) ({web_sheet(n.WEB_SHEETS_PENDING)})", "{{form}}")],
            width=8), GREEN, (r.SHEET_BACKLOG_MIN, ORANGE)).min(0).decimals(0),
        with_threshold_line(graph(
            "Oldest waiting sheet",
            "How long the oldest sheet in the review queue has waited for a person, per form; no line while "
            "nothing waits. Its counts are in no result until it is reviewed. DigitsSheetWaitingTooLong opens "
            f"a ticket above the red line ({r.SHEET_MAX_WAIT_SECONDS // 3600}h).",
            units.Seconds,
            [query(f"time() - min by ({WHERE}, {n.FORM_LABEL}) ({web_sheet(n.WEB_SHEET_OLDEST_PENDING)})",
                   "{{form}}")],
            width=8), GREEN, (r.SHEET_MAX_WAIT_SECONDS, RED)).min(0),
        graph(
            "Sheet reviews",
            f"Sheets people reviewed per hour, per form, by verdict: {n.SHEET_CONFIRMED} (every box confirmed or "
            f"corrected: the counts are the person's) or {n.SHEET_REJECTED} (the photo cannot be read as the "
            "form). None while sheets wait: no reviewer is working.",
            units.Short,
            [query(per_hour(n.WEB_SHEET_REVIEWS, f"{n.FORM_LABEL}, {n.VERDICT_LABEL}"), "{{form}} {{verdict}}")],
            width=8).min(0),
    ]


def scrape_panels() -> list:
    up_mappings = [model.ValueMap(options={
        "0": model.ValueMappingResult(text="down", color=RED, index=0),
        "1": model.ValueMappingResult(text="up", color=GREEN, index=1),
    })]
    return [
        panel(
            statetimeline.Panel().mappings(up_mappings).show_value(common.VisibilityMode.NEVER)
            .merge_values(True).fill_opacity(80),
            "Model servers up",
            "Whether Prometheus could scrape each model server instance (DigitsModelServerDown pages when "
            "one stays down).",
            "none",
            [query(process("up"), "{{instance}}")]),
        graph(
            "Scrape duration",
            "How long Prometheus takes to scrape each model server's metrics page; near the scrape "
            "timeout, samples go missing.",
            units.Seconds,
            [query(process("scrape_duration_seconds"), "{{instance}}")]).min(0),
    ]


def probe_panels() -> list:
    """The blackbox exporter's view: what a client gets, whatever the server's own metrics say."""
    return [
        with_threshold_line(graph(
            "Probe success by module",
            f"Share of the blackbox exporter's probes that succeeded (5-minute average), per module: "
            f"{n.PROBE_PREDICT_MODULE}, a REST predict of a known digit whose answer must name it, and "
            f"{n.PROBE_GRPC_MODULE}, the gRPC health check. The one signal that sees requests that never "
            "arrive (no version loaded, no ready pod, a broken Service); DigitsPredictProbeFailing pages when "
            "a probe has failed for 2 minutes.",
            units.PercentUnit,
            [query(recorded_by_job(r.PROBE_SUCCESS_RATIO), "{{module}} {{namespace}}")]),
            RED, (1, GREEN)).min(0).max(1),
        graph(
            "Probe duration",
            "How long each probe took, per probed target and module (the predict probe includes the model's "
            "answer); near the probe timeout, probes fail.",
            units.Seconds,
            [query(f"max by ({WHERE}, instance, module) ({probed(n.PROBE_DURATION)})",
                   "{{module}} {{instance}}")]).min(0),
    ]


ROWS = (
    # (title, collapsed, panels), as docs/runbook.md lists them. Open rows answer "is it healthy,
    # and is the model still right?"; collapsed ones, one click away, "why not?".
    ("SLOs", False, slo_panels),
    ("Probes", False, probe_panels),
    ("Traffic", False, traffic_panels),
    ("Latency", False, latency_panels),
    ("Batching", True, batching_panels),
    ("Model versions", True, version_panels),
    ("Predictions & drift", False, drift_panels),
    ("Web app & feedback", False, web_panels),
    ("Tally forms", True, sheet_panels),
    ("Scrape health", True, scrape_panels),
)


def multi_value(name: str, label: str, query: str):
    """A variable of label values that may be several or all: "All" is `.*`, which also matches series
    without the label (outside Kubernetes there is no namespace, and often no cluster)."""
    return (dashboard.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
            .multi(True).include_all(True).all_value(ALL)
            .current(model.VariableOption(text=["All"], value=["$__all"]))
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC))


def variables() -> list:
    cluster, namespace = TOPOLOGY
    return [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        .current(model.VariableOption(text="Prometheus", value=DATASOURCE_UID)),
        multi_value("cluster", "Cluster", f"label_values({selector('up', JOB)}, cluster)"),
        multi_value("namespace", "Namespace", f"label_values({selector('up', JOB, cluster)}, namespace)"),
        dashboard.QueryVariable("model").label("Model").datasource(DATASOURCE)
        .query(f'label_values({selector(n.REQUEST_COUNT, JOB, *TOPOLOGY)}, model_name)')
        .current(model.VariableOption(text=n.DEFAULT_MODEL_NAME, value=n.DEFAULT_MODEL_NAME))
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC),
        multi_value("instance", "Instance", f"label_values({selector('up', JOB, *TOPOLOGY)}, instance)"),
    ]


def build() -> model.Dashboard:
    """The dashboard: the rows of ROWS, each open one followed by its panels, each collapsed one holding them."""
    builder = (dashboard.Dashboard(TITLE).uid(UID)
               .description("SRE view of the digits model server: SLOs and error budgets, black-box probes, "
                            "traffic, latency, prediction drift, the web page and people's feedback, batching, "
                            "model versions and scrape health, per cluster and namespace where those labels exist.")
               .tags(["digits", "tensorflow-serving", "slo", "mlops"])
               .refresh("30s").time("now-6h", "now").timezone("browser")
               .tooltip(model.DashboardCursorSync.CROSSHAIR).readonly())
    for variable in variables():
        builder = builder.with_variable(variable)
    items: list = []
    for title, collapsed, make_panels in ROWS:
        row = dashboard.Row(title).collapsed(collapsed).build()
        panels = [item.build() for item in make_panels()]
        if collapsed:  # a collapsed row holds its panels; an open one is followed by them
            row.panels = panels
            items.append(row)
        else:
            items += [row, *panels]
    built = builder.build()
    built.panels = layout(items)
    return built


def layout(items: list) -> list:
    """Ids and grid positions, top to bottom: panels fill lines of 24 columns from the left. A collapsed
    row's panels are placed right below it, where Grafana shows them when the row opens.
    (The SDK's own placement lets a collapsed row's panels push the next row down.)"""
    ids = itertools.count(1)
    x = y = line = 0

    def place(item, x: int, y: int, line: int) -> tuple[int, int, int]:
        width, height = item.grid_pos.w, item.grid_pos.h
        if x + width > GRID_WIDTH:
            x, y, line = 0, y + line, 0
        item.id_val = next(ids)
        item.grid_pos = model.GridPos(h=height, w=width, x=x, y=y)
        return x + width, y, max(line, height)

    for item in items:
        if isinstance(item, model.RowPanel):
            y, x, line = y + line, 0, 0
            item.id_val = next(ids)
            item.grid_pos = model.GridPos(h=1, w=GRID_WIDTH, x=0, y=y)
            y += 1
            nested = (0, y, 0)
            for inner in item.panels:
                nested = place(inner, *nested)
        else:
            x, y, line = place(item, x, y, line)
    return items


def render(built: model.Dashboard) -> str:
    return json.dumps(built, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    parser.add_argument("--out", type=Path, default=OUT, help="the dashboard JSON file")
    args = parser.parse_args(argv)
    text = render(build())
    if args.check:
        if not args.out.exists() or args.out.read_text(encoding="utf-8") != text:
            print(f"error: {args.out} is out of date, run `.venv-tools/bin/python monitoring/grafana/generate.py`",
                  file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
