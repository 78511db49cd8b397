"""TF Serving's REST API over aiohttp: model status, metadata, predict, and the Prometheus page.

URLs are matched with TF Serving's own patterns (model_servers/http_rest_api_util.cc),
case-insensitively; anything else under /v1/ is `Malformed request: <METHOD> <path>`
(400), as there. Every answer is JSON; every error is `{"error": "..."}` with the HTTP
status TF Serving maps its code to. Predicts run on a thread pool so the event loop
keeps accepting connections; status and metadata are answered on the loop itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from urllib.parse import unquote

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from serving.batching import Caller
from serving.config import ServerConfig
from serving.errors import ServingError, first_line, invalid_argument
from serving.json_tensor import parse_predict_body, predictions_json, to_tensors
from serving.metrics import CONTENT_TYPE, METRICS_PATH, REFUSED_BODY_TIMEOUT, REFUSED_BODY_TOO_LARGE
from serving.service import ModelRequest, PredictionService, status_json
from serving.workers import Workers

_PREDICT = re.compile(r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)")
_STATUS = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")
log = logging.getLogger(__name__)
_V1 = re.compile(r"(?i)/v1/.*")


def make_app(config: ServerConfig, service: PredictionService, workers: Workers) -> web.Application:
    handler = _Handler(config, service, workers)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(existing, _MalformedHttpLogFilter) for existing in server_log.filters):
        server_log.addFilter(_MalformedHttpLogFilter())
    # aiohttp's own body limit answers in plain text; the handler enforces the limit with a JSON error.
    app = web.Application(client_max_size=config.max_body_bytes + 1)
    app.router.add_route("*", "/{tail:.*}", handler.dispatch)
    return app


class _Handler:
    def __init__(self, config: ServerConfig, service: PredictionService, workers: Workers):
        self._config = config
        self._service = service
        self._workers = workers

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path  # still percent-encoded: names are decoded after matching, as in TF Serving
        if path == METRICS_PATH and request.method == "GET":
            return web.Response(body=self._service.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})
        if not _V1.fullmatch(path):
            return _json({"error": f"Not found: {request.method} {path}"}, 404)
        # TF Serving's clock starts once the request, body included, has arrived: a slow sender's
        # upload is not the server's latency. Every /v1/ request is counted, status and metadata GETs
        # too (its http_server.cc; gRPC's GetModelStatus and GetModelMetadata are not counted).
        started = time.perf_counter()
        model_name, api = "", ""
        try:
            if request.method == "POST" and (match := _PREDICT.fullmatch(path)):
                model_name, api = _decode(match.group(1), "model name"), match.group(4)
                payload = await self._predict_body(request)
                started = time.perf_counter()
                body = await self._predict(request, _model_request(match), payload)
            elif request.method == "GET" and (match := _STATUS.fullmatch(path)):
                if match.group(1) is None:
                    raise invalid_argument("Missing model name in request.")
                model_name = _decode(match.group(1), "model name")
                # On the event loop, never queued behind predicts: health checks are answered under overload.
                body = self._status_or_metadata(_model_request(match), match.group(4) is not None)
            else:
                raise invalid_argument(f"Malformed request: {request.method} {path}")
        except _Refused as error:
            self._service.metrics.record_refused(error.reason)
            return _json({"error": error.message}, error.http_status)
        except ServingError as error:
            self._service.record_request(model_name, error.code, api, "REST", time.perf_counter() - started)
            return _json({"error": error.message}, error.http_status)
        except Exception as error:  # a bug, not bad input: logged with its traceback, answered in TF Serving's shape
            log.exception("%s %s failed", request.method, path)
            self._service.record_request(model_name, "INTERNAL", api, "REST", time.perf_counter() - started)
            return _json({"error": f"internal error: {type(error).__name__}"}, 500)
        self._service.record_request(model_name, "OK", api, "REST", time.perf_counter() - started)
        if isinstance(body, bytes):  # a predict's answer, encoded on its worker thread
            return web.Response(body=body, status=200, headers={"Content-Type": JSON_CONTENT_TYPE})
        return _json(body, 200, indent=1)  # status/metadata: protobuf's JSON layout

    async def _predict_body(self, request: web.Request) -> bytes:
        method = request.rel_url.raw_path.rsplit(":", 1)[-1]
        if method in ("classify", "regress"):
            raise invalid_argument(f"the model has predict signatures only; use :predict, not :{method}")
        if method != "predict":  # TF Serving matches the URL case-insensitively but dispatches on the exact word
            raise invalid_argument(f"Malformed request: {request.method} {request.rel_url.raw_path}")
        return await self._read_body(request)

    async def _predict(self, request: web.Request, model: ModelRequest, payload: bytes) -> bytes:
        """Admitted (or refused) only once the body is here, so a slow sender holds no predict slot."""
        admission = self._service.admission
        transport = request.transport
        caller = Caller.within(self._config.rest_api_timeout_ms / 1000,
                               gone=lambda: transport is None or transport.is_closing())
        admission.enter()  # left by _predict_sync, which always runs once queued
        return await self._workers.run(self._predict_sync, model, payload, caller)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self._config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _Refused(REFUSED_BODY_TOO_LARGE, _too_large(request.content_length, limit))
        try:
            return await asyncio.wait_for(request.read(), self._config.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:  # a chunked body (no Content-Length) passed the limit
            raise _Refused(REFUSED_BODY_TOO_LARGE, _too_large(None, limit)) from None
        except asyncio.TimeoutError:
            raise _Refused(REFUSED_BODY_TIMEOUT, f"the request body did not arrive within "
                                                 f"{self._config.body_timeout_s:g} s (--body-timeout)") from None
        except ConnectionError:  # the client closed the connection before sending the whole body
            raise ServingError("CANCELLED", f"the connection closed before the request body ended "
                                            f"(Content-Length {request.content_length})") from None
        except HttpProcessingError as error:  # e.g. a bad chunk in a chunked body
            raise invalid_argument(f"the request body cannot be read: {first_line(error.message, 'malformed')}") from None

    def _predict_sync(self, model: ModelRequest, payload: bytes, caller: Caller) -> bytes:
        """Parses, runs and encodes one predict on a worker thread: the event loop only moves bytes."""
        try:
            signature_name, raw, row_format = parse_predict_body(payload)
            prediction = self._service.predict(
                model, signature_name, lambda signature: to_tensors(raw, row_format, signature),
                missing_signature=lambda name: invalid_argument(
                    f'Serving signature name: "{name}" not found in signature def'),
                caller=caller)
            return json.dumps(predictions_json(prediction.outputs, row_format)).encode()
        finally:
            self._service.admission.leave()

    def _status_or_metadata(self, model: ModelRequest, metadata: bool) -> dict:
        if not metadata:
            return status_json(self._service.statuses(model))
        return self._service.servable(model).metadata_json()


def _model_request(match: re.Match) -> ModelRequest:
    name, version, label = match.group(1), match.group(2), match.group(3)
    if version is not None:
        try:
            number = int(version)
            if number >= 2 ** 63:
                raise ValueError
        except ValueError:
            raise invalid_argument(f"Failed to convert version: {version} to numeric.") from None
    return ModelRequest(_decode(name, "model name"), int(version) if version is not None else None,
                        _decode(label, "model version label") if label is not None else None)


def _decode(value: str, what: str) -> str:
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise invalid_argument(f"Failed to decode {what}:{value}") from None


class _Refused(ServingError):
    """A request refused before any handler saw it: its body too large (413) or stalled (408). The client's
    doing, counted in refused_requests by `reason` and never in request_count, as TF Serving's gRPC
    transport refuses an over-size message before its handler counts anything."""

    _ANSWERS = {REFUSED_BODY_TOO_LARGE: ("RESOURCE_EXHAUSTED", 413), REFUSED_BODY_TIMEOUT: ("DEADLINE_EXCEEDED", 408)}

    def __init__(self, reason: str, message: str):
        code, http_status = self._ANSWERS[reason]
        super().__init__(code, message)
        self.reason = reason
        self.with_http(http_status)


def _too_large(size: int | None, limit: int) -> str:
    size_text = f"{size} bytes" if size is not None else f"larger than {limit} bytes"
    return f"the request body is {size_text}; the limit is {limit} bytes (--max-body-bytes)"



class _MalformedHttpLogFilter(logging.Filter):
    """aiohttp logs a malformed request (bad Content-Length, bad chunk) as an ERROR with a traceback,
    as if the server had failed; it is the client's error, already answered 400: one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and record.msg == "Error handling request from %s":
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "malformed HTTP request from %s (answered 400): %s"
            record.args = (*(record.args or ()), " ".join(str(error.message).split()))
        return True


JSON_CONTENT_TYPE = "application/json"  # exactly TF Serving's header (aiohttp's `content_type=` adds a charset)


def _json(document: dict, status: int, indent: int | None = None) -> web.Response:
    return web.Response(body=json.dumps(document, indent=indent).encode(), status=status,
                        headers={"Content-Type": JSON_CONTENT_TYPE})
