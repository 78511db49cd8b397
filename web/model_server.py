"""The web backend's view of the model server: TF Serving's public REST or gRPC API, nothing else.

The same code talks to the TF Serving container and to `digits serve`. Every call uses the
`normalized_image` signature, so an answer carries the 28x28 image the model classified (the
page shows it; it is never re-made in JavaScript) and the ink fraction (0: no ink, a blank canvas).

REST predict answers do not say which version answered, so the REST client asks the model status
for the newest AVAILABLE version (cached for a few seconds) and sends the predict to that version
by number; if the version is gone by then (a rollout), it asks again once. gRPC answers name their
version themselves.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time

from data import contract
from serving.answers import Answer, BadAnswer, from_grpc, from_rest

# Why a call failed, as the `reason` label of the model-server error counter and in messages.
UNAVAILABLE = "unavailable"  # not reachable, refused, or it says it is unavailable / has no version
TIMEOUT = "timeout"
OVERLOADED = "overloaded"  # it has more requests in flight than it admits (429 / RESOURCE_EXHAUSTED): retry soon
REJECTED = "rejected"  # it refused this input (a 4xx / INVALID_ARGUMENT): the input's fault
BAD_ANSWER = "bad_answer"  # it answered something that is not a digits model's answer
ERROR = "error"  # any other error it reported


# "<_io.BytesIO object at 0x7f...>" in a model server's message: a heap address, nobody's business.
_HEAP_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ModelServerError(Exception):
    """What went wrong with the model server, in words the page may show: never its address (the
    app logs that beside the message) nor a heap address from its own message."""

    def __init__(self, reason: str, message: str):
        message = _HEAP_ADDRESS.sub("", message)
        super().__init__(message)
        self.reason = reason
        self.message = message


# What the web backend gets back: the shared decoder's answer (serving/answers.py), with the
# normalised image and the version that answered always present.
Prediction = Answer


def _decoded(decode, payload, version: int, count: int = 1) -> list[Prediction]:
    """The `count` answers of one predict request, each with its ink fraction."""
    try:
        answers = decode(payload, with_image=True, model_version=version)
    except BadAnswer as error:
        raise ModelServerError(BAD_ANSWER, f"the model server's answer is not a digits model's: {error}") from None
    if len(answers) != count:
        raise ModelServerError(BAD_ANSWER, "the model server answered for more or fewer images than it was sent")
    if any(answer.ink_fraction is None for answer in answers):
        raise ModelServerError(BAD_ANSWER, f"the model server's answer has no {contract.INK_FRACTION_OUTPUT!r}")
    return answers


def _chunks(images: list[bytes], batch_size: int) -> list[list[bytes]]:
    return [images[start:start + batch_size] for start in range(0, len(images), batch_size)]


class RestModelServer:
    """TF Serving's REST API (`/v1/models/<name>...`) over one pooled aiohttp session."""

    def __init__(self, url: str, model_name: str, timeout_s: float, version_ttl_s: float = 5.0,
                 connections: int = 64):
        self._url = url.rstrip("/")
        self._connections = connections
        self._model = model_name
        self._timeout_s = timeout_s
        self._version_ttl_s = version_ttl_s
        self._version: int | None = None
        self._version_read = 0.0
        self._session = None

    @property
    def description(self) -> str:
        return self._url

    def _http(self):
        import aiohttp

        if self._session is None:
            # No more connections than the model server admits predicts at once (WebConfig.model_connections).
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                                                  connector=aiohttp.TCPConnector(limit=self._connections))
        return self._session

    async def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        import aiohttp

        try:
            async with self._http().request(method, self._url + path, json=body) as response:
                text = await response.text()
                status = response.status
        except asyncio.TimeoutError:
            raise ModelServerError(TIMEOUT, f"the model server did not answer within {self._timeout_s:g} s") from None
        except aiohttp.ClientError as error:
            raise ModelServerError(UNAVAILABLE, f"cannot reach the model server ({type(error).__name__})") from None
        try:
            import json

            document = json.loads(text)
        except ValueError:
            if status == 200:
                raise ModelServerError(BAD_ANSWER, "the model server answered HTTP 200 with a body that is not "
                                                   "JSON") from None
            document = {"error": text[:200] or f"HTTP {status} with an empty body"}
        if not isinstance(document, dict):
            raise ModelServerError(BAD_ANSWER, f"the model server answered HTTP {status} with a JSON "
                                               f"{type(document).__name__}, not an object")
        return status, document

    async def versions(self) -> list[int]:
        """Versions of the model that are AVAILABLE now, oldest first."""
        status, document = await self._request("GET", f"/v1/models/{self._model}")
        if status == 404:
            raise ModelServerError(UNAVAILABLE, f"the model server has no model {self._model!r}: "
                                                f"{document.get('error', '')}".rstrip(": "))
        if status != 200:
            raise _http_error(status, document)
        entries = document.get("model_version_status", [])  # TF Serving's JSON leaves an empty list out
        if isinstance(entries, list) and all(isinstance(entry, dict) for entry in entries):
            try:
                return sorted(int(entry["version"]) for entry in entries if entry.get("state") == "AVAILABLE")
            except (TypeError, ValueError, KeyError):
                pass
        raise ModelServerError(BAD_ANSWER, "the model status is not TF Serving's")

    async def _current_version(self, refresh: bool) -> int:
        now = time.monotonic()
        if refresh or self._version is None or now - self._version_read > self._version_ttl_s:
            available = await self.versions()
            if not available:
                self._version = None
                raise ModelServerError(UNAVAILABLE, f"the model server has no version of {self._model!r} "
                                                    f"loaded yet")
            self._version, self._version_read = available[-1], now
        return self._version

    async def predict(self, image: bytes) -> Prediction:
        [answer] = await self.predict_batch([image], 1)
        return answer

    async def predict_batch(self, images: list[bytes], batch_size: int) -> list[Prediction]:
        """One answer per image, in order, all from one version: requests of at most `batch_size` images
        (TF Serving with batching on refuses more than its max_batch_size in one request)."""
        for attempt in range(2):
            version = await self._current_version(refresh=attempt > 0)
            answers: list[Prediction] = []
            for chunk in _chunks(images, batch_size):
                body = {"signature_name": contract.NORMALIZED_SIGNATURE,
                        "instances": [{"b64": base64.b64encode(image).decode("ascii")} for image in chunk]}
                status, document = await self._request(
                    "POST", f"/v1/models/{self._model}/versions/{version}:predict", body)
                if status == 404 and attempt == 0:
                    break  # the version was unloaded since it was read: ask which is newest now
                if status != 200:
                    raise _http_error(status, document)
                answers += _decoded(from_rest, document.get("predictions"), version, len(chunk))
            else:
                return answers
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _http_error(status: int, document: dict) -> ModelServerError:
    message = str(document.get("error", document))[:300]
    if status in (400, 413):
        return ModelServerError(REJECTED, f"the model server refused the image: {message}")
    if status == 429:  # `digits serve`'s admission limit
        return ModelServerError(OVERLOADED, f"the model server is busy: {message}")
    if status in (503, 404):
        return ModelServerError(UNAVAILABLE, f"the model server is unavailable: {message}")
    if status == 504:
        return ModelServerError(TIMEOUT, f"the model server timed out: {message}")
    return ModelServerError(ERROR, f"the model server answered HTTP {status}: {message}")


class GrpcModelServer:
    """TF Serving's gRPC PredictionService and ModelService (`tensorflow-serving-api` stubs, grpc.aio)."""

    def __init__(self, target: str, model_name: str, timeout_s: float):
        self._target = target
        self._model = model_name
        self._timeout_s = timeout_s
        self._channel = None
        self._predict = None
        self._models = None
        # TensorFlow's protos come with the stubs (seconds to import): now, not on the first request.
        from tensorflow.core.framework import tensor_pb2  # noqa: F401
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: F401

    @property
    def description(self) -> str:
        return f"grpc://{self._target}"

    def _stubs(self):
        if self._channel is None:
            import grpc
            from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

            self._channel = grpc.aio.insecure_channel(self._target)
            self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
            self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        return self._predict, self._models

    async def _call(self, method, request):
        import grpc

        try:
            return await method(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            code, detail = error.code(), error.details() or ""
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ModelServerError(TIMEOUT,
                                       f"the model server did not answer within {self._timeout_s:g} s") from None
            if code == grpc.StatusCode.UNAVAILABLE and not detail.startswith("Servable"):
                raise ModelServerError(UNAVAILABLE, "cannot reach the model server") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                raise ModelServerError(UNAVAILABLE, f"the model server is unavailable: {detail}") from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" not in detail:
                # Too many requests in flight, or a batch queue timeout; not the image's fault (that
                # RESOURCE_EXHAUSTED is gRPC's own "Received message larger than max").
                raise ModelServerError(OVERLOADED, f"the model server is busy: {detail}") from None
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise ModelServerError(REJECTED, f"the model server refused the image: {detail}") from None
            raise ModelServerError(ERROR, f"the model server answered {code.name}: {detail}") from None

    async def versions(self) -> list[int]:
        from tensorflow_serving.apis import get_model_status_pb2

        _, models = self._stubs()
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self._model
        response = await self._call(models.GetModelStatus, request)
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return sorted(entry.version for entry in response.model_version_status if entry.state == available)

    async def predict(self, image: bytes) -> Prediction:
        [answer] = await self.predict_batch([image], 1)
        return answer

    async def predict_batch(self, images: list[bytes], batch_size: int) -> list[Prediction]:
        """One answer per image, in order: requests of at most `batch_size` images."""
        from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorflow_serving.apis import predict_pb2

        stub, _ = self._stubs()
        answers: list[Prediction] = []
        for chunk in _chunks(images, batch_size):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = self._model
            request.model_spec.signature_name = contract.NORMALIZED_SIGNATURE
            shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(chunk))])
            request.inputs[contract.IMAGE_BYTES_INPUT].CopyFrom(tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING, string_val=chunk, tensor_shape=shape))
            response = await self._call(stub.Predict, request)
            answers += _decoded(from_grpc, response.outputs, response.model_spec.version.value, len(chunk))
        return answers

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def connect(config) -> RestModelServer | GrpcModelServer:
    """The client for a WebConfig: REST unless a gRPC target was given."""
    if config.grpc_target is not None:
        return GrpcModelServer(config.grpc_target, config.model_name, config.model_timeout_s)
    return RestModelServer(config.serving_url, config.model_name, config.model_timeout_s, config.version_ttl_s,
                           config.model_connections)
