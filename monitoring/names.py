"""The names and numbers that serving, the web app, the Prometheus rules and the Grafana dashboards share.

One module owns them, and it imports nothing outside the standard library, so that the
dashboard generator (which runs in its own Python 3.11 tool environment, see
monitoring/grafana/generate.py) and the web app can import it without TensorFlow.

TF Serving exports TensorFlow monitoring metrics as `:tensorflow:serving:...` (every
non-alphanumeric character of `/tensorflow/serving/...` becomes ':'), with counters
*without* a `_total` suffix (its util/prometheus_exporter.cc).
"""

from __future__ import annotations

from dataclasses import dataclass

METRICS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's PrometheusExporter::kPrometheusPath
DEFAULT_MODEL_NAME = "digits"


def exponential_buckets(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TensorFlow monitoring's Buckets::Exponential: scale * growth**i for i in 0..count-1."""
    return tuple(scale * growth ** index for index in range(count))


def bucket_label(bound: float) -> str:
    """The `le` label of a bucket bound as TF Serving prints it (absl::StrCat: six significant digits)."""
    return f"{bound:.6g}"


def bucket_regex(bound: float) -> str:
    """A PromQL regex for the `le` label of a bucket bound in both spellings: TF Serving's and Prometheus 2's
    (`121440`) and Prometheus 3's, which stores classic-histogram bounds as floats (`121440.0`)."""
    label = bucket_label(bound)
    float_spelling = label if any(c in label for c in ".en") else f"{label}.0"
    return "|".join(dict.fromkeys(value.replace(".", "\\\\.") for value in (label, float_spelling)))


LATENCY_BUCKETS_US = exponential_buckets(10, 1.8, 33)  # request, runtime and warmup latency (microseconds)
BATCH_SIZE_BUCKETS = exponential_buckets(1, 2, 14)  # batching_util.h: [1, 2, ..., 2^13] and +Inf
QUEUING_LATENCY_BUCKETS_US = exponential_buckets(100, 1.2, 52)  # batching_session.cc (~1 s)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)

# -- Every metric, declared once with its labels (and buckets), as TF Serving's util.cc declares its own -----
# `digits serve` (serving/metrics.py) and the web app (web/metrics.py) check each sample they record
# against these declarations; the rules and dashboards select by these names and labels.


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter", "gauge" or "histogram"
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    # Whose metric it is: "tfserving" (TF Serving exports the same series; `_sum` printed with six
    # significant digits, as its exporter does) or "digits" (only this project exports it).
    origin: str = "digits"


METRICS: dict[str, Metric] = {}


def _declare(name: str, kind: str, labels: tuple[str, ...], buckets: tuple[float, ...] = (),
             origin: str = "digits") -> str:
    METRICS[name] = Metric(name, kind, labels, buckets, origin)
    return name


def _tfserving(name: str, kind: str, labels: tuple[str, ...], buckets: tuple[float, ...] = ()) -> str:
    return _declare(name, kind, labels, buckets, origin="tfserving")


# -- TF Serving's own metrics (the same in `digits serve` and the TF Serving container) -------------
# Born at their first increment: a counter series appears with value 1 (or the first observation),
# so rate()/increase() over it read 0 for that first event (monitoring/rules.py copes).
REQUEST_COUNT = _tfserving(":tensorflow:serving:request_count", "counter", ("model_name", "status"))
# REST status/metadata GETs are counted in REQUEST_COUNT too; REQUEST_LATENCY has successful requests only.
REQUEST_LATENCY = _tfserving(":tensorflow:serving:request_latency", "histogram",
                             ("model_name", "API", "entrypoint"), LATENCY_BUCKETS_US)
RUNTIME_LATENCY = _tfserving(":tensorflow:serving:runtime_latency", "histogram", ("model_name", "API", "runtime"),
                             LATENCY_BUCKETS_US)
LOAD_ATTEMPT_COUNT = _tfserving(":tensorflow:cc:saved_model:load_attempt_count", "counter", ("model_path", "status"))
LOAD_LATENCY = _tfserving(":tensorflow:cc:saved_model:load_latency", "counter", ("model_path",))  # microseconds
WARMUP_LATENCY = _tfserving(":tensorflow:serving:model_warmup_latency", "histogram", ("model_path", "status"),
                            LATENCY_BUCKETS_US)
LOAD_STATUS_SUCCESS = "success"  # the status label of LOAD_ATTEMPT_COUNT (TF Serving's loader_harness)
LOAD_STATUS_FAIL = "fail"
# Batching (batching_session.cc, batching_util.h): per request queued, per input tensor, per model call.
QUEUING_LATENCY = _tfserving(":tensorflow:serving:batching_session:queuing_latency", "histogram",
                             ("thread_pool_name",), QUEUING_LATENCY_BUCKETS_US)
INPUT_BATCH_SIZE = _tfserving(":tensorflow:serving:batching_session:input_batch_size", "histogram", (),
                              BATCH_SIZE_BUCKETS)
BATCH_SIZE = _tfserving(":tensorflow:serving:batching_session:processed_batch_size", "histogram", (),
                        BATCH_SIZE_BUCKETS)
PADDING_SIZE = _tfserving(":tensorflow:serving:batching_session:padding_size", "histogram",
                          ("execution_batch_size",), BATCH_SIZE_BUCKETS)
WRAPPED_RUN_COUNT = _tfserving(":tensorflow:serving:batching_session:wrapped_run_count", "counter", ())

# The API label of request_latency for a predict: TF Serving writes "predict" for REST and
# "Predict" for gRPC, so every query matches both.
PREDICT_APIS = ("predict", "Predict")
PREDICT_API_REGEX = "|".join(PREDICT_APIS)

# -- Ours: what the model answered (TF Serving has no view of it) ------------------------------------
# Exported by `digits serve` and, in front of the TF Serving container, by the web app's backend.
CLASS_LABEL = "predicted_class"
REFERENCE_CLASS_LABEL = "class"
PREDICTIONS = _declare("digits_serving_predictions_total", "counter", ("model_name", "model_version", CLASS_LABEL))
CONFIDENCE = _declare("digits_serving_prediction_confidence", "histogram", ("model_name", "model_version"),
                      CONFIDENCE_BUCKETS)
# The model's own verdict on each answer (components/abstention.py): `decision` is one of DECISION_VALUES
# (data/contract.py's DECISIONS). Every decision's series of a version exists, at 0, from its first answer.
DECISION_LABEL = "decision"
DECISION_VALUES = ("accepted", "unsure", "not_a_digit")
DECISION_COUNT = _declare("digits_serving_decisions_total", "counter", ("model_name", "model_version", DECISION_LABEL))
LOADED_VERSIONS = _declare("digits_serving_loaded_versions", "gauge", ("model_name", "model_version"))
# The state of every version `digits serve` knows, as TF Serving's GetModelStatus reports it: 1 on the
# version's current (state, error_code); a version that failed to load is state END with its error code.
# Unlike LOAD_ATTEMPT_COUNT it is there from the first failure, and it stays while the version stays failed.
VERSION_STATE = _declare("digits_serving_model_version_state", "gauge",
                         ("model_name", "model_version", "state", "error_code"))
VERSION_STATES = ("START", "LOADING", "AVAILABLE", "UNLOADING", "END")  # ModelVersionStatus.State
# Requests refused before a handler ever saw them (a body too large, or one that stalled): the client's
# doing, and never counted in REQUEST_COUNT (TF Serving's gRPC transport refuses an over-size message
# the same way, before its handler counts anything).
REFUSED_REQUESTS = _declare("digits_serving_refused_requests_total", "counter", ("reason",))
REFUSED_BODY_TOO_LARGE = "body_too_large"
REFUSED_BODY_TIMEOUT = "body_timeout"
# The reference profile of each loaded version (written by the Trainer from the eval split).
REFERENCE_CLASS_SHARE = _declare("digits_serving_reference_class_share", "gauge",
                                 ("model_name", "model_version", REFERENCE_CLASS_LABEL))
REFERENCE_CONFIDENCE_MEAN = _declare("digits_serving_reference_confidence_mean", "gauge",
                                     ("model_name", "model_version"))
REFERENCE_CONFIDENCE_BUCKET_SHARE = _declare("digits_serving_reference_confidence_share", "gauge",
                                             ("model_name", "model_version", "le"))
REFERENCE_EXAMPLES = _declare("digits_serving_reference_examples", "gauge", ("model_name", "model_version"))
# The share of each decision on the eval split (models without abstention outputs have none).
REFERENCE_DECISION_SHARE = _declare("digits_serving_reference_decision_share", "gauge",
                                    ("model_name", "model_version", DECISION_LABEL))

# -- The web app's backend (`digits web`, web/metrics.py) ---------------------------------------------
# Besides PREDICTIONS and CONFIDENCE above (same names and labels as `digits serve`, so the drift panels
# and rules work in front of the TF Serving container too), the page's own traffic and people's feedback.
CORRECTED_CLASS_LABEL = "corrected_class"
VERDICT_LABEL = "verdict"
VERDICT_RIGHT = "right"
VERDICT_CORRECTED = "corrected"
WEB_LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WEB_REQUESTS = _declare("digits_web_requests_total", "counter", ("endpoint", "outcome"))
WEB_REQUEST_DURATION = _declare("digits_web_request_duration_seconds", "histogram", ("endpoint", "outcome"),
                                WEB_LATENCY_BUCKETS_S)
WEB_MODEL_SERVER_ERRORS = _declare("digits_web_model_server_errors_total", "counter", ("reason",))
# One per answer a person judged: predicted_class == corrected_class is a "right", anything else a
# correction; `verdict` says which (PromQL cannot compare two labels), and online accuracy is the share
# of "right" among all.
WEB_FEEDBACK = _declare("digits_web_feedback_total", "counter",
                        ("model_name", "model_version", CLASS_LABEL, CORRECTED_CLASS_LABEL, VERDICT_LABEL))
# Corrections waiting for a reviewer (web/feedback.py), read from the feedback directory at each
# scrape, so reviews made with `digits feedback review` in another process count too.
WEB_FEEDBACK_PENDING = _declare("digits_web_feedback_pending", "gauge", ())
# The web app's endpoints, the `endpoint` label of its request metrics.
WEB_PREDICT_ENDPOINT = "predict"
WEB_FEEDBACK_ENDPOINT = "feedback"
WEB_REVIEW_ENDPOINT = "review"  # the reviewers' API, behind a token
WEB_READ_SHEET_ENDPOINT = "read_sheet"  # a photo of a tally form (forms/): every count read and checked
# Sheets read through POST /api/read-sheet. `form` is the name of the form `digits web --form` serves (one
# per process: bounded); every series of the form exists from the start, at 0.
FORM_LABEL = "form"
CHECK_LABEL = "check"  # the name of one of the form's arithmetic checks, as its description gives it
SHEET_ACCEPTED = "accepted"  # every count read without doubt and every check holds: no person needed
SHEET_NEEDS_REVIEW = "needs_review"  # a count the model is unsure of (or a check that cannot be made)
SHEET_INCONSISTENT = "inconsistent"  # counts read without doubt that do not add up as the form says
SHEET_UNREADABLE = "unreadable"  # not an image, too large, not the form, or its boxes not found (a 4xx)
SHEET_OUTCOMES = (SHEET_ACCEPTED, SHEET_NEEDS_REVIEW, SHEET_INCONSISTENT, SHEET_UNREADABLE)
COUNT_ACCEPTED = "accepted"  # read from boxes the model stood by
COUNT_NEEDS_REVIEW = "needs_review"  # a value read, but a box the model was unsure of
COUNT_UNREAD = "unread"  # no value without a person (an empty count, a box that is not a digit)
COUNT_OUTCOMES = (COUNT_ACCEPTED, COUNT_NEEDS_REVIEW, COUNT_UNREAD)
WEB_SHEETS = _declare("digits_web_sheets_read_total", "counter", (FORM_LABEL, "outcome"))
WEB_SHEET_COUNTS = _declare("digits_web_sheet_counts_read_total", "counter", (FORM_LABEL, "outcome"))
WEB_SHEET_CHECK_FAILURES = _declare("digits_web_sheet_check_failures_total", "counter", (FORM_LABEL, CHECK_LABEL))
# The sheets review queue (web/sheet_queue.py): a sheet that is not accepted waits for a person, who confirms
# or corrects its boxes. Both gauges are read from the queue's directory at each scrape (a reviewer in another
# process counts too); the oldest sheet's time is absent while nothing waits.
SHEET_CONFIRMED = "confirmed"  # a person confirmed (or corrected) every box: the counts are the person's
SHEET_REJECTED = "rejected"  # a person said the photo cannot be read as the form: nothing is counted from it
SHEET_REVIEW_VERDICTS = (SHEET_CONFIRMED, SHEET_REJECTED)
WEB_SHEETS_PENDING = _declare("digits_web_sheets_pending_review", "gauge", (FORM_LABEL,))
WEB_SHEET_OLDEST_PENDING = _declare("digits_web_sheet_oldest_pending_timestamp_seconds", "gauge", (FORM_LABEL,))
WEB_SHEET_REVIEWS = _declare("digits_web_sheet_reviews_total", "counter", (FORM_LABEL, VERDICT_LABEL))
WEB_SHEETS_ENDPOINT = "sheets"  # the sheet reviewers' API, behind the review token

# -- The blackbox exporter's probes (monitoring/blackbox/blackbox.yml) ----------------------------------
# The one signal that sees requests that never arrive: a real predict of a known digit through REST
# (answer checked), and a gRPC health check. Series: probe_success{job, instance=<target>, module}.
PROBE_SUCCESS = "probe_success"
PROBE_DURATION = "probe_duration_seconds"
PROBE_PREDICT_MODULE = "digits_predict"  # an HTTP POST of a known digit; the answer must name it
PROBE_GRPC_MODULE = "grpc_health"  # grpc.health.v1 Check of the model server's gRPC port
PROBE_MODULES = (PROBE_PREDICT_MODULE, PROBE_GRPC_MODULE)
PROBE_DIGIT = 7  # the digit the predict probe sends (monitoring/blackbox/probe_digit.json)

# -- Service level objectives: data, as Sloth and Pyrra describe them ---------------------------------
# monitoring/rules.py derives the recorded SLIs, the budgets and the burn-rate alerts from these, and
# the Grafana generator the budget panels; docs/runbook.md states them.


@dataclass(frozen=True)
class BurnRateWindow:
    long: str
    short: str
    factor: float  # how many times faster than "exactly exhausts the budget in the SLO window"
    severity: str
    for_: str


# Google SRE workbook, chapter 5: 2 % of the budget in 1 h or 5 % in 6 h pages; 10 % in 3 days tickets.
BURN_RATE_WINDOWS = (
    BurnRateWindow("1h", "5m", 14.4, "critical", "2m"),
    BurnRateWindow("6h", "30m", 6, "critical", "15m"),
    BurnRateWindow("1d", "2h", 3, "warning", "1h"),
    BurnRateWindow("3d", "6h", 1, "warning", "3h"),
)


@dataclass(frozen=True)
class SLO:
    name: str  # "availability": the recorded series are job_model:digits_slo_<bad>:ratio_rate<window>
    objective: float  # the share of good events over `window`
    bad: str  # the recorded name of a bad event ("errors", "slow")
    good_means: str  # what a good event is, for people (runbook, dashboard, alert descriptions)
    bad_means: str  # what a bad event is, in the alert's description
    window: str = "30d"
    burn_rate_windows: tuple[BurnRateWindow, ...] = BURN_RATE_WINDOWS

    @property
    def budget(self) -> float:
        """The share of events that may be bad over the window."""
        return round(1 - self.objective, 6)


# Statuses per whose fault they are, decided from what TF Serving answers for the same request:
# - the server's: spend the availability budget;
# - the client's (INVALID_ARGUMENT, NOT_FOUND, ...): do not. NOT_FOUND is what TF Serving answers for a
#   model or version the client names wrongly *and* for the served model when no version is loaded; a
#   status cannot tell them apart, so a stranger's requests for version 999 must not page. The served
#   model missing is the service's outage and pages from signals that can tell: the predict probe, no
#   version loaded (`digits serve`), predicts that are all NOT_FOUND with none answered, no ready replica;
# - abandoned (CANCELLED: the client gave up, usually on a slow answer): spends the *latency* budget,
#   since TF Serving runs such requests to completion and counts them as (slow) successes;
# - refused before any handler (a body too large, one that stalled): not in REQUEST_COUNT at all
#   (REFUSED_REQUESTS), as TF Serving's gRPC transport refuses an over-size message before counting it.
SERVER_ERROR_STATUSES = ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                         "DATA_LOSS", "ABORTED")
CLIENT_ERROR_STATUSES = ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
                         "FAILED_PRECONDITION", "OUT_OF_RANGE", "UNIMPLEMENTED", "UNAUTHENTICATED")
ABANDONED_STATUSES = ("CANCELLED",)
SERVER_ERROR_REGEX = "|".join(SERVER_ERROR_STATUSES)
ABANDONED_REGEX = "|".join(ABANDONED_STATUSES)
CLIENT_ERROR_REGEX = "|".join(CLIENT_ERROR_STATUSES)
NOT_FOUND = "NOT_FOUND"

LATENCY_THRESHOLD_US = LATENCY_BUCKETS_US[16]  # 121,440 us: a bucket bound, so the ratio is counted, not interpolated
AVAILABILITY = SLO("availability", 0.995, "errors",
                   "predicts without a server-side error", "failed on the server")
LATENCY = SLO("latency", 0.99, "slow",
              f"predicts answered successfully within {LATENCY_THRESHOLD_US / 1000:.0f} ms",
              "were slower than the latency threshold or abandoned by the client")
SLOS = (AVAILABILITY, LATENCY)
SLO_WINDOW = AVAILABILITY.window
AVAILABILITY_OBJECTIVE = AVAILABILITY.objective
LATENCY_OBJECTIVE = LATENCY.objective

# -- Prometheus jobs and recording rules (monitoring/prometheus/) ------------------------------------
SERVING_JOB = "digits-serving"
WEB_JOB = "digits-web"
PROMETHEUS_JOB = "prometheus"
ALERTMANAGER_JOB = "alertmanager"
PROBE_JOB = "digits-probe"  # the blackbox exporter's probes of the model server
BLACKBOX_JOB = "blackbox-exporter"  # the blackbox exporter's own metrics

# How series of one service are told apart where several run: Kubernetes namespaces (the Prometheus
# Operator's PodMonitor adds `namespace`), and `cluster` when Prometheus's external labels or a
# federation add it. Every SLI and alert aggregates by these; absent labels group as one.
TOPOLOGY_LABELS = ("cluster", "namespace")
