"""Small clients the serving tests share: REST and gRPC predicts, status calls, and the metrics page parsed."""

from __future__ import annotations

import base64

import grpc
import requests
from prometheus_client.parser import text_string_to_metric_families

from data import contract


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def predict_rest(url: str, images: list[bytes], suffix: str = "", timeout: float = 60) -> requests.Response:
    return requests.post(f"{url}/v1/models/digits{suffix}:predict",
                         json={"instances": [b64(image) for image in images]}, timeout=timeout)


def predict_request(images: list[bytes], version: int | None = None, label: str | None = None):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs[contract.IMAGE_BYTES_INPUT].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def grpc_predict(target: str, images: list[bytes], version: int | None = None, label: str | None = None,
                 timeout: float = 60):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict_request(images, version, label), timeout=timeout)


def grpc_status(target: str, timeout: float = 30):
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "digits"
    with grpc.insecure_channel(target) as channel:
        return model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=timeout)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from the Prometheus page."""
    response = requests.get(f"{url}/monitoring/prometheus/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            # The parser names counter samples `<name>_total`; the page itself has TF Serving's `<name>`.
            name = family.name if family.type == "counter" else sample.name
            samples.setdefault(name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


class MetricsDelta:
    """What changed on the metrics page between construction and `take()`."""

    def __init__(self, url: str):
        self._url = url
        self.before = scrape(url)
        self.after: dict = {}

    def take(self) -> "MetricsDelta":
        self.after = scrape(self._url)
        return self

    def __call__(self, name: str, **labels) -> float:
        key = tuple(sorted(labels.items()))
        return self.after.get(name, {}).get(key, 0) - self.before.get(name, {}).get(key, 0)

    def total(self, name: str) -> float:
        """The change summed over all label sets."""
        return sum(self.after.get(name, {}).values()) - sum(self.before.get(name, {}).values())


def declaration_problems(page: str) -> list[str]:
    """Where a Prometheus page departs from monitoring/names.py's METRICS: a family not declared, another
    kind, other label names, or other histogram buckets. Empty when every family is exported as declared.

    Label names are compared as sets: prometheus-client writes them sorted, and Prometheus ignores the order.
    """
    from monitoring.names import METRICS

    problems: dict[str, None] = {}  # each problem once, in the page's order
    for family in text_string_to_metric_families(page):
        # The parser drops a counter's `_total` from the family name; TF Serving's counters have none.
        metric = METRICS.get(family.name) or METRICS.get(f"{family.name}_total")
        if metric is None:
            problems[f"{family.name}: not declared"] = None
            continue
        if family.type != metric.kind:
            problems[f"{metric.name}: a {family.type}, declared a {metric.kind}"] = None
        bounds = set()
        for sample in family.samples:
            labels = sorted(name for name in sample.labels if not (sample.name.endswith("_bucket") and name == "le"))
            if labels != sorted(metric.labels):
                problems[f"{sample.name}: labels {labels}, declared {metric.labels}"] = None
            if sample.name.endswith("_bucket"):
                bounds.add(_six_digits(float(sample.labels["le"])))
        declared = {*map(_six_digits, metric.buckets), float("inf")}
        if metric.kind == "histogram" and family.samples and bounds != declared:
            problems[f"{metric.name}: buckets {sorted(bounds)}, declared {sorted(declared)}"] = None
    return list(problems)


def _six_digits(bound: float) -> float:
    """A bucket bound as both exporters agree on it: TF Serving prints six significant digits."""
    return float(f"{bound:.6g}")
