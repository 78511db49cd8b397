"""What REST and gRPC share: admission, resolving the model, running predict, recording metrics, status.

The front ends only translate their wire formats to numpy arrays and back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data import contract
from serving.batching import NO_CALLER, Caller
from serving.errors import ServingError
from serving.metrics import ServingMetrics
from serving.models import InFlight, ModelManager, Servable, VersionStatus
from serving.signature import Signature

UNKNOWN_MODEL = "unknown"  # the model_name label of requests for models that are not served


@dataclass(frozen=True)
class ModelRequest:
    """Which servable a request names (TF Serving's ModelSpec)."""

    name: str
    version: int | None = None
    label: str | None = None


@dataclass
class Prediction:
    version: int
    signature: Signature
    outputs: dict[str, np.ndarray]


class Admission:
    """The predict calls in flight, REST and gRPC together, up to `limit`; more are refused at once.

    Only predicts are counted: status and metadata requests are cheap, and health checks
    must be answered while the server is saturated.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._in_flight = InFlight()

    @property
    def in_flight(self) -> int:
        return self._in_flight.count

    def enter(self) -> None:
        if not self._in_flight.enter(self.limit):
            raise ServingError("RESOURCE_EXHAUSTED", f"too many requests in flight (limit {self.limit}); retry later")

    def leave(self) -> None:
        self._in_flight.leave()


class PredictionService:
    def __init__(self, manager: ModelManager, metrics: ServingMetrics, max_concurrent_requests: int):
        self.manager = manager
        self.metrics = metrics
        self.admission = Admission(max_concurrent_requests)

    def predict(self, request: ModelRequest, signature_name: str,
                make_inputs: Callable[[Signature], dict[str, np.ndarray]],
                missing_signature: Callable[[str], ServingError], caller: Caller = NO_CALLER) -> Prediction:
        """Resolves the servable, builds and checks the inputs for its signature and runs the model.

        Call inside `admission` (the front ends do, so that they can refuse before parsing).
        """
        with self.manager.lease(request.name, request.version, request.label) as servable:
            name = signature_name or contract.SERVING_SIGNATURE
            signature = servable.signatures.get(name)
            if signature is None:
                raise missing_signature(name)
            with servable.arrival(signature) as arrival:  # parsed and resolved: on its way to the batch queue
                inputs = make_inputs(signature)
                size = signature.check(inputs)
                started = time.perf_counter()
                outputs = servable.run(signature, inputs, size, caller, arrival)
            # TF Serving's runtime_latency: the session's Run only (with batching, the queue too), on success.
            self.metrics.record_runtime(request.name, "Predict", time.perf_counter() - started)
            self._record_answers(request.name, servable.version, outputs)
            return Prediction(servable.version, signature, outputs)

    def record_request(self, model_name: str, status: str, api: str, entrypoint: str, seconds: float) -> None:
        """Counts a request under its model's name; names of models this server does not serve are
        counted as `unknown`, so that clients cannot grow the metric series without bound."""
        label = model_name if model_name in ("", self.manager.name) else UNKNOWN_MODEL
        self.metrics.record_request(label, status, api, entrypoint, seconds)

    def _record_answers(self, model_name: str, version: int, outputs: dict[str, np.ndarray]) -> None:
        probabilities = outputs.get(contract.PROBABILITIES_OUTPUT)
        if probabilities is None or probabilities.ndim != 2:
            return
        decisions = outputs.get(contract.DECISION_OUTPUT)
        if decisions is not None and decisions.shape != probabilities.shape[:1]:
            decisions = None  # not a digits model's decision: the classes are still counted
        self.metrics.record_predictions(model_name, version, probabilities.argmax(axis=1), probabilities.max(axis=1),
                                        decisions)

    def statuses(self, request: ModelRequest) -> list[VersionStatus]:
        return self.manager.statuses(request.name, request.version, request.label)

    def servable(self, request: ModelRequest) -> Servable:
        """The servable a status-like request names (metadata), without holding it."""
        return self.manager.resolve(request.name, request.version, request.label)



def status_json(statuses: list[VersionStatus]) -> dict:
    """GetModelStatusResponse as TF Serving prints it: versions as strings, newest first."""
    return {"model_version_status": [
        {"version": str(status.version), "state": status.state,
         "status": {"error_code": status.error_code, "error_message": status.error_message}}
        for status in statuses]}
