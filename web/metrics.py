"""The web app's Prometheus metrics, on its own `prometheus-client` registry (names: monitoring/names.py).

What the model answered is exported under the same names and labels as `digits serve`
(`digits_serving_predictions_total`, `digits_serving_prediction_confidence`), so the drift
rules and panels work when the model server is the TF Serving container, which has no such
metrics. The page's own traffic and people's feedback have `digits_web_*` names. Every metric is
built from its declaration in `monitoring.names.METRICS` (kind, labels in order, buckets).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from components.reference import (
    CLASS_SHARE_KEY,
    CONFIDENCE_MEAN_KEY,
    CONFIDENCE_SHARE_KEY,
    DECISION_SHARE_KEY,
    EXAMPLES_KEY,
)
from data.contract import NUM_CLASSES
from monitoring import names as n


def _declared(name: str, documentation: str, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    """The prometheus-client metric `name` is declared as in monitoring/names.py, on `registry`."""
    metric = n.METRICS[name]
    if metric.kind == "counter":  # prometheus-client adds `_total` to counters itself: give it the name without
        assert name.endswith("_total"), name
        return Counter(name.removesuffix("_total"), documentation, metric.labels, registry=registry)
    if metric.kind == "histogram":
        return Histogram(name, documentation, metric.labels, buckets=metric.buckets, registry=registry)
    return Gauge(name, documentation, metric.labels, registry=registry)


class WebMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        # No `*_created` series: Prometheus would store each as one more series per label set.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = _declared(n.WEB_REQUESTS, "Requests to the web app's API, by outcome.", registry)
        self.duration = _declared(n.WEB_REQUEST_DURATION, "Time to answer an API request, model server included.",
                                  registry)
        self.model_server_errors = _declared(n.WEB_MODEL_SERVER_ERRORS,
                                             "Calls to the model server that failed, by reason.", registry)
        self.predictions = _declared(n.PREDICTIONS, "Answers, by predicted digit.", registry)
        self.decisions = _declared(n.DECISION_COUNT, "Answers, by the model's own verdict (accepted, unsure, "
                                                     "not a digit).", registry)
        self.confidence = _declared(n.CONFIDENCE, "Probability of the predicted digit.", registry)
        self.feedback = _declared(n.WEB_FEEDBACK,
                                  "Answers people judged: right when predicted_class equals corrected_class.", registry)
        self.pending = _declared(n.WEB_FEEDBACK_PENDING, "Corrections waiting for a reviewer before any training "
                                                         "run may use them.", registry)
        self.sheets = _declared(n.WEB_SHEETS, "Tally-form photos sent to /api/read-sheet, by verdict (unreadable: "
                                               "refused as no image or no form).", registry)
        self.sheet_counts = _declared(n.WEB_SHEET_COUNTS, "Counts of the sheets read, by whether a person must "
                                                          "look at them.", registry)
        self.sheet_check_failures = _declared(n.WEB_SHEET_CHECK_FAILURES, "Arithmetic checks that failed on "
                                                                          "counts read without doubt, by check.",
                                              registry)
        self.sheets_pending = _declared(n.WEB_SHEETS_PENDING, "Tally sheets waiting for a person on the review "
                                                              "page.", registry)
        self.sheet_oldest_pending = _declared(n.WEB_SHEET_OLDEST_PENDING, "When the oldest waiting sheet was "
                                                                          "queued (absent while none waits).", registry)
        self.sheet_reviews = _declared(n.WEB_SHEET_REVIEWS, "Sheets a person reviewed, by verdict.", registry)
        self._versions_seen: set[tuple[str, int]] = set()
        # The reference profile of each version that answered, read from --model-dir (what `digits serve`
        # exports itself): in front of the TF Serving container, the drift rules need it from here.
        self.reference_class_share = _declared(n.REFERENCE_CLASS_SHARE, "Share of each class on the eval split.",
                                               registry)
        self.reference_confidence_share = _declared(n.REFERENCE_CONFIDENCE_BUCKET_SHARE,
                                                    "Cumulative share of top-class confidence on the eval split.",
                                                    registry)
        self.reference_confidence_mean = _declared(n.REFERENCE_CONFIDENCE_MEAN,
                                                   "Mean top-class confidence on the eval split.", registry)
        self.reference_examples = _declared(n.REFERENCE_EXAMPLES, "Examples the reference profile was made from.",
                                            registry)
        self.reference_decision_share = _declared(n.REFERENCE_DECISION_SHARE,
                                                  "Share of each decision on the eval split.", registry)

    def request(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.duration.labels(endpoint, outcome).observe(seconds)

    def prediction(self, model_name: str, version: int, digit: int, confidence: float,
                   decision: str | None = None) -> None:
        self._first_sight(model_name, version)
        self.predictions.labels(model_name, str(version), str(digit)).inc()
        self.confidence.labels(model_name, str(version)).observe(confidence)
        if decision is not None:
            for value in n.DECISION_VALUES:  # every decision's series from the version's first verdict, at 0
                self.decisions.labels(model_name, str(version), value)
            self.decisions.labels(model_name, str(version), decision).inc()

    def judged(self, model_name: str, version: int, predicted: int, corrected: int) -> None:
        self._first_sight(model_name, version)
        self._feedback(model_name, version, predicted, corrected).inc()

    def declare_form(self, form: str, checks: list[str]) -> None:
        """Every series of the sheets of `form` (its name) at 0 from the start: rate() cannot see the
        increment that creates a series, and an inconsistent sheet is rare."""
        for outcome in n.SHEET_OUTCOMES:
            self.sheets.labels(form, outcome)
        for outcome in n.COUNT_OUTCOMES:
            self.sheet_counts.labels(form, outcome)
        for check in checks:
            self.sheet_check_failures.labels(form, check)
        for verdict in n.SHEET_REVIEW_VERDICTS:
            self.sheet_reviews.labels(form, verdict)
        self.sheets_pending.labels(form)

    def sheet_queue(self, form: str, pending: int, oldest: float | None) -> None:
        """The review queue as it is now (read from its directory at each scrape)."""
        self.sheets_pending.labels(form).set(pending)
        if oldest is None:
            try:
                self.sheet_oldest_pending.remove(form)
            except KeyError:  # absent already
                pass
        else:
            self.sheet_oldest_pending.labels(form).set(oldest)

    def sheet(self, form: str, outcome: str, counts: list[str] = (), failed_checks: list[str] = ()) -> None:
        """One sheet read (or refused: SHEET_UNREADABLE), the outcome of each of its counts, its failed checks."""
        unknown = {outcome, *counts} - {*n.SHEET_OUTCOMES, *n.COUNT_OUTCOMES}
        if unknown:
            raise ValueError(f"outcomes not declared in monitoring/names.py: {sorted(unknown)}")
        self.sheets.labels(form, outcome).inc()
        for count in counts:
            self.sheet_counts.labels(form, count).inc()
        for check in failed_checks:
            self.sheet_check_failures.labels(form, check).inc()

    def _feedback(self, model_name: str, version: int, predicted: int, corrected: int):
        verdict = n.VERDICT_RIGHT if predicted == corrected else n.VERDICT_CORRECTED
        return self.feedback.labels(model_name, str(version), str(predicted), str(corrected), verdict)

    def _first_sight(self, model_name: str, version: int) -> None:
        """Every series of a version's answers and feedback exists from its first answer on, at 0.

        rate() and increase() cannot see the increment that creates a series, and feedback is
        sparse: a (predicted, corrected) pair counted once would otherwise never show up in a rate.
        """
        if (model_name, version) in self._versions_seen:
            return
        self._versions_seen.add((model_name, version))
        for predicted in range(NUM_CLASSES):
            self.predictions.labels(model_name, str(version), str(predicted))
            for corrected in range(NUM_CLASSES):
                self._feedback(model_name, version, predicted, corrected)

    def set_reference(self, model_name: str, version: int, profile) -> None:
        labels = (model_name, str(version))
        for name, share in profile[CLASS_SHARE_KEY].items():
            self.reference_class_share.labels(*labels, name).set(share)
        for le, share in profile[CONFIDENCE_SHARE_KEY].items():
            self.reference_confidence_share.labels(*labels, le).set(share)
        self.reference_confidence_mean.labels(*labels).set(profile[CONFIDENCE_MEAN_KEY])
        self.reference_examples.labels(*labels).set(profile[EXAMPLES_KEY])
        for decision, share in profile.get(DECISION_SHARE_KEY, {}).items():
            self.reference_decision_share.labels(*labels, decision).set(share)

    def drop_reference(self, model_name: str, version: int, profile) -> None:
        """A version the model server no longer serves has no reference (no drift against a gone version)."""
        labels = (model_name, str(version))
        for name in profile[CLASS_SHARE_KEY]:
            self.reference_class_share.remove(*labels, name)
        for le in profile[CONFIDENCE_SHARE_KEY]:
            self.reference_confidence_share.remove(*labels, le)
        self.reference_confidence_mean.remove(*labels)
        self.reference_examples.remove(*labels)
        for decision in profile.get(DECISION_SHARE_KEY, {}):
            self.reference_decision_share.remove(*labels, decision)

    def render(self) -> bytes:
        return generate_latest(self.registry)
