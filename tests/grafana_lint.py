"""Lint rules for the generated Grafana dashboard, in the spirit of Grafana's dashboard-linter.

Each rule takes the dashboard as parsed JSON and returns its problems, one readable line each
(an empty list: clean), so a test can show them and can prove a rule catches a broken copy.
`dashboard_exprs(path)` gives every query with the template variables filled in for a live
Prometheus. Standard library, PyYAML and monitoring.names only: it runs in the project's Python 3.10,
where grafana-foundation-sdk (Python >= 3.11) is not installed.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from monitoring import names

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "monitoring" / "grafana"
GENERATOR = GRAFANA / "generate.py"
DASHBOARD = GRAFANA / "dashboards" / "digits-serving.json"
DATASOURCE_PROVISIONING = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVISIONING = GRAFANA / "provisioning" / "dashboards" / "digits.yml"
RULES_DIR = REPO / "monitoring" / "prometheus" / "rules"

DATASOURCE_VARIABLE = "${datasource}"
RATE_INTERVAL = "$__rate_interval"
# What the template variables stand for when a query is sent to Prometheus without Grafana: "All"
# (`.*`, which also matches series without the label, as outside Kubernetes).
ALL = ".*"
LIVE_VALUES = {"__rate_interval": "1m", "model": ALL, "instance": ALL, "cluster": ALL, "namespace": ALL}
TOPOLOGY_VARIABLES = names.TOPOLOGY_LABELS  # each a variable of the same name, filtering every series
PROMETHEUS_SERIES = ("up", "scrape_duration_seconds")  # written by Prometheus for every target
PROBE_SERIES = (names.PROBE_SUCCESS, names.PROBE_DURATION)  # written by the blackbox exporter per probe
# What the model answered: counted by `digits serve` and by the web app in front of any model server.
ANSWERED = {names.PREDICTIONS, names.CONFIDENCE, names.REFERENCE_CLASS_SHARE, names.REFERENCE_CONFIDENCE_MEAN,
            names.REFERENCE_CONFIDENCE_BUCKET_SHARE, names.REFERENCE_EXAMPLES, names.DECISION_COUNT,
            names.REFERENCE_DECISION_SHARE}

# TF Serving counters carry no `_total`: the declarations of monitoring/names.py say which are counters.
COUNTERS = {metric.name for metric in names.METRICS.values() if metric.kind == "counter"}
COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
RANGE_FUNCTIONS = {"rate", "increase", "irate"}
# A counter born at its first increment is read, besides its increase, by its first value and its
# presence an interval ago (generate.py `counted`, as monitoring/rules.py `counter_rate`).
BORN_FUNCTIONS = {"min_over_time", "present_over_time"}
# The model label of each metric comes from its declaration in monitoring/names.py (labels): batching
# metrics are per process, load metrics name the version directory, the rest carry model_name.
MODEL_LABELS = ("model_name", "model_path")

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<matchers>\{(?:[^}"'`]|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)*\})
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+(?:ms|[smhdwy]))+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<variable>\$\w+|\$\{[^}]*\})
  | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<paren>[()])
  | (?P<other>[-+*/%^<>=!@,]+)
""", re.VERBOSE)
_MATCHER = re.compile(r"""\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*("(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)\s*,?""")
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


# -- Reading the dashboard -----------------------------------------------------------------------

def load(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def rows(dashboard: dict) -> list[dict]:
    return [panel for panel in dashboard.get("panels", []) if panel.get("type") == "row"]


def panels(dashboard: dict) -> list[dict]:
    """Every panel that shows data: top-level ones and those inside (collapsed) rows, rows themselves not."""
    found = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found += [nested for nested in panel.get("panels") or [] if nested.get("type") != "row"]
        else:
            found.append(panel)
    return found


def exprs(dashboard: dict) -> list[str]:
    """Every query of every panel, as written in the dashboard."""
    return [target.get("expr", "") for panel in panels(dashboard) for target in panel.get("targets") or []]


def substitute(expr: str, values: dict[str, str] = LIVE_VALUES) -> str:
    """Template variables ($name, ${name}, ${name:format}) replaced by `values`; others left alone."""
    return _VARIABLE.sub(lambda match: values.get(match.group(1) or match.group(2), match.group(0)), expr)


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every query of the dashboard at `path`, ready for Prometheus: $__rate_interval -> 1m, every other
    variable "All" (.*)."""
    return [substitute(expr) for expr in exprs(load(path))]


def variables(dashboard: dict) -> dict[str, dict]:
    return {variable.get("name"): variable for variable in dashboard.get("templating", {}).get("list", [])}


def variable_selectors(dashboard: dict) -> list[str]:
    """The series selectors of the query variables (`label_values(<selector>, label)`)."""
    found = []
    for variable in variables(dashboard).values():
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        if variable.get("type") == "query":
            match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.S)
            found.append(match.group(1) if match else query)
    return found


# -- PromQL, just enough of it -------------------------------------------------------------------

@dataclass
class Selector:
    metric: str
    matchers: dict[str, tuple[str, str]] = field(default_factory=dict)  # label -> (operator, value)
    range: str | None = None  # what is between [ and ], if a range follows
    function: str | None = None  # the innermost call around it ("" for plain parentheses)


def tokens(expr: str) -> list[tuple[str, str]]:
    found, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if not match:
            raise ValueError(f"cannot read PromQL at {expr[position:position + 20]!r} in {expr!r}")
        if match.lastgroup != "space":
            found.append((match.lastgroup, match.group()))
        position = match.end()
    return found


def matchers(text: str) -> dict[str, tuple[str, str]]:
    """`{a="x", b=~"y"}` -> {"a": ("=", "x"), "b": ("=~", "y")}."""
    inner, found = text[1:-1], {}
    for match in _MATCHER.finditer(inner):
        label, operator, value = match.groups()
        found[label] = (operator, value[1:-1])
    return found


def selectors(expr: str) -> list[Selector]:
    """The series selectors of `expr`: metric names with their label matchers, range and enclosing call.
    Function names, keywords, label lists of by/without/on/ignoring/group_* and strings are skipped."""
    items = tokens(expr)
    found: list[Selector] = []
    calls: list[str] = []
    pending: str | None = None
    index = 0
    while index < len(items):
        kind, text = items[index]
        following = items[index + 1] if index + 1 < len(items) else ("", "")
        if kind == "name" and text in LABEL_LIST_KEYWORDS:
            if following == ("paren", "("):  # a list of label names, not series
                index = next(i for i in range(index + 1, len(items)) if items[i] == ("paren", ")"))
        elif kind == "name" and text.lower() in KEYWORDS:
            pass
        elif kind == "name" and (following == ("paren", "(") or text in AGGREGATIONS):
            pending = text
        elif kind == "name":
            selector = Selector(text, function=calls[-1] if calls else None)
            if following[0] == "matchers":
                selector.matchers = matchers(following[1])
                index += 1
            if index + 1 < len(items) and items[index + 1][0] == "range":
                selector.range = items[index + 1][1][1:-1]
                index += 1
            found.append(selector)
        elif kind == "matchers":  # a selector without a metric name ({__name__=~"..."})
            found.append(Selector("", matchers(text), function=calls[-1] if calls else None))
        elif (kind, text) == ("paren", "("):
            calls.append(pending or "")
            pending = None
        elif (kind, text) == ("paren", ")"):
            calls.pop()
        index += 1
    return found


def ranges(expr: str) -> list[str]:
    """Every range or subquery window of `expr` (what is between [ and ])."""
    return [text[1:-1] for kind, text in tokens(expr) if kind == "range"]


def base_name(metric: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix) and metric[: -len(suffix)] in served_metrics():
            return metric[: -len(suffix)]
    return metric


def is_counter(metric: str) -> bool:
    return metric in COUNTERS or metric.endswith(COUNTER_SUFFIXES)


# -- What exists -----------------------------------------------------------------------------------

def served_metrics() -> set[str]:
    """Metric names declared in monitoring.names: TF Serving's (`:tensorflow:...`) and ours."""
    return set(names.METRICS)


def recorded_series(rules_dir: Path = RULES_DIR) -> set[str]:
    found = set()
    for path in sorted(Path(rules_dir).glob("*.yml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            found |= {rule["record"] for rule in group.get("rules", []) if "record" in rule}
    return found


def known_series() -> set[str]:
    """Every name a dashboard query may read: metrics (with their histogram series), recorded series,
    and the series Prometheus writes for each target."""
    metrics = served_metrics()
    return ({f"{metric}{suffix}" for metric in metrics for suffix in ("", *HISTOGRAM_SUFFIXES)}
            | recorded_series() | set(PROMETHEUS_SERIES) | set(PROBE_SERIES))


def required_filters(metric: str, recorded: set[str]) -> dict[str, tuple[str, ...]]:
    """label -> what its matcher must contain, for a series of `metric` in a dashboard query. Every series
    is filtered by the topology variables ($cluster, $namespace); raw ones also by their job."""
    filters = {label: (f"${label}",) for label in TOPOLOGY_VARIABLES}
    if metric in recorded:
        # `level:metric:operation`: the level names the labels kept (job_model_version: job, model_name, ...)
        level = metric.split(":")[0].split("_")
        return {**filters, **{label: (variable,) for word, label, variable in (("model", "model_name", "$model"),
                                                                               ("instance", "instance", "$instance"))
                              if word in level}}
    if metric in PROBE_SERIES:  # `instance` is the probed target
        return {**filters, "job": (names.PROBE_JOB,)}
    base = base_name(metric)
    if base.startswith("digits_web_"):  # the web app's own (its instances are not the model servers')
        return {**filters, "job": (names.WEB_JOB,)}
    jobs = (names.SERVING_JOB, names.WEB_JOB) if base in ANSWERED else (names.SERVING_JOB,)
    filters = {**filters, "job": jobs, "instance": ("$instance",)}
    declared = names.METRICS[base].labels if base in names.METRICS else ()
    return {**filters, **{label: ("$model",) for label in MODEL_LABELS if label in declared}}


def generator_constant(name: str, path: Path = GENERATOR) -> str:
    """A string constant of the generator, read without importing it (it needs Python >= 3.11)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{path} defines no {name}")


# -- Rules: each returns its problems, one line each -----------------------------------------------

def _where(panel: dict) -> str:
    return f"panel {panel.get('id')} {panel.get('title')!r}"


def untitled_panels(dashboard: dict) -> list[str]:
    return [f"{_where(panel)} ({panel.get('type')}) has no title"
            for panel in panels(dashboard) if not str(panel.get("title", "")).strip()]


def undescribed_panels(dashboard: dict) -> list[str]:
    return [f"{_where(panel)} has no description"
            for panel in panels(dashboard) if not str(panel.get("description", "")).strip()]


def panels_without_unit(dashboard: dict) -> list[str]:
    return [f"{_where(panel)} has no unit (fieldConfig.defaults.unit)" for panel in panels(dashboard)
            if not (panel.get("fieldConfig") or {}).get("defaults", {}).get("unit")]


def panels_without_targets(dashboard: dict) -> list[str]:
    problems = []
    for panel in panels(dashboard):
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{_where(panel)} has no query")
        problems += [f"{_where(panel)} query {target.get('refId')!r} is empty"
                     for target in targets if not str(target.get("expr", "")).strip()]
    return problems


def foreign_datasources(dashboard: dict, provisioned_uid: str | None = None) -> list[str]:
    """Panels and queries must read the datasource variable (or the provisioned Prometheus)."""
    provisioned_uid = provisioned_uid or generator_constant("DATASOURCE_UID")
    allowed = {DATASOURCE_VARIABLE, provisioned_uid}

    def wrong(datasource) -> bool:
        return not isinstance(datasource, dict) or datasource.get("type") != "prometheus" \
            or datasource.get("uid") not in allowed

    problems = [f"{_where(panel)} datasource is {panel.get('datasource')!r}, not {DATASOURCE_VARIABLE}"
                for panel in panels(dashboard) if wrong(panel.get("datasource"))]
    problems += [f"{_where(panel)} query {target.get('refId')!r} datasource is {target['datasource']!r}"
                 for panel in panels(dashboard) for target in panel.get("targets") or []
                 if "datasource" in target and wrong(target["datasource"])]
    problems += [f"variable {name!r} datasource is {variable['datasource']!r}"
                 for name, variable in variables(dashboard).items()
                 if "datasource" in variable and wrong(variable["datasource"])]
    return problems


def fixed_ranges(dashboard: dict) -> list[str]:
    """Every range in a query is $__rate_interval (recorded series are rates already and need none)."""
    return [f"{_where(panel)} query {target.get('refId')!r} uses [{window}], not [{RATE_INTERVAL}]"
            for panel in panels(dashboard) for target in panel.get("targets") or []
            for window in ranges(target.get("expr", "")) if window != RATE_INTERVAL]


def unfiltered_series(dashboard: dict) -> list[str]:
    """Every series is filtered by the template variables ($cluster, $namespace, and $model, $instance
    where it has the label), and raw series by their job: the model server's (the web app exports some of
    the same names), and both where either counts what the model answered."""
    recorded = recorded_series()
    problems = []
    for panel in panels(dashboard):
        for target in panel.get("targets") or []:
            for found in selectors(target.get("expr", "")):
                for label, wanted in required_filters(found.metric, recorded).items():
                    operator, value = found.matchers.get(label, ("", ""))
                    if any(each not in value for each in wanted) or operator not in ("=", "=~"):
                        problems.append(f"{_where(panel)} query {target.get('refId')!r}: {found.metric} "
                                        f"is not filtered by {label} ({' and '.join(wanted)})")
    return problems


def bare_counters(dashboard: dict) -> list[str]:
    """A counter only means something as a rate: it must sit right inside rate()/increase()/irate()."""
    return [f"{_where(panel)} query {target.get('refId')!r}: counter {found.metric} outside rate()/increase()"
            for panel in panels(dashboard) for target in panel.get("targets") or []
            for found in selectors(target.get("expr", ""))
            if is_counter(found.metric)
            and (found.function not in RANGE_FUNCTIONS | BORN_FUNCTIONS or found.range is None)]


def exported_inputs(text: str) -> list[str]:
    """File provisioning cannot fill the inputs of a dashboard exported 'for sharing externally'."""
    return [f"the dashboard contains {needle!r}" for needle in ("__inputs", "${DS_") if needle in text]


def missing_datasource_variable(dashboard: dict, provisioned_uid: str | None = None) -> list[str]:
    provisioned_uid = provisioned_uid or generator_constant("DATASOURCE_UID")
    variable = variables(dashboard).get("datasource")
    if variable is None:
        return ["no template variable named 'datasource'"]
    problems = []
    if variable.get("type") != "datasource" or variable.get("query") != "prometheus":
        problems.append(f"variable 'datasource' is {variable.get('type')!r} of {variable.get('query')!r}, "
                        "not a prometheus datasource variable")
    current = (variable.get("current") or {}).get("value")
    if current != provisioned_uid:
        problems.append(f"variable 'datasource' defaults to {current!r}, not the provisioned {provisioned_uid!r}")
    return problems


def unknown_series(dashboard: dict) -> list[str]:
    """Every name read is a metric of monitoring.names, a recorded series of monitoring/prometheus/rules,
    or one Prometheus writes itself: a typo, or a rule renamed in rules.py, shows up here."""
    known = known_series()
    queries = [(f"{_where(panel)} query {target.get('refId')!r}", target.get("expr", ""))
               for panel in panels(dashboard) for target in panel.get("targets") or []]
    queries += [("a template variable", selector) for selector in variable_selectors(dashboard)]
    return [f"{where}: unknown series {found.metric or '(no name)'!r}"
            for where, expr in queries for found in selectors(expr) if found.metric not in known]


def topology_variables(dashboard: dict) -> list[str]:
    """$cluster and $namespace exist, take several values, and default to "All" as `.*`: Grafana's own
    "All" is a regex of the values it found, which outside Kubernetes (no such label) is none, and
    which never matches a series without the label."""
    problems = []
    for name in TOPOLOGY_VARIABLES:
        variable = variables(dashboard).get(name)
        if variable is None:
            problems.append(f"no template variable named {name!r}")
            continue
        if variable.get("type") != "query" or f"{name})" not in str(variable.get("query")):
            problems.append(f"variable {name!r} does not list the values of the label {name!r}")
        if not (variable.get("multi") and variable.get("includeAll")):
            problems.append(f"variable {name!r} cannot take several values or All")
        if variable.get("allValue") != ALL:
            problems.append(f"variable {name!r}: All is {variable.get('allValue')!r}, not {ALL!r}, so series "
                            "without the label are left out")
        if (variable.get("current") or {}).get("value") != ["$__all"]:
            problems.append(f"variable {name!r} defaults to {(variable.get('current') or {}).get('value')!r}, not All")
    return problems
