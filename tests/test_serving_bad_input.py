"""`digits serve` against bad input: every bad request gets a 4xx (REST) or the right gRPC code with a
clear message, never a 5xx, a hang or a traceback, and the next valid request is answered.

Messages follow TF Serving 2.16 where it has one (util/json_tensor.cc, predict_util.cc,
http_rest_api_handler.cc); the server's own limits name the limit.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
from conftest import start_server
from monitoring import names
from serving_clients import MetricsDelta, scrape

pytestmark = [pytest.mark.slow]

TIMEOUT_S = 60  # per request: a hang fails the test instead of the session
# The limited server's flags.
MAX_INSTANCES, MAX_BODY_BYTES = 8, 6000
# The one-slot server's: a lone image waits this long for company in its batch queue (holding the one predict
# slot), and a REST body has this long to arrive.
HOLD_S, BODY_TIMEOUT_S = 6.0, 3.0
LIMIT_MESSAGE = "too many requests in flight (limit 1); retry later"
REFUSED = names.REFUSED_REQUESTS.removesuffix("_total")  # as scrape() names counters


# -- fixtures and helpers ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def png(sample_tree) -> bytes:
    """A real held-out digit, as clients send it."""
    return sorted((sample_tree / "testing" / "3").iterdir())[0].read_bytes()


@pytest.fixture(scope="module")
def limited_server(pushed_model):
    """A server with small limits: 8 examples per request, 6,000-byte bodies and messages, 1 request in flight."""
    server = start_server(pushed_model, "--max-instances", MAX_INSTANCES, "--max-body-bytes", MAX_BODY_BYTES,
                          "--max-concurrent-requests", 1)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_slot_server(pushed_model):
    """One predict in flight at most. A request of one image waits HOLD_S in its batch queue for company
    (`--batch-wait always`), holding the slot all that time; one of two images fills a batch and runs at
    once. A REST body has BODY_TIMEOUT_S to arrive."""
    server = start_server(pushed_model, "--max-concurrent-requests", 1, "--max-batch-size", 2, "--batch-wait",
                          "always", "--batch-timeout-micros", int(HOLD_S * 1e6), "--body-timeout", BODY_TIMEOUT_S)
    try:
        yield server
    finally:
        server.stop()


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def predict_url(server, tail: str = "/v1/models/digits:predict") -> str:
    return server.rest_url + tail


def post(server, body, tail: str = "/v1/models/digits:predict", **kwargs) -> requests.Response:
    data = json.dumps(body) if isinstance(body, (dict, list)) else body
    return requests.post(predict_url(server, tail), data=data, timeout=TIMEOUT_S, **kwargs)


def assert_error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    assert message in response.json()["error"], response.json()["error"]


def assert_still_serving(server, png: bytes, since: int = 0, images: int = 1) -> None:
    """A valid predict of `images` images is answered with 10 probabilities each; the process lives and
    logged no traceback."""
    response = post(server, {"instances": [b64(png)] * images})
    assert response.status_code == 200, response.text[:500]
    predictions = response.json()["predictions"]
    assert len(predictions) == images
    for prediction in predictions:
        assert len(prediction["probabilities"]) == 10
        assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert server.process.poll() is None
    time.sleep(0.2)  # the reader thread copies the server's stdout
    printed = "".join(server.output[since:])
    assert "Traceback" not in printed, printed[-3000:]
    assert "ERROR aiohttp" not in printed, printed[-3000:]


def _wait_until(condition, what: str, timeout: float = TIMEOUT_S) -> None:
    """Polls `condition` until it holds; fails after `timeout` seconds, naming what it waited for."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def png_of(width: int, height: int, mode: str = "L", noise: bool = False) -> bytes:
    from PIL import Image

    if noise:
        image = Image.frombytes(mode, (width, height), os.urandom(width * height * len(mode)))
    else:
        image = Image.new(mode, (width, height))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no image data worth the name."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


# -- REST: the request body ----------------------------------------------------------------------------------------

BODY_CASES = {
    # id: (body, message). Bodies are bytes as sent, or a JSON document.
    "malformed-json": (b'{"instances": [', "JSON Parse error"),
    "empty-body": (b"", "JSON Parse error: The document is empty"),
    "blank-body": (b"  \n ", "JSON Parse error: The document is empty"),
    "not-utf8": (b'{"instances": ["\xff"]}', "not UTF-8"),
    "deeply-nested-json": (b"[" * 100_000 + b"]" * 100_000, "JSON Parse error"),
    "huge-integer": (b'{"instances": [1' + b"0" * 5000 + b"]}", "JSON Parse error"),
    "not-an-object": ([1, 2], "Is not object"),
    "string-document": (b'"just text"', "Is not object"),
    "signature-name-not-string": ({"signature_name": 1, "instances": ["x"]},
                                  "'signature_name' key must be a string value"),
    "missing-instances-and-inputs": ({"examples": []}, "Missing 'inputs' or 'instances' key"),
    "both-instances-and-inputs": ({"instances": ["x"], "inputs": ["x"]},
                                  "expecting only one of 'inputs' or 'instances' keys to exist"),
    "instances-not-a-list": ({"instances": {"b64": "AAAA"}}, "'instances' to be an list/array"),
    "instances-a-string": ({"instances": "AAAA"}, "'instances' to be an list/array"),
    "empty-instances": ({"instances": []}, "No values in 'instances' array"),
    "number-instead-of-image": ({"instances": [7]}, "Type: Number is not of expected type: string"),
    "null-instead-of-image": ({"instances": [None]}, "Type: Null is not of expected type: string"),
    "bool-instead-of-image": ({"instances": [True]}, "is not of expected type: string"),
    "b64-value-a-number": ({"instances": [{"b64": 12}]}, "not formatted correctly for base64 data"),
    "b64-value-a-list": ({"instances": [{"b64": ["AAAA"]}]}, "not formatted correctly for base64 data"),
    "object-not-b64": ({"instances": [{"image_bytes": {"data": "AAAA"}}]}, "not formatted correctly for base64 data"),
    "wrong-input-name": ({"instances": [{"image": {"b64": "AAAA"}}]}, "must only have keys: image_bytes"),
    "nested-list": ({"instances": [["AAAA"]]}, "must have rank 1"),
    "ragged-nesting": ({"inputs": [["AAAA"], ["AAAA", "AAAA"]]}, "different lengths"),
    "deeply-nested-instances": ({"instances": json.loads("[" * 900 + '"x"' + "]" * 900)}, "image_bytes"),
    "invalid-base64": ({"instances": [{"b64": "not base64!"}]}, "Unable to base64 decode"),
    "base64-bad-length": ({"instances": [{"b64": "abcde"}]}, "Unable to base64 decode"),
    "base64-misplaced-padding": ({"instances": [{"b64": "ab=c"}]}, "Unable to base64 decode"),
    "url-safe-base64": ({"instances": [{"b64": "ab-_"}]}, "URL-safe base64"),
    "not-an-image": ({"instances": [b64(b"hello")]}, "is not a PNG, JPEG, GIF or BMP image"),
    "plain-string-not-an-image": ({"instances": ["hello"]}, "is not a PNG, JPEG, GIF or BMP image"),
    "empty-image": ({"instances": [b64(b"")]}, "is not a PNG, JPEG, GIF or BMP image"),
    "inputs-empty-list": ({"inputs": []}, "no examples"),
    "inputs-empty-object": ({"inputs": {}}, "Missing but required: {image_bytes}"),
    "inputs-wrong-name": ({"inputs": {"images": [{"b64": "AAAA"}]}},
                          "input tensor alias not found in signature: images"),
    "inputs-scalar": ({"inputs": {"b64": "AAAA"}}, "must have rank 1"),
    "unknown-signature": ({"signature_name": "nope", "instances": ["x"]},
                          'Serving signature name: "nope" not found in signature def'),
    "examples-signature-given-text": ({"signature_name": "serving_examples", "instances": ["not an example"]},
                                      "Could not parse example input"),
}


@pytest.mark.parametrize("case", BODY_CASES, ids=list(BODY_CASES))
def test_rest_bad_body_is_a_400_with_a_clear_message(model_server, png, case):
    body, message = BODY_CASES[case]
    since = len(model_server.output)
    assert_error(post(model_server, body), 400, message)
    assert_still_serving(model_server, png, since)


def test_rest_bad_image_among_good_ones_names_its_position(model_server, png):
    since = len(model_server.output)
    response = post(model_server, {"instances": [b64(png), b64(png), b64(b"GIF89a but not really")]})
    assert_error(response, 400, "image_bytes[2]")
    assert_still_serving(model_server, png, since)


def test_rest_truncated_png_is_a_400(model_server, png):
    since = len(model_server.output)
    # The first 40 bytes: signature and IHDR, then 7 bytes of the next chunk's 8-byte header.
    # The server's header check (Pillow) cannot read it.
    assert_error(post(model_server, {"instances": [b64(png[:40])]}), 400,
                 "image_bytes[0] is a truncated or corrupt PNG image (40 bytes)")
    # The last 20 bytes cut (IEND and the end of IDAT): the header reads fine, so it reaches the model,
    # whose decoder fails. Alone, beside a good image, and in columnar form.
    truncated = png[:-20]
    for body in ({"instances": [b64(truncated)]}, {"instances": [b64(png), b64(truncated)]},
                 {"inputs": {"image_bytes": [b64(truncated)]}}):
        assert_error(post(model_server, body), 400, f"Invalid PNG data, size {len(truncated)}")
    assert_still_serving(model_server, png, since)


def _encoded(mode: str, kind: str, frames: int = 1, **save) -> bytes:
    from PIL import Image

    images = [Image.new(mode, (28, 28), color) for color in range(frames)]
    out = io.BytesIO()
    images[0].save(out, format=kind, **(dict(save_all=True, append_images=images[1:]) if frames > 1 else {}), **save)
    return out.getvalue()


EXOTIC_IMAGES = {
    # id: (encode, status, error) -- formats the header check admits, in variants the decoder may refuse
    "png-16-bit": (lambda: _encoded("I;16", "PNG"), 200, None),
    "png-palette": (lambda: _encoded("P", "PNG"), 200, None),
    "png-rgba": (lambda: _encoded("RGBA", "PNG"), 200, None),
    "jpeg-cmyk": (lambda: _encoded("CMYK", "JPEG"), 200, None),
    "jpeg-progressive": (lambda: _encoded("L", "JPEG", progressive=True), 200, None),
    "bmp-palette": (lambda: _encoded("P", "BMP"), 200, None),
    # TensorFlow's decode_bmp reads 1 bit per pixel as 0 channels, in its own words (the model's decoder).
    "bmp-1-bit": (lambda: _encoded("1", "BMP"), 400, "Number of channels inherent in the image must be 1, 3 or 4, "
                                                     "was 0"),
    "gif-animated": (lambda: _encoded("P", "GIF", frames=2), 200, None),  # the first frame (expand_animations off)
    "tiff": (lambda: _encoded("L", "TIFF"), 400, "image_bytes[0] is a TIFF image; send PNG, JPEG, GIF or BMP"),
    "webp": (lambda: _encoded("RGB", "WEBP"), 400, "image_bytes[0] is a WEBP image; send PNG, JPEG, GIF or BMP"),
    "ico": (lambda: _encoded("RGBA", "ICO"), 400, "image_bytes[0] is a ICO image; send PNG, JPEG, GIF or BMP"),
}


@pytest.mark.parametrize("case", EXOTIC_IMAGES, ids=list(EXOTIC_IMAGES))
def test_rest_unusual_images_are_answered_or_refused_with_a_400(model_server, png, case):
    """Each format variant has one outcome: answered with 10 probabilities, or a 400 with its exact error."""
    encode, status, error = EXOTIC_IMAGES[case]
    since = len(model_server.output)
    response = post(model_server, {"instances": [b64(encode())]})
    assert response.status_code == status, (response.status_code, response.text[:500])
    if error is None:
        (prediction,) = response.json()["predictions"]
        assert len(prediction["probabilities"]) == 10
    else:
        assert response.json() == {"error": error}
    assert_still_serving(model_server, png, since)


def test_rest_image_limits(model_server, png):
    from serving.config import ServerConfig

    limits = ServerConfig(model_base_path="unused")
    since = len(model_server.output)
    side = 5000
    assert side * side > limits.max_image_pixels
    too_many_pixels = png_of(side, side)
    assert len(too_many_pixels) < limits.max_image_bytes
    assert_error(post(model_server, {"instances": [b64(too_many_pixels)]}), 400,
                 f"is 5000x5000 pixels; the limit is {limits.max_image_pixels} pixels per image")

    # A header that claims 10^10 pixels: Pillow refuses it as a decompression bomb; the message must say why.
    bomb = png_header_only(100_000, 100_000)
    assert_error(post(model_server, {"instances": [b64(bomb)]}), 400,
                 f"pixels; the limit is {limits.max_image_pixels} pixels per image")

    too_many_bytes = png_of(620, 620, "RGB", noise=True)
    assert len(too_many_bytes) > limits.max_image_bytes
    assert_error(post(model_server, {"instances": [b64(too_many_bytes)]}), 400,
                 f"is {len(too_many_bytes)} bytes; the limit is {limits.max_image_bytes} bytes per image")

    # Each image within its limit, together too many to decode at once (5 x 4000 x 4000 pixels).
    large = png_of(4000, 4000)
    assert 4000 * 4000 <= limits.max_image_pixels < 5 * 4000 * 4000 and len(large) < limits.max_image_bytes
    assert 5 * 4000 * 4000 > limits.max_request_pixels
    assert_error(post(model_server, {"instances": [b64(large)] * 5}), 400,
                 f"the request's images have {5 * 4000 * 4000} pixels in all; the limit is "
                 f"{limits.max_request_pixels} pixels per request")
    assert_still_serving(model_server, png, since)


def test_rest_batch_over_the_default_limit(model_server, png):
    # TF Serving with the container's batching file refuses more than max_batch_size examples, in these words.
    from serving.config import ServerConfig

    limit = ServerConfig(model_base_path="unused").batching.max_batch_size
    since = len(model_server.output)
    response = post(model_server, {"instances": [b64(png)] * (limit + 1)})
    assert_error(response, 400, f"Task size {limit + 1} is larger than maximum input batch size {limit}")
    assert_still_serving(model_server, png, since)


# -- REST: URLs and methods ----------------------------------------------------------------------------------------

URL_CASES = {
    # id: (method, path, status, message)
    "unknown-model": ("POST", "/v1/models/nope:predict", 404, "Servable not found for request: Latest(nope)"),
    "unknown-version": ("POST", "/v1/models/digits/versions/1:predict", 404,
                        "Servable not found for request: Specific(digits, 1)"),
    "unknown-label": ("POST", "/v1/models/digits/labels/canary:predict", 400,
                      "Unrecognized servable version label: canary"),
    "version-not-a-number": ("POST", "/v1/models/digits/versions/abc:predict", 400,
                             "Malformed request: POST /v1/models/digits/versions/abc:predict"),
    "version-overflow": ("POST", "/v1/models/digits/versions/99999999999999999999:predict", 400,
                         "Failed to convert version: 99999999999999999999 to numeric."),
    "version-and-label": ("POST", "/v1/models/digits/versions/1/labels/x:predict", 400, "Malformed request"),
    "version-singular": ("POST", "/v1/models/digits/version/1:predict", 400, "Malformed request"),
    "model-name-bad-escape": ("POST", "/v1/models/%ff:predict", 400, "Failed to decode model name:%"),
    "classify": ("POST", "/v1/models/digits:classify", 400, "use :predict"),
    "predict-upper-case": ("POST", "/v1/models/digits:PREDICT", 400, "Malformed request"),
    "get-on-predict": ("GET", "/v1/models/digits:predict", 400, "Malformed request: GET /v1/models/digits:predict"),
    "put-on-predict": ("PUT", "/v1/models/digits:predict", 400, "Malformed request: PUT /v1/models/digits:predict"),
    "delete-on-predict": ("DELETE", "/v1/models/digits:predict", 400, "Malformed request: DELETE"),
    "patch-on-status": ("PATCH", "/v1/models/digits", 400, "Malformed request: PATCH /v1/models/digits"),
    "post-on-status": ("POST", "/v1/models/digits", 400, "Malformed request: POST /v1/models/digits"),
    "post-on-metadata": ("POST", "/v1/models/digits/metadata", 400, "Malformed request: POST"),
    "unknown-v1-path": ("GET", "/v1/foo", 400, "Malformed request: GET /v1/foo"),
    "unknown-v1-post": ("POST", "/v1/models/digits:predict/extra", 400, "Malformed request"),
    "no-model-name": ("GET", "/v1/models", 400, "Missing model name in request."),
    "status-unknown-version": ("GET", "/v1/models/digits/versions/1", 404, "Could not find version 1 of model digits"),
    "status-unknown-model": ("GET", "/v1/models/nope", 404, "nope"),
    "status-bad-version": ("GET", "/v1/models/digits/versions/abc", 400, "Malformed request"),
    "metadata-unknown-version": ("GET", "/v1/models/digits/versions/1/metadata", 404, "Specific(digits, 1)"),
    "metadata-unknown-label": ("GET", "/v1/models/digits/labels/canary/metadata", 400,
                               "Unrecognized servable version label: canary"),
    "outside-v1": ("GET", "/v2/models/digits", 404, "Not found"),
}


@pytest.mark.parametrize("case", URL_CASES, ids=list(URL_CASES))
def test_rest_bad_url_or_method(model_server, png, case):
    method, path, status, message = URL_CASES[case]
    since = len(model_server.output)
    body = json.dumps({"instances": [b64(png)]}) if method in ("POST", "PUT", "PATCH") else None
    response = requests.request(method, model_server.rest_url + path, data=body, timeout=TIMEOUT_S)
    assert_error(response, status, message)
    assert_still_serving(model_server, png, since)


# -- REST: limits and broken HTTP ----------------------------------------------------------------------------------

def test_rest_limits(limited_server, png):
    since = len(limited_server.output)
    # More examples than --max-instances (the body still fits --max-body-bytes).
    body = json.dumps({"instances": [b64(png)] * (MAX_INSTANCES + 1)})
    assert len(body) < MAX_BODY_BYTES
    assert_error(post(limited_server, body), 400, f"the limit is {MAX_INSTANCES} per request")

    # A body over --max-body-bytes, announced by Content-Length and refused before it is read: the client's
    # doing, counted as refused and not in request_count.
    delta = MetricsDelta(limited_server.rest_url)
    big = json.dumps({"instances": [b64(png)] * 20}).encode()
    assert len(big) > MAX_BODY_BYTES
    assert_error(post(limited_server, big), 413,
                 f"the request body is {len(big)} bytes; the limit is {MAX_BODY_BYTES} bytes")

    # The same body sent chunked (no Content-Length): refused once it passes the limit.
    def chunks():
        for start in range(0, len(big), 1000):
            yield big[start:start + 1000]

    response = post(limited_server, chunks(), headers={"Content-Type": "application/json"})
    assert "Content-Length" not in response.request.headers
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert_error(response, 413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    delta.take()
    assert delta(REFUSED, reason=names.REFUSED_BODY_TOO_LARGE) == 2
    assert delta.total(names.REQUEST_COUNT) == 0
    assert_still_serving(limited_server, png, since)


def _raw_http(server, data: bytes, half_close: bool) -> bytes:
    """Sends raw bytes to the REST port and returns what comes back until the server closes.

    `half_close`: then close the sending side, as a client that gives up on its request does.
    """
    host, port = server.rest_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _status_of(raw_response: bytes) -> int | None:
    if not raw_response:
        return None
    return int(raw_response.split(b"\r\n", 1)[0].split()[1])


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_rest_truncated_body(model_server, png, framing):
    """The client sends less body than it announced and closes its side: the server gives up on the body at
    once, counted CANCELLED (had it waited for the body, it would answer 408 after --body-timeout), with no
    answer to a client that has gone, no 5xx, no traceback."""
    since = len(model_server.output)
    delta = MetricsDelta(model_server.rest_url)
    body = json.dumps({"instances": [b64(png)]}).encode()
    head = "POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if framing == "content-length":
        request = f"{head}Content-Length: {len(body) + 1000}\r\n\r\n".encode() + body
    else:  # one whole chunk, then half of the next, and no terminating 0-chunk
        request = f"{head}Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n".encode() + body + \
            f"\r\n{len(body):x}\r\n".encode() + body[: len(body) // 2]
    assert _raw_http(model_server, request, half_close=True) == b""

    def cancelled() -> float:
        return delta.take()(":tensorflow:serving:request_count", model_name="digits", status="CANCELLED")

    _wait_until(lambda: cancelled() == 1, "the request is counted CANCELLED")
    assert delta(":tensorflow:serving:request_count", model_name="digits", status="DEADLINE_EXCEEDED") == 0
    assert_still_serving(model_server, png, since)


@pytest.mark.parametrize("raw, status", [
    (b"HELLO\r\n\r\n", 400),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", 400),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
     400),
], ids=["garbage-request-line", "bad-content-length", "bad-chunk-size"])
def test_rest_malformed_http(model_server, png, raw, status):
    since = len(model_server.output)
    answer = _raw_http(model_server, raw, half_close=False)  # aiohttp closes after a 400
    assert _status_of(answer) == status, answer[:500]
    assert_still_serving(model_server, png, since)


# -- gRPC ----------------------------------------------------------------------------------------------------------

def _grpc_stubs(server):
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_target)
    return channel, prediction_service_pb2_grpc.PredictionServiceStub(channel), \
        model_service_pb2_grpc.ModelServiceStub(channel)


def _predict_request(name: str = "digits", images=None, **spec):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    if images is not None:
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def _grpc_predict_cases(png: bytes) -> dict:
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    from serving.config import ServerConfig

    def with_input(alias, tensor, **spec):
        request = _predict_request(**spec)
        request.inputs[alias].CopyFrom(tensor)
        return request

    def filtered(*aliases):
        request = _predict_request(images=[png])
        request.output_filter.extend(aliases)
        return request

    def tensor(dims, **fields):
        shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in dims])
        return tensor_pb2.TensorProto(tensor_shape=shape, **fields)

    claims_huge_shape = tensor([10**12], dtype=types_pb2.DT_STRING, string_val=[png])
    # The 14-byte message: make_ndarray would fill 8,388,608 strings (128 MB) before any limit.
    claims_8m_strings = tensor([8388608], dtype=types_pb2.DT_STRING, string_val=[b"x"])
    claims_negative_shape = tensor([-5], dtype=types_pb2.DT_STRING, string_val=[png])
    unreadable_content = tensor([4], dtype=types_pb2.DT_STRING, tensor_content=b"\x00" * 6)
    no_dtype = tensor([1], string_val=[png])

    def example(**features) -> bytes:
        return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()

    example_without_image = example(label=tf.train.Feature(int64_list=tf.train.Int64List(value=[3])))
    example_with_text = example(image=tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"hello"])))
    max_batch_size = ServerConfig(model_base_path="unused").batching.max_batch_size
    ok = grpc.StatusCode
    return {
        # id: (request, code, message)
        "unknown-model": (_predict_request("nope", [png]), ok.NOT_FOUND,
                          "Servable not found for request: Latest(nope)"),
        "unknown-version": (_predict_request(images=[png], version=1), ok.NOT_FOUND,
                            "Servable not found for request: Specific(digits, 1)"),
        "unknown-label": (_predict_request(images=[png], version_label="canary"), ok.INVALID_ARGUMENT,
                          "Unrecognized servable version label: canary"),
        "no-model-name": (_predict_request("", [png]), ok.INVALID_ARGUMENT, "ModelSpec has no name specified."),
        "unknown-signature": (_predict_request(images=[png], signature_name="nope"), ok.FAILED_PRECONDITION,
                              'Serving signature key "nope" not found.'),
        "missing-input": (_predict_request(), ok.INVALID_ARGUMENT, "Missing but required: {image_bytes}"),
        "wrong-input-alias": (with_input("images", tf.make_tensor_proto([png])), ok.INVALID_ARGUMENT,
                              "input tensor alias not found in signature: images"),
        "float-for-image-bytes": (with_input("image_bytes", tf.make_tensor_proto([1.0, 2.0])),
                                  ok.INVALID_ARGUMENT, "input image_bytes expects DT_STRING but DT_FLOAT is provided"),
        "int-for-image-bytes": (with_input("image_bytes", tf.make_tensor_proto(np.array([1], np.int64))),
                                ok.INVALID_ARGUMENT, "input image_bytes expects DT_STRING but DT_INT64 is provided"),
        "float-for-examples": (with_input("examples", tf.make_tensor_proto([1.0]), signature_name="serving_examples"),
                               ok.INVALID_ARGUMENT, "input examples expects DT_STRING but DT_FLOAT is provided"),
        "non-image-bytes": (_predict_request(images=[b"hello"]), ok.INVALID_ARGUMENT,
                            "is not a PNG, JPEG, GIF or BMP image"),
        "truncated-png-header": (_predict_request(images=[png[:40]]), ok.INVALID_ARGUMENT,
                                 "truncated or corrupt PNG image"),
        "truncated-png-data": (_predict_request(images=[png[:-20]]), ok.INVALID_ARGUMENT, "Invalid PNG data"),
        "not-an-example": (with_input("examples", tf.make_tensor_proto([b"not an example"]),
                                      signature_name="serving_examples"),
                           ok.INVALID_ARGUMENT, "Could not parse example input"),
        "example-without-image": (with_input("examples", tf.make_tensor_proto([example_without_image]),
                                             signature_name="serving_examples"),
                                  ok.INVALID_ARGUMENT, "Feature: image (data type: string) is required"),
        "example-with-text-image": (with_input("examples", tf.make_tensor_proto([example_with_text]),
                                               signature_name="serving_examples"),
                                    ok.INVALID_ARGUMENT, "Unknown image file format"),
        "empty-batch": (_predict_request(images=np.array([], dtype=object)), ok.INVALID_ARGUMENT, "no examples"),
        "scalar-input": (with_input("image_bytes", tf.make_tensor_proto(png)), ok.INVALID_ARGUMENT, "must have rank 1"),
        "rank-2-input": (_predict_request(images=[[png]]), ok.INVALID_ARGUMENT, "must have rank 1"),
        # TF Serving with batching on (the container's max_batch_size 32), in its words.
        "too-many-examples": (_predict_request(images=[png] * (max_batch_size + 1)), ok.INVALID_ARGUMENT,
                              f"Task size {max_batch_size + 1} is larger than maximum input batch size "
                              f"{max_batch_size}"),
        # make_ndarray repeats the last value up to the claimed shape: refused from the claim alone.
        "shape-claims-10^12-examples": (with_input("image_bytes", claims_huge_shape), ok.INVALID_ARGUMENT,
                                        f"Task size 1000000000000 is larger than maximum input batch size "
                                        f"{max_batch_size}"),
        "shape-claims-8388608-strings": (with_input("image_bytes", claims_8m_strings), ok.INVALID_ARGUMENT,
                                         f"Task size 8388608 is larger than maximum input batch size "
                                         f"{max_batch_size}"),
        "negative-dimension": (with_input("image_bytes", claims_negative_shape), ok.INVALID_ARGUMENT,
                               "input image_bytes: the TensorProto has a negative dimension"),
        "unreadable-content": (with_input("image_bytes", unreadable_content), ok.INVALID_ARGUMENT,
                               "input image_bytes: the TensorProto cannot be read"),
        "no-dtype": (with_input("image_bytes", no_dtype), ok.INVALID_ARGUMENT,
                     "input image_bytes expects DT_STRING but DT_INVALID is provided"),
        "unknown-output-filter": (filtered("nope"), ok.INVALID_ARGUMENT,
                                  "output tensor alias not found in signature: nope"),
        "duplicate-output-filter": (filtered("probabilities", "probabilities"), ok.INVALID_ARGUMENT,
                                    "duplicate output tensor alias"),
    }


GRPC_PREDICT_CASE_IDS = [  # the keys of _grpc_predict_cases, which needs the PNG to build its requests
    "unknown-model", "unknown-version", "unknown-label", "no-model-name", "unknown-signature", "missing-input",
    "wrong-input-alias", "float-for-image-bytes", "int-for-image-bytes", "float-for-examples", "non-image-bytes",
    "truncated-png-header", "truncated-png-data", "not-an-example", "example-without-image",
    "example-with-text-image", "empty-batch", "scalar-input", "rank-2-input", "too-many-examples",
    "shape-claims-10^12-examples", "shape-claims-8388608-strings", "negative-dimension", "unreadable-content",
    "no-dtype", "unknown-output-filter", "duplicate-output-filter",
]


def assert_grpc_still_serving(server, png: bytes, since: int, images: int = 1) -> None:
    import tensorflow as tf

    channel, prediction, _ = _grpc_stubs(server)
    with channel:
        response = prediction.Predict(_predict_request(images=[png] * images), timeout=TIMEOUT_S)
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    assert probabilities.shape == (images, 10)
    assert probabilities.sum(axis=1) == pytest.approx([1.0] * images, abs=1e-4)
    assert_still_serving(server, png, since, images)


@pytest.mark.parametrize("case", GRPC_PREDICT_CASE_IDS)
def test_grpc_bad_predict(model_server, png, case):
    cases = _grpc_predict_cases(png)
    assert list(cases) == GRPC_PREDICT_CASE_IDS
    request, code, message = cases[case]
    since = len(model_server.output)
    channel, prediction, _ = _grpc_stubs(model_server)
    with channel, pytest.raises(grpc.RpcError) as raised:
        prediction.Predict(request, timeout=TIMEOUT_S)
    assert raised.value.code() == code, (raised.value.code(), raised.value.details())
    assert message in raised.value.details()
    details = raised.value.details()
    assert details.strip() and "Traceback" not in details and "Graph execution error" not in details, details
    assert_grpc_still_serving(model_server, png, since)


def test_grpc_bad_metadata_and_status_requests(model_server, png):
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

    def metadata(name="digits", fields=("signature_def",), version=None):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
        if name is not None:
            request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        return request

    def status(name="digits", version=None):
        request = get_model_status_pb2.GetModelStatusRequest()
        if name is not None:
            request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        return request

    code = grpc.StatusCode
    since = len(model_server.output)
    channel, prediction, models = _grpc_stubs(model_server)
    cases = [
        (prediction.GetModelMetadata, metadata(fields=()), code.INVALID_ARGUMENT,
         "GetModelMetadataRequest must specify at least one metadata_field"),
        (prediction.GetModelMetadata, metadata(fields=("foo",)), code.INVALID_ARGUMENT,
         "Metadata field foo is not supported"),
        (prediction.GetModelMetadata, metadata(name=None), code.INVALID_ARGUMENT, "Missing ModelSpec"),
        (prediction.GetModelMetadata, metadata(name="nope"), code.NOT_FOUND, "Latest(nope)"),
        (prediction.GetModelMetadata, metadata(version=1), code.NOT_FOUND, "Specific(digits, 1)"),
        (models.GetModelStatus, status(name=None), code.INVALID_ARGUMENT, "Missing ModelSpec"),
        (models.GetModelStatus, status(version=1), code.NOT_FOUND, "Could not find version 1 of model digits"),
        (models.GetModelStatus, status(name="nope"), code.NOT_FOUND, "nope"),
    ]
    with channel:
        for method, request, expected, message in cases:
            with pytest.raises(grpc.RpcError) as raised:
                method(request, timeout=TIMEOUT_S)
            assert (raised.value.code(), message in raised.value.details()) == (expected, True), \
                (request, raised.value.code(), raised.value.details())
    assert_grpc_still_serving(model_server, png, since)


def test_grpc_message_over_the_limit_is_resource_exhausted(limited_server, png):
    """grpcio's transport refuses it before any handler runs (as TF Serving's does): counted nowhere, since
    the server cannot tell it from a client that hung up (docs/serving.md)."""
    since = len(limited_server.output)
    delta = MetricsDelta(limited_server.rest_url)
    channel, prediction, _ = _grpc_stubs(limited_server)
    request = _predict_request(images=[png] * 20)
    assert request.ByteSize() > MAX_BODY_BYTES
    with channel, pytest.raises(grpc.RpcError) as raised:
        prediction.Predict(request, timeout=TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in raised.value.details()
    assert delta.take().total(names.REQUEST_COUNT) == 0
    assert_grpc_still_serving(limited_server, png, since)


# -- concurrency limit ---------------------------------------------------------------------------------------------

def _queued_so_far(server) -> int:
    """Requests that reached a batch queue (input_batch_size is recorded as each is queued)."""
    return int(sum(scrape(server.rest_url).get(
        ":tensorflow:serving:batching_session:input_batch_size_count", {}).values()))


def test_concurrency_limit_refuses_with_429_or_resource_exhausted(one_slot_server, png):
    """While a request holds the one slot (waiting in its batch queue), 16 more predicts at once, REST and
    gRPC, are each refused at once with the limit named; then the holder is answered and the slot is free.

    The 16 send two images, a full batch: had any been admitted, it would have run at once and got 200.
    """
    since = len(one_slot_server.output)
    queued = _queued_so_far(one_slot_server)
    body = json.dumps({"instances": [b64(png)] * 2})
    grpc_request = _predict_request(images=[png] * 2)  # made before the hold starts (it imports TensorFlow)
    rest_results: list = []
    grpc_results: list = []
    start = threading.Barrier(16)

    def rest_call():
        start.wait()
        try:
            response = post(one_slot_server, body)
            rest_results.append((response.status_code, response.headers.get("Content-Type"), response.text))
        except requests.RequestException as error:  # recorded, then failed on below
            rest_results.append((None, None, repr(error)))

    def grpc_call():
        channel, prediction, _ = _grpc_stubs(one_slot_server)
        start.wait()
        with channel:
            try:
                prediction.Predict(grpc_request, timeout=TIMEOUT_S)
                grpc_results.append((grpc.StatusCode.OK, ""))
            except grpc.RpcError as error:
                grpc_results.append((error.code(), error.details()))

    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(post, one_slot_server, {"instances": [b64(png)]})
        _wait_until(lambda: _queued_so_far(one_slot_server) > queued, "the holder is queued")
        threads = [threading.Thread(target=rest_call) for _ in range(8)] + \
                  [threading.Thread(target=grpc_call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S * 2)
        assert not any(thread.is_alive() for thread in threads), "a request hung"
        held_throughout = not holder.done()  # else the holder was answered before all 16 were
        held = holder.result(timeout=TIMEOUT_S)
    assert rest_results == [(429, "application/json", json.dumps({"error": LIMIT_MESSAGE}))] * 8, held_throughout
    assert grpc_results == [(grpc.StatusCode.RESOURCE_EXHAUSTED, LIMIT_MESSAGE)] * 8, held_throughout
    assert held_throughout and held.status_code == 200, held.text
    assert_grpc_still_serving(one_slot_server, png, since, images=2)


def _http_response(sock: socket.socket) -> tuple[int, dict]:
    """Reads one HTTP response with a Content-Length from the socket: its status and JSON body."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {received!r}"
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-answer: {received!r}"
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


def test_rest_body_that_stops_arriving_is_a_408_and_holds_no_slot(one_slot_server, png):
    """docs/serving.md: a REST predict is admitted only once its body has arrived (a slow sender holds no
    slot), and a body that stops arriving gets 408 after --body-timeout.

    The client sends its headers and half the body, then nothing. Meanwhile another predict takes the
    one slot and is answered (the 408 has not come yet); after BODY_TIMEOUT_S the stalled request gets
    408, counted as a refused request (the client's doing, not in request_count), and the server goes on
    serving.
    """
    since = len(one_slot_server.output)
    delta = MetricsDelta(one_slot_server.rest_url)
    body = json.dumps({"instances": [b64(png)]}).encode()
    head = (f"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    host, port = one_slot_server.rest_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as stalled:
        stalled.sendall(head + body[: len(body) // 2])
        assert_still_serving(one_slot_server, png, since, images=2)
        readable, _, _ = select.select([stalled], [], [], 0)
        assert not readable, "the stalled request was answered before the other predict: no proof it held no slot"
        status, error = _http_response(stalled)
    assert (status, error) == (408, {"error": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s "
                                              f"(--body-timeout)"})
    delta.take()
    assert delta(REFUSED, reason=names.REFUSED_BODY_TIMEOUT) == 1
    assert delta(":tensorflow:serving:request_count", model_name="digits", status="DEADLINE_EXCEEDED") == 0
    assert_still_serving(one_slot_server, png, since, images=2)
