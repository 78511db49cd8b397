"""Python clients for a TF Serving-compatible server (TF Serving itself or `digits serve`).

    from serving.client import RestClient, GrpcClient
    client = RestClient("http://127.0.0.1:8501")          # or GrpcClient("127.0.0.1:8500")
    [answer] = client.predict([open("digit.png", "rb").read()])
    print(answer.digit, answer.confidence, answer.decision)

Both send the `serving_default` signature's `image_bytes`; the server (the Transform
graph inside the model) does all preprocessing, so clients send the file as it is.
`predict(images, with_image=True)` uses the `normalized_image` signature instead and also
returns the 28x28 image the model classified. `answer.blank` is true when the model found
no ink at all (a blank canvas): its digit is then a guess on an empty image. `answer.decision`
is the model's own verdict ("accepted", "unsure" or "not_a_digit"; serving/answers.py), and
`answer.describe()` says it in words.
Many images go in several requests of at most `batch_size` each: TF Serving with
batching on refuses a request larger than its `max_batch_size` (32 in docker/).
"""

from __future__ import annotations

import base64

from data import contract
from serving.answers import Answer, BadAnswer, from_grpc, from_rest
from serving.config import BatchingConfig

DEFAULT_BATCH_SIZE = BatchingConfig.max_batch_size  # the server's and the container's max_batch_size


class ServerError(Exception):
    """The server answered with an error (HTTP status or gRPC code, and its message), or could not be reached."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _chunks(images: list[bytes], batch_size: int) -> list[list[bytes]]:
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return [images[start:start + batch_size] for start in range(0, len(images), batch_size)]


def _signature(with_image: bool) -> str:
    return contract.NORMALIZED_SIGNATURE if with_image else contract.SERVING_SIGNATURE


class RestClient:
    def __init__(self, url: str = "http://127.0.0.1:8501", model_name: str = "digits", timeout: float = 30.0,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        import requests

        self._session = requests.Session()
        self._url = url.rstrip("/")
        self._model = model_name
        self._timeout = timeout
        self._batch_size = batch_size

    def _model_url(self, version: int | None, label: str | None) -> str:
        if version is not None and label is not None:
            raise ValueError("give a version or a label, not both")
        suffix = f"/versions/{version}" if version is not None else f"/labels/{label}" if label is not None else ""
        return f"{self._url}/v1/models/{self._model}{suffix}"

    def _call(self, method: str, url: str, **kwargs) -> dict:
        import requests

        try:
            response = self._session.request(method, url, timeout=self._timeout, **kwargs)
        except requests.RequestException as error:
            raise ServerError("UNAVAILABLE", f"cannot reach {self._url}: {type(error).__name__}") from None
        try:
            document = response.json()
        except ValueError:
            raise ServerError(f"HTTP {response.status_code}", response.text[:200] or "empty answer") from None
        if response.status_code != 200:
            raise ServerError(f"HTTP {response.status_code}", document.get("error", str(document)))
        return document

    def predict(self, images: list[bytes], version: int | None = None, label: str | None = None,
                with_image: bool = False) -> list[Answer]:
        """One answer per image, in order; sent in requests of at most `batch_size` images."""
        url = self._model_url(version, label) + ":predict"
        answers = []
        for chunk in _chunks(list(images), self._batch_size):
            body = {"signature_name": _signature(with_image),
                    "instances": [{"b64": base64.b64encode(image).decode("ascii")} for image in chunk]}
            document = self._call("POST", url, json=body)
            try:
                answers.extend(from_rest(document.get("predictions"), with_image, version))
            except BadAnswer as error:
                raise ServerError("BAD_ANSWER", str(error)) from None
        return answers

    def status(self, version: int | None = None) -> dict:
        return self._call("GET", self._model_url(version, None))

    def metadata(self, version: int | None = None, label: str | None = None) -> dict:
        return self._call("GET", self._model_url(version, label) + "/metadata")


class GrpcClient:
    def __init__(self, target: str = "127.0.0.1:8500", model_name: str = "digits", timeout: float = 30.0,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self._channel = grpc.insecure_channel(target)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._target = target
        self._model = model_name
        self._timeout = timeout
        self._batch_size = batch_size

    def _spec(self, spec, version: int | None, label: str | None, signature: str | None = None) -> None:
        if version is not None and label is not None:
            raise ValueError("give a version or a label, not both")
        spec.name = self._model
        if version is not None:
            spec.version.value = version
        if label is not None:
            spec.version_label = label
        if signature is not None:
            spec.signature_name = signature

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as error:
            detail = error.details() or ""
            if error.code() == grpc.StatusCode.UNAVAILABLE and not detail.startswith("Servable"):
                detail = f"cannot reach {self._target}: {detail}"
            raise ServerError(error.code().name, detail) from None

    def predict(self, images: list[bytes], version: int | None = None, label: str | None = None,
                with_image: bool = False) -> list[Answer]:
        """One answer per image, in order; sent in requests of at most `batch_size` images."""
        from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorflow_serving.apis import predict_pb2

        answers = []
        for chunk in _chunks(list(images), self._batch_size):
            request = predict_pb2.PredictRequest()
            self._spec(request.model_spec, version, label, _signature(with_image))
            request.inputs[contract.IMAGE_BYTES_INPUT].CopyFrom(tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING, string_val=chunk,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(
                    size=len(chunk))])))
            response = self._call(self._predict.Predict, request)
            try:
                answers.extend(from_grpc(response.outputs, with_image, response.model_spec.version.value or None))
            except BadAnswer as error:
                raise ServerError("BAD_ANSWER", str(error)) from None
        return answers

    def status(self, version: int | None = None):
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, version, None)
        return self._call(self._models.GetModelStatus, request)

    def metadata(self, version: int | None = None, label: str | None = None):
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, version, label)
        return self._call(self._predict.GetModelMetadata, request)

    def close(self) -> None:
        self._channel.close()
