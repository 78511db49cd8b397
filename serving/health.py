"""The standard gRPC health service, grpc.health.v1.Health, on `digits serve`'s gRPC port.

What Kubernetes' `grpc:` probes, the blackbox exporter's `grpc` prober and grpc-health-probe call.
TF Serving 2.16 does not register it (tensorflow/serving#671); `digits serve` does, with the same
meaning as its REST model status: the model serves while one of its versions is AVAILABLE.

The messages are built from their descriptor here (grpc/health/v1/health.proto, two small messages)
rather than taken from `grpcio-health-checking`, which is not in requirements.lock. Service names:

- "" (the whole server), "tensorflow.serving.PredictionService" and the model's name: SERVING while
  a version of the model is AVAILABLE, NOT_SERVING before the first load and once every version is
  unloaded or failed (predicts then answer NOT_FOUND);
- "tensorflow.serving.ModelService": SERVING while the server runs (it answers status without a
  version);
- any other name: NOT_FOUND, as the protocol says (grpc/doc/health-checking.md).

Check only. Watch answers UNIMPLEMENTED, which the protocol allows ("clients should assume this
method is not supported and should not retry"; gRPC's client-side health checking then treats the
server as healthy): on this synchronous server a watch would hold one of the worker threads the
predicts use for as long as it is open. Health checks are not counted in request_count (TF Serving
counts only Predict, Classify and Regress).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

HEALTH_SERVICE = "grpc.health.v1.Health"
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
SERVING, NOT_SERVING = "SERVING", "NOT_SERVING"


def _health_messages() -> tuple[type, type]:
    """HealthCheckRequest and HealthCheckResponse, in a pool of their own (no clash with a generated
    health_pb2 that another library registers in the default pool)."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="grpc/health/v1/health.proto", package="grpc.health.v1",
                                               syntax="proto3")
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    statuses = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", SERVING, NOT_SERVING, "SERVICE_UNKNOWN")):
        statuses.value.add(name=name, number=number)
    response.field.add(name="status", number=1, type=field.TYPE_ENUM, label=field.LABEL_OPTIONAL,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    factory = message_factory.MessageFactory(pool)
    return tuple(factory.GetPrototype(pool.FindMessageTypeByName(f"grpc.health.v1.{name}"))
                 for name in ("HealthCheckRequest", "HealthCheckResponse"))


HealthCheckRequest, HealthCheckResponse = _health_messages()


def health_handler(model_name: str, model_serving: Callable[[], bool]) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health for a server of `model_name`; `model_serving()` says whether a version of
    it is AVAILABLE now."""
    model_services = {"", PREDICTION_SERVICE, model_name}

    def check(request, context):
        if request.service in model_services:
            status = SERVING if model_serving() else NOT_SERVING
        elif request.service == MODEL_SERVICE:
            status = SERVING
        else:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return HealthCheckResponse(status=status)

    def watch(request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not supported; use Check")

    messages = {"request_deserializer": HealthCheckRequest.FromString,
                "response_serializer": HealthCheckResponse.SerializeToString}
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
        "Check": grpc.unary_unary_rpc_method_handler(check, **messages),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, **messages),
    })
