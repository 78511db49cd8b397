"""What REST and gRPC share: resolving the model, running predict, recording metrics, status and metadata.

The front ends only translate their wire formats to numpy arrays and back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2

from data import contract
from serving.errors import ServingError
from serving.metrics import ServingMetrics
from serving.models import ModelManager, Servable, VersionStatus
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
    servable: Servable
    signature: Signature
    outputs: dict[str, np.ndarray]


class PredictionService:
    def __init__(self, manager: ModelManager, metrics: ServingMetrics):
        self.manager = manager
        self.metrics = metrics

    def predict(self, request: ModelRequest, signature_name: str,
                make_inputs: Callable[[Signature], dict[str, np.ndarray]],
                missing_signature: Callable[[str], ServingError]) -> Prediction:
        """Resolves the servable, builds the inputs for its signature and runs the model."""
        servable = self.manager.resolve(request.name, request.version, request.label)
        name = signature_name or contract.SERVING_SIGNATURE
        signature = servable.signatures.get(name)
        if signature is None:
            raise missing_signature(name)
        inputs = make_inputs(signature)
        started = time.perf_counter()
        outputs = servable.predict(signature, inputs)
        self.metrics.record_runtime(request.name, "Predict", time.perf_counter() - started)
        self._record_answers(request.name, servable.version, outputs)
        return Prediction(servable, signature, outputs)

    def record_request(self, model_name: str, status: str, api: str, entrypoint: str, seconds: float) -> None:
        """Counts a request under its model's name; names of models this server does not serve are
        counted as `unknown`, so that clients cannot grow the metric series without bound."""
        label = model_name if model_name in ("", self.manager.name) else UNKNOWN_MODEL
        self.metrics.record_request(label, status, api, entrypoint, seconds)

    def _record_answers(self, model_name: str, version: int, outputs: dict[str, np.ndarray]) -> None:
        probabilities = outputs.get(contract.PROBABILITIES_OUTPUT)
        if probabilities is None or probabilities.ndim != 2:
            return
        self.metrics.record_predictions(model_name, version, probabilities.argmax(axis=1), probabilities.max(axis=1))

    def statuses(self, request: ModelRequest) -> list[VersionStatus]:
        return self.manager.statuses(request.name, request.version, request.label)

    def signature_def_map(self, request: ModelRequest) -> tuple[Servable, get_model_metadata_pb2.SignatureDefMap]:
        servable = self.manager.resolve(request.name, request.version, request.label)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in servable.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature_def)
        return servable, signature_map


def status_json(statuses: list[VersionStatus]) -> dict:
    """GetModelStatusResponse as TF Serving prints it: versions as strings, newest first."""
    return {"model_version_status": [
        {"version": str(status.version), "state": status.state,
         "status": {"error_code": status.error_code, "error_message": status.error_message}}
        for status in statuses]}


def metadata_json(model_name: str, version: int, signature_map: get_model_metadata_pb2.SignatureDefMap) -> dict:
    """GetModelMetadataResponse as TF Serving's REST API prints it (yes, `signature_def` twice)."""
    return {
        "model_spec": {"name": model_name, "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": json_format.MessageToDict(
            signature_map, including_default_value_fields=True, preserving_proto_field_name=True)},
    }
