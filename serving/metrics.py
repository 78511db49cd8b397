"""Prometheus metrics under TF Serving's own names, plus prediction-drift metrics it lacks.

The names live in monitoring/names.py (shared with the web app, rules and dashboards), each
declared there once with its kind, labels and buckets (`METRICS`); every sample recorded here is
checked against its declaration, and a mismatch raises `UndeclaredSample` (a programming error).
TF Serving exports counters *without* a `_total` suffix and only `# TYPE` lines (its
util/prometheus_exporter.cc). prometheus_client always appends `_total` to
counters, which would break every dashboard and alert written against the real
server, so this module renders the text format itself; tests parse it back with
prometheus_client's parser.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Mapping

from components.reference import (
    CLASS_SHARE_KEY,
    CONFIDENCE_MEAN_KEY,
    CONFIDENCE_SHARE_KEY,
    DECISION_SHARE_KEY,
    EXAMPLES_KEY,
)
from monitoring.names import (  # noqa: F401  (re-exported: serving's code and tests read them from here)
    BATCH_SIZE,
    BATCH_SIZE_BUCKETS,
    CONFIDENCE,
    CONFIDENCE_BUCKETS,
    DECISION_COUNT,
    DECISION_LABEL,
    DECISION_VALUES,
    INPUT_BATCH_SIZE,
    LATENCY_BUCKETS_US,
    LOAD_ATTEMPT_COUNT,
    LOAD_LATENCY,
    LOAD_STATUS_FAIL,
    LOAD_STATUS_SUCCESS,
    LOADED_VERSIONS,
    METRICS,
    METRICS_PATH,
    PADDING_SIZE,
    PREDICTIONS,
    QUEUING_LATENCY,
    QUEUING_LATENCY_BUCKETS_US,
    REFERENCE_CLASS_LABEL,
    REFERENCE_CLASS_SHARE,
    REFERENCE_CONFIDENCE_BUCKET_SHARE,
    REFERENCE_CONFIDENCE_MEAN,
    REFERENCE_DECISION_SHARE,
    REFERENCE_EXAMPLES,
    REFUSED_BODY_TIMEOUT,
    REFUSED_BODY_TOO_LARGE,
    REFUSED_REQUESTS,
    REQUEST_COUNT,
    REQUEST_LATENCY,
    RUNTIME_LATENCY,
    VERSION_STATE,
    WARMUP_LATENCY,
    WRAPPED_RUN_COUNT,
    bucket_label,
)

CONTENT_TYPE = "text/plain"  # what TF Serving sends

# The thread_pool_name label of queuing_latency: the model server creates its batching sessions
# with an empty name (CreateBatchingSession in batching_session.cc).
BATCH_THREAD_POOL = ""
RUNTIME = "TF1"  # TF Serving's runtime label for SavedModels it runs through a Session


class UndeclaredSample(ValueError):
    """A sample that does not match its metric's declaration in monitoring/names.py: a bug in the caller."""


def _declared(name: str, kind: str, labels: tuple[str, ...]) -> tuple[float, ...]:
    """Checks a sample's metric, kind and label names (in order) against METRICS; its declared buckets."""
    metric = METRICS.get(name)
    if metric is None:
        raise UndeclaredSample(f"{name} is not declared in monitoring/names.py")
    if (metric.kind, metric.labels) != (kind, labels):
        raise UndeclaredSample(f"{name} is declared a {metric.kind} with labels {metric.labels}, "
                               f"recorded as a {kind} with labels {labels}")
    return metric.buckets


class _Histogram:
    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


class ServingMetrics:
    """Thread-safe metric store; `render()` gives the Prometheus text exposition."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[tuple, _Histogram]] = defaultdict(dict)
        self._labels: dict[str, tuple[str, ...]] = {}

    def _count(self, name: str, labels: tuple[tuple[str, str], ...], amount: float = 1) -> None:
        label_names = tuple(key for key, _ in labels)
        _declared(name, "counter", label_names)
        self._labels[name] = label_names
        self._counters[name][tuple(value for _, value in labels)] += amount

    def _observe(self, name: str, labels: tuple[tuple[str, str], ...], value: float):
        """One observation into a histogram, with the buckets its declaration gives."""
        label_names = tuple(key for key, _ in labels)
        bounds = _declared(name, "histogram", label_names)
        self._labels[name] = label_names
        key = tuple(value for _, value in labels)
        histogram = self._histograms[name].get(key)
        if histogram is None:
            histogram = self._histograms[name][key] = _Histogram(bounds)
        histogram.observe(value)

    # -- what the server records -----------------------------------------------------------

    def record_request(self, model_name: str, status: str, api: str, entrypoint: str, latency_s: float) -> None:
        """One request: counted always, its latency only when it succeeded (as TF Serving does)."""
        with self._lock:
            self._count(REQUEST_COUNT, (("model_name", model_name), ("status", status)))
            if status == "OK":
                self._observe(REQUEST_LATENCY, (("model_name", model_name), ("API", api), ("entrypoint", entrypoint)),
                              latency_s * 1e6)

    def record_runtime(self, model_name: str, api: str, latency_s: float) -> None:
        """Time inside the model call for one request (batched calls: the whole batch's call)."""
        with self._lock:
            self._observe(RUNTIME_LATENCY, (("model_name", model_name), ("API", api), ("runtime", RUNTIME)),
                          latency_s * 1e6)

    def record_load(self, model_path: str, ok: bool, seconds: float, warmup_seconds: float | None = None) -> None:
        with self._lock:
            self._count(LOAD_ATTEMPT_COUNT,
                        (("model_path", model_path), ("status", LOAD_STATUS_SUCCESS if ok else LOAD_STATUS_FAIL)))
            self._count(LOAD_LATENCY, (("model_path", model_path),), seconds * 1e6)
            if warmup_seconds is not None:
                self._observe(WARMUP_LATENCY, (("model_path", model_path), ("status", "OK")), warmup_seconds * 1e6)

    def record_batching(self, stats) -> None:
        """What the batcher reports (serving.batching.BatchStats), under TF Serving's names and meanings:
        the queueing time of every request taken off a queue (dropped ones too), the size of each
        request's input tensors, and the padded size, padding and count of each model call."""
        with self._lock:
            for seconds in stats.queued_s:
                self._observe(QUEUING_LATENCY, (("thread_pool_name", BATCH_THREAD_POOL),), seconds * 1e6)
            for size in stats.input_sizes:
                self._observe(INPUT_BATCH_SIZE, (), size)
            if stats.batch_size is not None:
                self._observe(BATCH_SIZE, (), stats.batch_size)
                self._observe(PADDING_SIZE, (("execution_batch_size", str(stats.batch_size)),), stats.padding)
                self._count(WRAPPED_RUN_COUNT, ())

    def record_predictions(self, model_name: str, version: int, classes, confidences, decisions=None) -> None:
        """What the model answered: one count per predicted class and the top-class probability, and per
        decision code (contract.DECISIONS) of a model that decides."""
        with self._lock:
            if decisions is not None:
                model = (("model_name", model_name), ("model_version", str(version)))
                for value in DECISION_VALUES:  # every decision's series from the version's first answer, at 0
                    self._count(DECISION_COUNT, (*model, (DECISION_LABEL, value)), amount=0)
                for code in decisions:
                    self._count(DECISION_COUNT, (*model, (DECISION_LABEL, DECISION_VALUES[int(code)])))
            for predicted, confidence in zip(classes, confidences):
                self._count(PREDICTIONS, (("model_name", model_name), ("model_version", str(version)),
                                          ("predicted_class", str(int(predicted)))))
                self._observe(CONFIDENCE, (("model_name", model_name), ("model_version", str(version))),
                              float(confidence))

    def record_refused(self, reason: str) -> None:
        """A request refused before any handler saw it (REFUSED_BODY_TOO_LARGE, REFUSED_BODY_TIMEOUT): the
        client's doing, counted here and never in request_count."""
        with self._lock:
            self._count(REFUSED_REQUESTS, (("reason", reason),))

    def set_loaded_versions(self, model_name: str, versions: list[int]) -> None:
        with self._lock:
            self._set_gauge(LOADED_VERSIONS, ("model_name", "model_version"),
                            {(model_name, str(version)): 1 for version in versions})

    def set_version_states(self, model_name: str, states: list[tuple[int, str, str]]) -> None:
        """(version, state, error_code) of every version the server knows, as GetModelStatus reports them."""
        with self._lock:
            self._set_gauge(VERSION_STATE, ("model_name", "model_version", "state", "error_code"),
                            {(model_name, str(version), state, error_code): 1 for version, state, error_code in states})

    def set_reference_profiles(self, model_name: str, profiles: Mapping[int, Mapping]) -> None:
        """The reference profile of each loaded version that has one (components/reference.py), as gauges.

        Replaces all reference gauges: a version left out (unloaded, or without a valid profile)
        has none, so a drift query never compares live traffic with a version that is gone.
        """
        class_share, confidence_mean, confidence_share, examples, decision_share = {}, {}, {}, {}, {}
        for version, profile in profiles.items():
            model = (model_name, str(version))
            for name, share in profile[CLASS_SHARE_KEY].items():
                class_share[(*model, name)] = share
            for le, share in profile[CONFIDENCE_SHARE_KEY].items():
                confidence_share[(*model, le)] = share
            confidence_mean[model] = profile[CONFIDENCE_MEAN_KEY]
            examples[model] = profile[EXAMPLES_KEY]
            for decision, share in profile.get(DECISION_SHARE_KEY, {}).items():
                decision_share[(*model, decision)] = share
        with self._lock:
            self._set_gauge(REFERENCE_CLASS_SHARE, ("model_name", "model_version", REFERENCE_CLASS_LABEL), class_share)
            self._set_gauge(REFERENCE_CONFIDENCE_BUCKET_SHARE, ("model_name", "model_version", "le"), confidence_share)
            self._set_gauge(REFERENCE_CONFIDENCE_MEAN, ("model_name", "model_version"), confidence_mean)
            self._set_gauge(REFERENCE_EXAMPLES, ("model_name", "model_version"), examples)
            self._set_gauge(REFERENCE_DECISION_SHARE, ("model_name", "model_version", DECISION_LABEL), decision_share)

    def _set_gauge(self, name: str, labels: tuple[str, ...], samples: dict[tuple, float]) -> None:
        """All samples of a gauge at once; with none, the gauge leaves the page (no empty family)."""
        _declared(name, "gauge", labels)
        self._labels[name] = labels
        if samples:
            self._gauges[name] = samples
        else:
            self._gauges.pop(name, None)

    # -- exposition --------------------------------------------------------------------------

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name in sorted(self._counters):
                lines.append(f"# TYPE {name} counter")
                for key, value in sorted(self._counters[name].items()):
                    lines.append(f"{name}{_labels(self._labels[name], key)} {_number(value)}")
            for name in sorted(self._gauges):
                lines.append(f"# TYPE {name} gauge")
                for key, value in sorted(self._gauges[name].items()):
                    lines.append(f"{name}{_labels(self._labels[name], key)} {_number(value)}")
            for name in sorted(self._histograms):
                lines.append(f"# TYPE {name} histogram")
                for key, histogram in sorted(self._histograms[name].items()):
                    cumulative = 0
                    for bound, count in zip([*histogram.bounds, None], histogram.counts):
                        cumulative += count
                        le = "+Inf" if bound is None else bucket_label(bound)
                        lines.append(f"{name}_bucket{_labels(self._labels[name], key, le)} {cumulative}")
                    lines.append(f"{name}_sum{_labels(self._labels[name], key)} {_sum(name, histogram.total)}")
                    lines.append(f"{name}_count{_labels(self._labels[name], key)} {histogram.count}")
        return "\n".join(lines) + "\n"


def _labels(names: tuple[str, ...], values: tuple, le: str | None = None) -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if le is not None:
        pairs.append(f'le="{le}"')
    return "{" + ",".join(pairs) + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sum(name: str, total: float) -> str:
    """A histogram's `_sum` as its exporter prints it: TF Serving's with six significant digits (absl::StrCat
    of a double, util/prometheus_exporter.cc); ours at full precision, so that rate(sum)/rate(count) in
    the rules stays exact on a long-lived server."""
    return f"{total:.6g}" if METRICS[name].origin == "tfserving" else repr(total)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
