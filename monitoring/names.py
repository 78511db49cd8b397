"""The names and numbers that serving, the web app, the Prometheus rules and the Grafana dashboards share.

One module owns them, and it imports nothing outside the standard library, so that the
dashboard generator (which runs in its own Python 3.11 tool environment, see
monitoring/grafana/generate.py) and the web app can import it without TensorFlow.

TF Serving exports TensorFlow monitoring metrics as `:tensorflow:serving:...` (every
non-alphanumeric character of `/tensorflow/serving/...` becomes ':'), with counters
*without* a `_total` suffix (its util/prometheus_exporter.cc).
"""

from __future__ import annotations

METRICS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's PrometheusExporter::kPrometheusPath
DEFAULT_MODEL_NAME = "digits"


def exponential_buckets(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TensorFlow monitoring's Buckets::Exponential: scale * growth**i for i in 0..count-1."""
    return tuple(scale * growth ** index for index in range(count))


def bucket_label(bound: float) -> str:
    """The `le` label of a bucket bound as TF Serving prints it (absl::StrCat: six significant digits)."""
    return f"{bound:.6g}"


LATENCY_BUCKETS_US = exponential_buckets(10, 1.8, 33)  # request, runtime and warmup latency (microseconds)
BATCH_SIZE_BUCKETS = exponential_buckets(1, 2, 14)  # batching_util.h: [1, 2, ..., 2^13] and +Inf
QUEUING_LATENCY_BUCKETS_US = exponential_buckets(100, 1.2, 52)  # batching_session.cc (~1 s)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)

# -- TF Serving's own metrics (the same in `digits serve` and the TF Serving container) -------------
REQUEST_COUNT = ":tensorflow:serving:request_count"  # {model_name, status}; REST status/metadata GETs too
REQUEST_LATENCY = ":tensorflow:serving:request_latency"  # {model_name, API, entrypoint}; successful requests only
RUNTIME_LATENCY = ":tensorflow:serving:runtime_latency"  # {model_name, API, runtime}
LOAD_ATTEMPT_COUNT = ":tensorflow:cc:saved_model:load_attempt_count"  # {model_path, status}
LOAD_LATENCY = ":tensorflow:cc:saved_model:load_latency"  # {model_path}, a counter of microseconds
WARMUP_LATENCY = ":tensorflow:serving:model_warmup_latency"
# Batching (batching_session.cc, batching_util.h): per request queued, per input tensor, per model call.
QUEUING_LATENCY = ":tensorflow:serving:batching_session:queuing_latency"  # {thread_pool_name}
INPUT_BATCH_SIZE = ":tensorflow:serving:batching_session:input_batch_size"
BATCH_SIZE = ":tensorflow:serving:batching_session:processed_batch_size"
PADDING_SIZE = ":tensorflow:serving:batching_session:padding_size"
WRAPPED_RUN_COUNT = ":tensorflow:serving:batching_session:wrapped_run_count"

# The API label of request_latency for a predict: TF Serving writes "predict" for REST and
# "Predict" for gRPC, so every query matches both.
PREDICT_APIS = ("predict", "Predict")
PREDICT_API_REGEX = "|".join(PREDICT_APIS)

# -- Ours: what the model answered (TF Serving has no view of it) ------------------------------------
# Exported by `digits serve` and, in front of the TF Serving container, by the web app's backend.
PREDICTIONS = "digits_serving_predictions_total"  # {model_name, model_version, predicted_class}
CONFIDENCE = "digits_serving_prediction_confidence"  # histogram {model_name, model_version}
LOADED_VERSIONS = "digits_serving_loaded_versions"  # gauge {model_name, model_version}
# The reference profile of each loaded version (written by the Trainer from the eval split).
REFERENCE_CLASS_SHARE = "digits_serving_reference_class_share"  # {model_name, model_version, class}
REFERENCE_CONFIDENCE_MEAN = "digits_serving_reference_confidence_mean"  # {model_name, model_version}
REFERENCE_CONFIDENCE_BUCKET_SHARE = "digits_serving_reference_confidence_share"  # {model_name, model_version, le}
REFERENCE_EXAMPLES = "digits_serving_reference_examples"  # {model_name, model_version}
CLASS_LABEL = "predicted_class"
REFERENCE_CLASS_LABEL = "class"

# -- The web app's backend (`digits web`, web/metrics.py) ---------------------------------------------
# Besides PREDICTIONS and CONFIDENCE above (same names and labels as `digits serve`, so the drift panels
# and rules work in front of the TF Serving container too), the page's own traffic and people's feedback.
WEB_REQUESTS = "digits_web_requests_total"  # {endpoint, outcome}
WEB_REQUEST_DURATION = "digits_web_request_duration_seconds"  # histogram {endpoint, outcome}
WEB_MODEL_SERVER_ERRORS = "digits_web_model_server_errors_total"  # {reason}
# One per answer a person judged: predicted_class == corrected_class is a "right", anything else a
# correction; `verdict` says which (PromQL cannot compare two labels), and online accuracy is the share
# of "right" among all.
WEB_FEEDBACK = "digits_web_feedback_total"  # {model_name, model_version, predicted_class, corrected_class, verdict}
CORRECTED_CLASS_LABEL = "corrected_class"
VERDICT_LABEL = "verdict"
VERDICT_RIGHT = "right"
VERDICT_CORRECTED = "corrected"
WEB_LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The web app's endpoints, the `endpoint` label of its request metrics.
WEB_PREDICT_ENDPOINT = "predict"
WEB_FEEDBACK_ENDPOINT = "feedback"

# -- Service level objectives (docs/runbook.md states them; the rules and dashboard use them) --
SLO_WINDOW = "30d"
AVAILABILITY_OBJECTIVE = 0.995  # predicts without a server-side error
LATENCY_OBJECTIVE = 0.99  # successful predicts faster than LATENCY_THRESHOLD_US
LATENCY_THRESHOLD_US = LATENCY_BUCKETS_US[16]  # 121,440 us: a bucket bound, so the ratio is counted, not interpolated
# Statuses that are the server's fault. Client errors (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
# OUT_OF_RANGE, UNIMPLEMENTED, CANCELLED by the client, ...) do not spend the error budget.
SERVER_ERROR_STATUSES = ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                         "DATA_LOSS", "ABORTED")
SERVER_ERROR_REGEX = "|".join(SERVER_ERROR_STATUSES)

# -- Prometheus jobs and recording rules (monitoring/prometheus/) ------------------------------------
SERVING_JOB = "digits-serving"
WEB_JOB = "digits-web"
PROMETHEUS_JOB = "prometheus"
ALERTMANAGER_JOB = "alertmanager"
