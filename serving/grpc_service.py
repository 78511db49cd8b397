"""TF Serving's gRPC API: PredictionService (Predict, GetModelMetadata) and ModelService (GetModelStatus).

Built on the servicer bases generated from `tensorflow-serving-api`'s protos, so the
official stubs (`prediction_service_pb2_grpc.PredictionServiceStub`) work unchanged.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from serving.config import ServerConfig
from serving.errors import ServingError, invalid_argument
from serving.service import ModelRequest, PredictionService

SIGNATURE_DEF_FIELD = "signature_def"
_ERROR_CODES = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type  # tensorflow.error.Code


def make_server(config: ServerConfig, service: PredictionService) -> tuple[grpc.Server, int]:
    """A started-ready (not started) server and the port it bound."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.max_concurrent_requests, thread_name_prefix="grpc"),
        # Beyond the limit, calls get RESOURCE_EXHAUSTED at once instead of queueing without bound.
        maximum_concurrent_rpcs=config.max_concurrent_requests,
        options=[("grpc.max_receive_message_length", config.max_body_bytes),
                 ("grpc.so_reuseport", 0)],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionServicer(service, max_elements=config.max_body_bytes), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(service), server)
    port = server.add_insecure_port(f"{config.host}:{config.grpc_port}")
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {config.host}:{config.grpc_port}")
    return server, port


def _model_request(spec) -> ModelRequest:
    if not spec.name:
        raise invalid_argument("ModelSpec has no name specified.")
    if spec.HasField("version") and spec.version_label:
        raise invalid_argument(f"Both model version ({spec.version.value}) and model version label "
                               f"({spec.version_label}) cannot be supplied.")
    return ModelRequest(spec.name, spec.version.value if spec.HasField("version") else None,
                        spec.version_label or None)


def _abort(context: grpc.ServicerContext, error: ServingError):
    context.abort(error.grpc_status, error.message)


def _ndarray(alias: str, tensor, max_elements: int) -> np.ndarray:
    """A TensorProto -> numpy, refusing shapes it cannot hold before make_ndarray allocates them.

    make_ndarray fills a shape larger than the values sent by repeating the last value, so a
    few-byte TensorProto claiming [10**12] would take the server's memory.
    """
    dims = [dim.size for dim in tensor.tensor_shape.dim]
    if any(size < 0 for size in dims):
        raise invalid_argument(f"input {alias}: the TensorProto has a negative dimension in shape {dims}")
    elements = math.prod(dims)
    if elements > max_elements:
        raise invalid_argument(f"input {alias}: the TensorProto's shape {dims} has {elements} elements; "
                               f"a request may hold at most {max_elements}")
    try:
        return tf.make_ndarray(tensor)
    except (TypeError, ValueError) as error:
        raise invalid_argument(f"input {alias}: the TensorProto cannot be read: {error}") from None


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, service: PredictionService, max_elements: int):
        self._service = service
        self._max_elements = max_elements  # per input tensor; one per byte of the largest message

    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        started = time.perf_counter()
        name = request.model_spec.name
        try:
            with self._service.manager.arrivals.tracking():
                response = self._predict(request)
        except ServingError as error:
            self._service.record_request(name, error.code, "Predict", "GRPC", time.perf_counter() - started)
            _abort(context, error)
        self._service.record_request(name, "OK", "Predict", "GRPC", time.perf_counter() - started)
        return response

    def _predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        model = _model_request(request.model_spec)

        def inputs(signature):
            return {alias: _ndarray(alias, tensor, self._max_elements) for alias, tensor in request.inputs.items()}

        prediction = self._service.predict(
            model, request.model_spec.signature_name, inputs,
            missing_signature=lambda name: ServingError("FAILED_PRECONDITION",
                                                        f'Serving signature key "{name}" not found.'))
        wanted = list(request.output_filter) or list(prediction.outputs)
        for alias in wanted:
            if alias not in prediction.outputs:
                raise invalid_argument(f"output tensor alias not found in signature: {alias} Outputs expected to "
                                       f"be in the set {{{','.join(sorted(prediction.outputs))}}}.")
        if len(set(wanted)) != len(wanted):
            raise invalid_argument(f"duplicate output tensor alias: {wanted}")
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = prediction.servable.version
        response.model_spec.signature_name = prediction.signature.name
        for alias in wanted:
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(prediction.outputs[alias]))
        return response

    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context):
        try:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            if not request.metadata_field:
                raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != SIGNATURE_DEF_FIELD:
                    raise invalid_argument(f"Metadata field {field} is not supported")
            model = _model_request(request.model_spec)
            servable, signature_map = self._service.signature_def_map(model)
        except ServingError as error:
            _abort(context, error)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = servable.version
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response

    def Classify(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the model has predict signatures only; use Predict")

    def Regress(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the model has predict signatures only; use Predict")

    def MultiInference(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the model has predict signatures only; use Predict")


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, service: PredictionService):
        self._service = service

    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context):
        try:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            statuses = self._service.statuses(_model_request(request.model_spec))
        except ServingError as error:
            _abort(context, error)
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in statuses:
            entry = response.model_version_status.add()
            entry.version = status.version
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state)
            entry.status.error_code = _ERROR_CODES.values_by_name[status.error_code].number
            entry.status.error_message = status.error_message
        return response

    def HandleReloadConfigRequest(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "digits serve takes its configuration from the command line; restart it to change it")
