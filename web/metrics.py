"""The web app's Prometheus metrics, on its own `prometheus-client` registry (names: monitoring/names.py).

What the model answered is exported under the same names and labels as `digits serve`
(`digits_serving_predictions_total`, `digits_serving_prediction_confidence`), so the drift
rules and panels work when the model server is the TF Serving container, which has no such
metrics. The page's own traffic and people's feedback have `digits_web_*` names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from monitoring import names as n


def _base(name: str, suffix: str) -> str:
    """prometheus-client adds `_total` to counters itself: give it the name without."""
    assert name.endswith(suffix), name
    return name[: -len(suffix)]


class WebMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        # No `*_created` series: Prometheus would store each as one more series per label set.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(_base(n.WEB_REQUESTS, "_total"), "Requests to the web app's API, by outcome.",
                                ["endpoint", "outcome"], registry=self.registry)
        self.duration = Histogram(n.WEB_REQUEST_DURATION, "Time to answer an API request, model server included.",
                                  ["endpoint", "outcome"], buckets=n.WEB_LATENCY_BUCKETS_S, registry=self.registry)
        self.model_server_errors = Counter(_base(n.WEB_MODEL_SERVER_ERRORS, "_total"),
                                           "Calls to the model server that failed, by reason.", ["reason"],
                                           registry=self.registry)
        self.predictions = Counter(_base(n.PREDICTIONS, "_total"), "Answers, by predicted digit.",
                                   ["model_name", "model_version", n.CLASS_LABEL], registry=self.registry)
        self.confidence = Histogram(n.CONFIDENCE, "Probability of the predicted digit.",
                                    ["model_name", "model_version"], buckets=n.CONFIDENCE_BUCKETS,
                                    registry=self.registry)
        self.feedback = Counter(_base(n.WEB_FEEDBACK, "_total"),
                                "Answers people judged: right when predicted_class equals corrected_class.",
                                ["model_name", "model_version", n.CLASS_LABEL, n.CORRECTED_CLASS_LABEL],
                                registry=self.registry)

    def request(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.duration.labels(endpoint, outcome).observe(seconds)

    def prediction(self, model_name: str, version: int, digit: int, confidence: float) -> None:
        self.predictions.labels(model_name, str(version), str(digit)).inc()
        self.confidence.labels(model_name, str(version)).observe(confidence)

    def judged(self, model_name: str, version: int, predicted: int, corrected: int) -> None:
        self.feedback.labels(model_name, str(version), str(predicted), str(corrected)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
