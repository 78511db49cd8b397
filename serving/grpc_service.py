"""TF Serving's gRPC API: PredictionService (Predict, GetModelMetadata) and ModelService (GetModelStatus),
and the standard health service (serving/health.py), which TF Serving lacks.

Built on the servicer bases generated from `tensorflow-serving-api`'s protos, so the
official stubs (`prediction_service_pb2_grpc.PredictionServiceStub`) work unchanged. Every
method runs through one guarded path (`_guarded`, as KServe's gRPC interceptor): timed, a
ServingError answered with its code, any other exception with INTERNAL and one line, and
counted in request_count.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from serving.batching import Caller
from serving.config import ServerConfig
from serving.errors import ServingError, invalid_argument
from serving.health import health_handler
from serving.ports import Port, PortError
from serving.service import ModelRequest, PredictionService
from serving.signature import Signature

log = logging.getLogger(__name__)
SIGNATURE_DEF_FIELD = "signature_def"
_ERROR_CODES = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type  # tensorflow.error.Code


# Threads beyond the predict limit, so status and metadata calls find one while predicts fill the rest.
STATUS_THREADS = 8
NO_DEADLINE_S = 1e8  # grpc reports "no deadline" as a deadline centuries away


def make_server(config: ServerConfig, service: PredictionService, port: int | None = None) -> tuple[grpc.Server, int]:
    """A started-ready (not started) server and the port it bound (`port`, else the config's).

    No `maximum_concurrent_rpcs`: it would count health checks against the limit and refuse them
    under load. Predicts are limited by the service's admission (shared with REST) instead, and
    refused at once beyond it, so at most that many threads ever hold a predict.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.max_concurrent_requests + STATUS_THREADS, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", config.max_body_bytes),
                 ("grpc.so_reuseport", 0)],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionServicer(service, max_elements=config.max_body_bytes), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(service), server)
    server.add_generic_rpc_handlers(
        (health_handler(service.manager.name, lambda: bool(service.manager.available_versions())),))
    wanted = Port(config.host, config.grpc_port if port is None else port, "gRPC", "--grpc-port")
    try:
        bound = server.add_insecure_port(wanted.address)
    except RuntimeError:  # grpcio's "Failed to bind to address": taken since the reservation, or never had
        bound = 0
    if bound == 0:
        raise PortError(f"cannot listen on {wanted.address} ({wanted.what}): the address is in use or not "
                        f"this machine's; pick another with {wanted.option}")
    return server, bound


def _model_request(spec) -> ModelRequest:
    if not spec.name:
        raise invalid_argument("ModelSpec has no name specified.")
    if spec.HasField("version") and spec.version_label:
        raise invalid_argument(f"Both model version ({spec.version.value}) and model version label "
                               f"({spec.version_label}) cannot be supplied.")
    return ModelRequest(spec.name, spec.version.value if spec.HasField("version") else None,
                        spec.version_label or None)


def _guarded(api: str, counted: bool = True) -> Callable:
    """One path for every method: runs it timed; a ServingError aborts the call with its code and message,
    any other exception (a bug) with INTERNAL and one line, its traceback logged here once.

    Counted in request_count as TF Serving counts gRPC calls (prediction_service_impl.cc: Predict,
    Classify and Regress, `counted`), and besides, whatever the method, every INTERNAL: a bug must
    reach the availability SLO. The model_name label is the request's model name, or "" (as REST
    counts a request that names no model) for requests without one.
    """

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def guarded(self, request, context):
            started = time.perf_counter()
            try:
                response, status, message = method(self, request, context), "OK", ""
            except ServingError as error:
                response, status, message = None, error.code, error.message
            except Exception as error:
                log.exception("gRPC %s failed", api)
                response, status, message = None, "INTERNAL", f"internal error: {type(error).__name__}"
            if counted or status == "INTERNAL":
                model_name = request.model_spec.name if hasattr(request, "model_spec") else ""
                self._service.record_request(model_name, status, api, "GRPC", time.perf_counter() - started)
            if status != "OK":
                context.abort(grpc.StatusCode[status], message)
            return response

        return guarded

    return decorate


def _predict_only() -> ServingError:
    return ServingError("UNIMPLEMENTED", "the model has predict signatures only; use Predict")


def _inputs(request: predict_pb2.PredictRequest, signature: Signature, max_elements: int) -> dict[str, np.ndarray]:
    """The request's TensorProtos -> numpy, once their claimed shapes pass the signature's checks.

    make_ndarray fills a shape larger than the values sent by repeating the last value (as
    TensorFlow's own Tensor::FromProto does), so a 14-byte TensorProto claiming [8388608]
    strings would cost 128 MB: names, dtypes, ranks and the batch size (against the request
    limits) are checked first, from the claims alone, and the total against what the
    signature can accept.
    """
    claimed = {}
    for alias, tensor in request.inputs.items():
        dims = [dim.size for dim in tensor.tensor_shape.dim]
        if any(size < 0 for size in dims):
            raise invalid_argument(f"input {alias}: the TensorProto has a negative dimension in shape {dims}")
        claimed[alias] = (_dtype_name(tensor.dtype), tuple(dims))
    signature.check_shapes(claimed)
    inputs = {}
    for alias, tensor in request.inputs.items():
        elements = math.prod(claimed[alias][1])
        limit = min(max_elements, signature.max_elements(alias) or max_elements)
        if elements > limit:
            raise invalid_argument(f"input {alias}: the TensorProto's shape {list(claimed[alias][1])} has "
                                   f"{elements} elements; a request may hold at most {limit}")
        try:
            inputs[alias] = tf.make_ndarray(tensor)
        except (TypeError, ValueError) as error:
            raise invalid_argument(f"input {alias}: the TensorProto cannot be read: {error}") from None
    return inputs


def _dtype_name(dtype: int) -> str:
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"dtype {dtype}"


def _caller(context: grpc.ServicerContext) -> Caller:
    """TF Serving runs a call under its gRPC deadline (prediction_service_impl.cc); so does this.

    gRPC also ends a call whose deadline passed: only an ended call with time left was cancelled.
    """
    remaining = context.time_remaining()
    return Caller.within(remaining if remaining is not None and remaining < NO_DEADLINE_S else None,
                         gone=lambda: not context.is_active() and context.time_remaining() > 0)


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, service: PredictionService, max_elements: int):
        self._service = service
        self._max_elements = max_elements  # per input tensor; one per byte of the largest message

    @_guarded("Predict")
    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        admission = self._service.admission
        admission.enter()
        try:
            return self._predict(request, _caller(context))
        finally:
            admission.leave()

    def _predict(self, request: predict_pb2.PredictRequest, caller: Caller) -> predict_pb2.PredictResponse:
        model = _model_request(request.model_spec)
        prediction = self._service.predict(
            model, request.model_spec.signature_name,
            lambda signature: _inputs(request, signature, self._max_elements),
            missing_signature=lambda name: ServingError("FAILED_PRECONDITION",
                                                        f'Serving signature key "{name}" not found.'),
            caller=caller)
        wanted = list(request.output_filter) or list(prediction.outputs)
        for alias in wanted:
            if alias not in prediction.outputs:
                raise invalid_argument(f"output tensor alias not found in signature: {alias} Outputs expected to "
                                       f"be in the set {{{','.join(sorted(prediction.outputs))}}}.")
        if len(set(wanted)) != len(wanted):
            raise invalid_argument(f"duplicate output tensor alias: {wanted}")
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = prediction.version
        response.model_spec.signature_name = prediction.signature.name
        for alias in wanted:
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(prediction.outputs[alias]))
        return response

    @_guarded("GetModelMetadata", counted=False)
    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context):
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        if not request.metadata_field:
            raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                raise invalid_argument(f"Metadata field {field} is not supported")
        model = _model_request(request.model_spec)
        servable = self._service.servable(model)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = servable.version
        response.metadata[SIGNATURE_DEF_FIELD].Pack(servable.signature_def_map())
        return response

    @_guarded("Classify")
    def Classify(self, request, context):
        raise _predict_only()

    @_guarded("Regress")
    def Regress(self, request, context):
        raise _predict_only()

    @_guarded("MultiInference", counted=False)
    def MultiInference(self, request, context):
        raise _predict_only()


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, service: PredictionService):
        self._service = service

    @_guarded("GetModelStatus", counted=False)
    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context):
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        statuses = self._service.statuses(_model_request(request.model_spec))
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in statuses:
            entry = response.model_version_status.add()
            entry.version = status.version
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state)
            entry.status.error_code = _ERROR_CODES.values_by_name[status.error_code].number
            entry.status.error_message = status.error_message
        return response

    @_guarded("HandleReloadConfigRequest", counted=False)
    def HandleReloadConfigRequest(self, request, context):
        raise ServingError("UNIMPLEMENTED",
                           "digits serve takes its configuration from the command line; restart it to change it")
