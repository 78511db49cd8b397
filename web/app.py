"""The web app's backend (aiohttp): the page, its JSON API in front of the model server, /metrics.

    GET  /                 the page (web/static/index.html; its script and styles from /static/)
    POST /api/predict      body: a PNG or JPEG image -> the model's answer (JSON)
    POST /api/read-sheet   body: a PNG or JPEG photo of the configured form (--form) -> every count read,
                           the form's checks, the verdict and the marked sheet (JSON; web/sheets.py)
    POST /api/feedback     {"id": <answer id>, "digit": 0-9} -> a right answer counted, a wrong one queued
                           for review (web/feedback.py)
    GET  /api/model        the model server and the versions it has loaded
    GET  /sheet            the tally-form page: upload a photo, see every count, the checks and what to look at
    GET  /review           the reviewers' page, and GET/POST /api/review its API: only with a review
                           token (--review-token-file), every API call with `Authorization: Bearer <token>`
    GET  /review/sheets    the sheets waiting for a person (web/sheet_queue.py), and its API, behind the same
                           token: GET /api/sheets (the queue), GET /api/sheets/<id> (one sheet, its marked photo
                           and cells), POST /api/sheets {"id", "verdict", "boxes"} (a person's decision)
    GET  /metrics          Prometheus text format (web/metrics.py)
    GET  /healthz          this process is up;   GET /readyz   ... and the model server answers

Every error is `{"error": "<one line>"}` with a 4xx for the input's fault (not an image, too large,
no ink) and 502/503/504 for the model server's (a bad answer, unavailable, too slow). Every answer
carries a Content-Security-Policy of `default-src 'self'` (and images from data: URLs, the marked sheets the
API answers with): the page loads nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import io
import json
import logging
import math
import secrets
import socket
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from data import contract
from monitoring import names as n
from web import model_server as ms
from web.config import WebConfig
from web.feedback import ACCEPTED, PENDING, REJECTED, FeedbackStore, NotPending, QueueFull
from web.metrics import WebMetrics

log = logging.getLogger(__name__)

CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'; object-src 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# The Server header: what it is, not which aiohttp and Python versions (a stranger's shopping list).
SERVER_NAME = "digits-web"
JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Model-server failures: the HTTP status the page gets, and the outcome label of the request metrics.
_MODEL_SERVER_STATUS = {ms.UNAVAILABLE: 503, ms.OVERLOADED: 503, ms.TIMEOUT: 504, ms.REJECTED: 400,
                        ms.BAD_ANSWER: 502, ms.ERROR: 502}
RETRY_AFTER_S = 1  # on every 503: the model server is busy or starting; the page may try again
# What a stored correction becomes, as the page tells whoever sent it: the same words whatever a
# reviewer already decided about that image (a stranger learns nothing of the review).
NEXT_STEP = "A reviewer checks corrections before the next training run learns from them."
QUEUE_RETRY_AFTER_S = 3600  # a full review queue empties as fast as a person reviews
# The API's state-changing paths, by the endpoint label their metrics carry.
_ENDPOINTS = {"/api/predict": n.WEB_PREDICT_ENDPOINT, "/api/feedback": n.WEB_FEEDBACK_ENDPOINT,
              "/api/review": n.WEB_REVIEW_ENDPOINT, "/api/read-sheet": n.WEB_READ_SHEET_ENDPOINT,
              "/api/sheets": n.WEB_SHEETS_ENDPOINT}
_JSON_PATHS = ("/api/feedback", "/api/review", "/api/sheets")  # bodies that must be sent as JSON
REVIEW_PAGE_SIZE = 50  # proposals one GET /api/review (or sheets one GET /api/sheets) returns, at most ?limit=200
NO_FORMS = "this app reads no forms: the forms package is not installed"
# Wrong review tokens one client may send per minute: a token is 128 bits or more, this only keeps logs
# and the CPU quiet.
BAD_TOKENS_PER_MINUTE = 10


class RequestError(Exception):
    """An answer other than 200: its status, the one-line message, and the metrics outcome."""

    def __init__(self, status: int, message: str, outcome: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = outcome
        self.retry_after_s = retry_after_s


class RecentAnswers:
    """The last answers, by id (the oldest out first): what a correction refers to. One client holds
    at most `per_client` of them: its newest push out its own oldest, so that no one client's
    flood of predictions evicts the answers other people are about to judge."""

    def __init__(self, max_count: int, per_client: int | None = None):
        self._items: collections.OrderedDict[str, ms.Prediction] = collections.OrderedDict()
        self._owner: dict[str, str] = {}
        self._by_client: dict[str, collections.deque] = {}
        self._judged: dict[str, int] = {}
        self._max_count = max_count
        self._per_client = per_client or max_count

    def add(self, prediction: ms.Prediction, client: str = "") -> str:
        answer_id = secrets.token_hex(16)
        mine = self._by_client.setdefault(client, collections.deque())
        while len(mine) >= self._per_client:
            self._forget(mine[0])
        self._items[answer_id] = prediction
        self._owner[answer_id] = client
        mine.append(answer_id)
        while len(self._items) > self._max_count:
            self._forget(next(iter(self._items)))
        return answer_id

    def _forget(self, answer_id: str) -> None:
        self._items.pop(answer_id, None)
        self._judged.pop(answer_id, None)
        client = self._owner.pop(answer_id, None)
        queue = self._by_client.get(client)
        if queue is not None:
            queue.remove(answer_id)
            if not queue:
                del self._by_client[client]

    def get(self, answer_id: str) -> ms.Prediction | None:
        return self._items.get(answer_id)

    def claim(self, answer_id: str, digit: int) -> int | None:
        """Marks the answer judged as `digit` unless it already was: None when this call claimed it,
        else the earlier judgement. Checked and marked in one step, with nothing awaited between
        (the event loop runs one handler at a time), so that of many simultaneous judgements of
        one answer exactly one is taken."""
        earlier = self._judged.get(answer_id)
        if earlier is None and answer_id in self._items:
            self._judged[answer_id] = digit
        return earlier

    def release(self, answer_id: str) -> None:
        """Undoes a claim whose judgement could not be recorded, so that the person can try again."""
        self._judged.pop(answer_id, None)


def check_image(body: bytes, config: WebConfig) -> str:
    """'png' or 'jpeg' for an image the model server may see; RequestError (4xx) for anything else."""
    return _open_image(body, config)[0]


def prepare_image(body: bytes, config: WebConfig) -> bytes:
    """The image to send the model server: checked (RequestError, 4xx, for anything it may not see),
    then, if its EXIF says it is turned (phone photos) or it is larger than the model server takes
    (contract.MAX_SERVED_IMAGE_BYTES), turned upright as the page shows it and reduced to at most
    contract.MAX_SENT_IMAGE_SIDE pixels a side, as a PNG. Otherwise the bytes as they came."""
    from PIL import ImageOps

    _, orientation = _open_image(body, config)
    turned = orientation not in (None, 1)
    if not turned and len(body) <= contract.MAX_SERVED_IMAGE_BYTES:
        return body
    from PIL import Image

    with Image.open(io.BytesIO(body)) as image:
        upright = ImageOps.exif_transpose(image)
        upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
        upright.thumbnail((contract.MAX_SENT_IMAGE_SIDE, contract.MAX_SENT_IMAGE_SIDE), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        upright.save(out, format="PNG")
    sent = out.getvalue()
    if len(sent) > contract.MAX_SERVED_IMAGE_BYTES:  # a noise field does not compress: no digit to read anyway
        raise RequestError(413, f"the image is still {_size(len(sent))} at {upright.size[0]}x{upright.size[1]}; "
                                f"the model server takes {_size(contract.MAX_SERVED_IMAGE_BYTES)}", "too_large")
    return sent


def _open_image(body: bytes, config: WebConfig) -> tuple[str, int | None]:
    """(kind, EXIF orientation or None) of an image the model server may see, decoded once to
    know; RequestError (4xx) for anything else."""
    if not body:
        raise RequestError(400, "the request has no image: send a PNG or JPEG file as the body", "bad_request")
    if len(body) > config.max_image_bytes:
        raise RequestError(413, _too_large(len(body), config.max_image_bytes), "too_large")
    if body.startswith(PNG_SIGNATURE):
        kind = "png"
    elif body.startswith(JPEG_SIGNATURE):
        kind = "jpeg"
    else:
        raise RequestError(415, "not a PNG or JPEG image", "bad_request")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(body)) as image:
            width, height = image.size
            if width * height > config.max_image_pixels:
                raise RequestError(413, f"the image is {width}x{height} pixels; the most this app takes is "
                                        f"{config.max_image_pixels:,} pixels", "too_large")
            image.load()  # a truncated or corrupt file fails here, not in the model server
            orientation = image.getexif().get(0x0112)  # EXIF Orientation
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError(413, f"the image has more than {config.max_image_pixels:,} pixels", "too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise RequestError(400, f"the {kind.upper()} file cannot be decoded: {_first_line(error)}",
                           "bad_request") from None
    return kind, orientation if isinstance(orientation, int) else None


def _too_large(size: int, limit: int) -> str:
    return f"the request is {_size(size)}; the most this endpoint takes is {_size(limit)}"


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count:,} bytes"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _article(digit: int) -> str:
    """"an 8", "a 3": the digit's name as said."""
    return "an" if digit == 8 else "a"


def _json(document: dict, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(document), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _host_name(host: str | None) -> str:
    """A Host header's name, lower-case, without its port ('[::1]:8080' -> '::1')."""
    host = (host or "").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _error(error: RequestError) -> web.Response:
    response = _json({"error": error.message}, error.status)
    if error.retry_after_s is not None or error.status == 503:
        response.headers["Retry-After"] = str(error.retry_after_s or RETRY_AFTER_S)
    return response


def _client(request: web.Request) -> str:
    """Who is asking, for rate limits and answer quotas: the peer's address."""
    return request.remote or ""


class RateLimiter:
    """A token bucket per client: `per_minute` requests a minute, bursts up to a minute's worth. The
    table of clients is bounded (the longest idle go first): a spray of addresses cannot grow it."""

    def __init__(self, per_minute: int, max_clients: int = 10_000, clock=time.monotonic):
        self._rate = per_minute / 60.0
        self._burst = float(per_minute)
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._max_clients = max_clients

    def take(self, client: str) -> float:
        """0 if the client may go ahead now (one token taken), else the seconds until it may."""
        now = self._clock()
        tokens, then = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self._rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait


class WebApp:
    def __init__(self, config: WebConfig, model_server=None, metrics: WebMetrics | None = None):
        self.config = config
        self.model_server = model_server if model_server is not None else ms.connect(config)
        self.metrics = metrics or WebMetrics()
        self.feedback = FeedbackStore(config.feedback_dir, max_pending=config.max_pending,
                                      pending_per_client=config.pending_per_client)
        self.recent = RecentAnswers(config.recent_answers, config.answers_per_client)
        self._rates = {n.WEB_PREDICT_ENDPOINT: RateLimiter(config.predicts_per_minute),
                       n.WEB_FEEDBACK_ENDPOINT: RateLimiter(config.feedback_per_minute),
                       n.WEB_REVIEW_ENDPOINT: RateLimiter(config.reviews_per_minute),
                       n.WEB_SHEETS_ENDPOINT: RateLimiter(config.reviews_per_minute),
                       n.WEB_READ_SHEET_ENDPOINT: RateLimiter(config.sheets_per_minute)}
        self._bad_tokens = RateLimiter(BAD_TOKENS_PER_MINUTE)
        self._profiles: dict[int, dict | None] = {}  # version -> its reference profile (None: has none)
        self._sync_task: asyncio.Task | None = None
        self._static = Path(str(resources.files("web") / "static"))
        # Predicts in flight to the model server, at most what it admits; the rest wait their turn.
        self._model_slots = asyncio.Semaphore(config.model_connections)
        self._decode_slots = asyncio.Semaphore(config.decode_slots)  # memory: decoded photos at once
        self.sheets = self._sheet_reader()
        self.sheet_queue = None
        if self.sheets is not None:
            from web.sheet_queue import SheetQueue

            self.sheet_queue = SheetQueue(config.feedback_dir / contract.SHEETS_DIR, self.sheets.form, self.feedback,
                                          max_pending=config.max_pending_sheets,
                                          pending_per_client=config.pending_sheets_per_client)

    def _sheet_reader(self):
        """The reader of --form's sheets; None without the forms package or OpenCV (an app installed without them)."""
        try:
            from web.sheets import SheetReader
        except ModuleNotFoundError as error:
            log.warning("POST /api/read-sheet is off: %s is not installed", error.name)
            return None
        sheets = SheetReader.load(self.config.form_path)
        self.metrics.declare_form(sheets.form.name, sheets.check_names)
        return sheets

    # -- the API ---------------------------------------------------------------------------------

    async def _predict_in_turn(self, body: bytes):
        """The model server's answer, once one of its admitted slots is free."""
        return await self._in_turn(self._model_slots, self._model_busy(), self.model_server.predict, body)

    def _model_busy(self) -> ms.ModelServerError:
        return ms.ModelServerError(ms.OVERLOADED, f"the model server is busy ({self.config.model_connections} "
                                                  "predicts in flight): try again in a moment")

    async def _in_turn(self, slots: asyncio.Semaphore, busy: Exception, work, *args):
        """`work(*args)` once one of `slots` is free; `busy` (a 503 with Retry-After, in the end) after
        waiting longer than the model timeout: the app overloaded, not a 5xx of ours."""
        try:
            await asyncio.wait_for(slots.acquire(), self.config.model_timeout_s)
        except asyncio.TimeoutError:
            raise busy from None
        try:
            return await work(*args)
        finally:
            slots.release()

    async def _read(self, request: web.Request, limit: int) -> bytes:
        """The body, at most `limit` bytes of it, counted as they arrive: a chunked body (no
        Content-Length) is refused once it passes the limit, not read whole first."""
        if request.content_length is not None and request.content_length > limit:
            raise RequestError(413, _too_large(request.content_length, limit), "too_large")
        chunks, size = [], 0
        while True:
            chunk = await request.content.read(64 * 1024)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the request is larger than the {_size(limit)} this endpoint takes",
                                   "too_large")
            chunks.append(chunk)

    async def predict(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = await self._read(request, self.config.max_image_bytes)
            busy = RequestError(503, "the app is busy reading other images: try again in a moment", "busy")
            body = await self._in_turn(self._decode_slots, busy, asyncio.to_thread, prepare_image, body, self.config)
            try:
                prediction = await self._predict_in_turn(body)
            except ms.ModelServerError as error:
                raise self._model_server_failure(error) from None
            if prediction.blank:
                raise RequestError(422, "there is no digit in the image (no ink found): draw or upload a digit",
                                   "no_ink")
        except RequestError as error:
            self.metrics.request(n.WEB_PREDICT_ENDPOINT, error.outcome, time.perf_counter() - started)
            return _error(error)
        model_ms = (time.perf_counter() - started) * 1e3
        await self._reference(prediction.model_version)
        answer_id = self.recent.add(prediction, _client(request))
        self.metrics.prediction(self.config.model_name, prediction.model_version, prediction.digit,
                                prediction.confidence, prediction.decision)
        self.metrics.request(n.WEB_PREDICT_ENDPOINT, "ok", time.perf_counter() - started)
        return _json({
            "id": answer_id,
            "digit": prediction.digit,
            "confidence": prediction.confidence,
            "probabilities": list(prediction.probabilities),
            "ink_fraction": prediction.ink_fraction,
            # The model's own verdict (contract.DECISIONS), None from models without it; the page asks
            # the person when it is not "accepted".
            "decision": prediction.decision,
            "calibrated_confidence": prediction.calibrated_confidence,
            "runner_up": prediction.runner_up,
            # What the model classified, as 8-bit gray rows (ink light), straight from its normalized_image output.
            "normalized_image": [[round(min(max(value, 0.0), 1.0) * 255) for value in row]
                                 for row in prediction.normalized_image],
            "model_name": self.config.model_name,
            "model_version": prediction.model_version,
            "elapsed_ms": round(model_ms, 1),
        })

    def _model_server_failure(self, error: ms.ModelServerError) -> RequestError:
        """A model-server failure as the page's answer (503 and 504 its fault, 400 if it refused the input),
        counted and logged with the server's address (which the page is not told)."""
        self.metrics.model_server_errors.labels(error.reason).inc()
        log.warning("model server %s: %s", self.model_server.description, error.message)
        outcome = "bad_request" if error.reason == ms.REJECTED else f"model_{error.reason}"
        return RequestError(_MODEL_SERVER_STATUS[error.reason], error.message, outcome)

    async def read_sheet(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            if self.sheets is None:
                raise RequestError(501, NO_FORMS, "not_configured")
            form = self.sheets.form.name
            loop = asyncio.get_running_loop()

            def predict(cells: list[bytes]) -> list[ms.Prediction]:  # called by forms' reader, in its thread
                return asyncio.run_coroutine_threadsafe(self._predict_cells(cells), loop).result()

            try:
                body = await self._read(request, self.config.max_image_bytes)
                busy = RequestError(503, "the app is busy reading other images: try again in a moment", "busy")
                sheet = await self._in_turn(self._decode_slots, busy, asyncio.to_thread, self._read_sheet, body,
                                            predict)
            except RequestError as error:
                if error.status < 500:  # the photo's fault: no image, too large, not the form
                    self.metrics.sheet(form, n.SHEET_UNREADABLE)
                raise
            except ms.ModelServerError as error:
                raise self._model_server_failure(error) from None
        except RequestError as error:
            self.metrics.request(n.WEB_READ_SHEET_ENDPOINT, error.outcome, time.perf_counter() - started)
            return _error(error)
        self.metrics.sheet(form, sheet.outcome, sheet.counts, sheet.failed_checks)
        document = {**sheet.document, "review": None}
        if sheet.outcome != n.SHEET_ACCEPTED:
            document["review"] = await self._queue_sheet(body, sheet, _client(request))
        self.metrics.request(n.WEB_READ_SHEET_ENDPOINT, "ok", time.perf_counter() - started)
        return _json(document)

    async def _queue_sheet(self, body: bytes, sheet, client: str) -> dict:
        """A sheet a person must look at, put in the review queue: what the answer says of it."""
        from web.sheet_queue import QueueFull

        versions = [cell.answer.model_version for count in sheet.reading.counts.values() for cell in count.cells
                    if cell.answer is not None and cell.answer.model_version is not None]
        try:
            queued = await asyncio.to_thread(self.sheet_queue.add, body, sheet.document, sheet.reading, sheet.marked,
                                             client=client, model_name=self.config.model_name,
                                             model_version=versions[0] if versions else None)
        except QueueFull as error:
            log.warning("sheet not queued for review: %s", error)
            return {"queued": False, "reason": f"{error}: keep the paper sheet and send it again later"}
        except OSError as error:
            log.error("cannot queue a sheet in %s: %s", self.sheet_queue.root, error)
            return {"queued": False, "reason": "the sheet could not be saved for review: keep the paper sheet"}
        if queued.new:
            log.info("sheet %s queued for review (%s)", queued.id, sheet.outcome)
        return {"queued": True, "id": queued.id, "state": queued.state}

    def _read_sheet(self, body: bytes, predict):
        """In a worker thread: the photo checked as /api/predict checks an image, then read as the form."""
        from web.sheets import Unreadable

        check_image(body, self.config)
        try:
            return self.sheets.read(body, predict)
        except Unreadable as error:
            raise RequestError(error.status, error.message, "not_a_form" if error.status == 422 else "bad_request") \
                from None

    async def _predict_cells(self, cells: list[bytes]) -> list[ms.Prediction]:
        """A sheet's cells, in requests of the model server's batch size, once one of its slots is free."""
        from web.sheets import BATCH_SIZE

        return await self._in_turn(self._model_slots, self._model_busy(), self.model_server.predict_batch, cells,
                                   BATCH_SIZE)

    async def feedback_handler(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            answer_id, digit = await self._feedback_request(request)
            prediction = self.recent.get(answer_id)
            if prediction is None:
                raise RequestError(410, "that answer is no longer known here (the app restarted or many answers "
                                        "came since): classify the digit again, then correct it", "expired")
            earlier = self.recent.claim(answer_id, digit)
            if earlier is not None:
                verdict = "right" if earlier == prediction.digit else f"{_article(earlier)} {earlier}"
                raise RequestError(409, f"this answer was already judged (as {verdict})", "already_judged")
            right = digit == prediction.digit
            stored = None
            if not right:
                try:
                    stored = await asyncio.to_thread(
                        self.feedback.add, prediction.normalized_image, predicted=prediction.digit, corrected=digit,
                        confidence=prediction.confidence, model_name=self.config.model_name,
                        model_version=prediction.model_version, decision=prediction.decision,
                        client=_client(request))
                except QueueFull as error:
                    self.recent.release(answer_id)
                    log.warning("correction refused: %s", error)
                    if error.per_client:
                        raise RequestError(429, f"{error}: try again once a reviewer has caught up",
                                           "queue_full", retry_after_s=QUEUE_RETRY_AFTER_S) from None
                    raise RequestError(503, "the review queue is full: try again later", "queue_full",
                                       retry_after_s=QUEUE_RETRY_AFTER_S) from None
                except OSError as error:
                    self.recent.release(answer_id)
                    log.error("cannot store a correction in %s: %s", self.config.feedback_dir, error)
                    raise RequestError(500, "the correction could not be saved (the server's feedback directory "
                                            "is not writable); nothing was stored", "error") from None
            self.metrics.judged(self.config.model_name, prediction.model_version, prediction.digit, digit)
        except RequestError as error:
            self.metrics.request(n.WEB_FEEDBACK_ENDPOINT, error.outcome, time.perf_counter() - started)
            return _error(error)
        self.metrics.request(n.WEB_FEEDBACK_ENDPOINT, "ok", time.perf_counter() - started)
        if right:
            return _json({"right": True, "stored": False, "message": f"Thanks: {digit} noted as right."})
        return _json({"right": False, "stored": True, "duplicate": stored.duplicate, "correction_id": stored.id,
                      "message": f"Thanks: saved as {_article(digit)} {digit}. {NEXT_STEP}"})

    async def _feedback_request(self, request: web.Request) -> tuple[str, int]:
        body = await self._read(request, 4096)
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            raise RequestError(400, 'send JSON: {"id": "<answer id>", "digit": 0-9}', "bad_request") from None
        if not isinstance(document, dict):
            raise RequestError(400, 'send a JSON object: {"id": "<answer id>", "digit": 0-9}', "bad_request")
        answer_id, digit = document.get("id"), document.get("digit")
        if not isinstance(answer_id, str) or len(answer_id) != 32 or any(c not in "0123456789abcdef" for c in answer_id):
            raise RequestError(400, "id must be the 32-character id of an answer from /api/predict", "bad_request")
        if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit < contract.NUM_CLASSES:
            raise RequestError(400, f"digit must be a whole number from 0 to {contract.NUM_CLASSES - 1}, "
                                    f"got {json.dumps(digit)}", "bad_request")
        return answer_id, digit

    # -- the reviewers' API (only with --review-token-file) ------------------------------------------

    def _reviewer(self, request: web.Request) -> str:
        """The reviewer's name for the review log, once the request's bearer token is the right one."""
        if self.config.review_token is None:
            raise web.HTTPNotFound()
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way; they are a wrong token.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"),
                                                                 self.config.review_token.encode()):
            wait_s = self._bad_tokens.take(_client(request))
            if wait_s > 0:
                raise RequestError(429, f"too many wrong tokens: try again in {math.ceil(wait_s)} s",
                                   "rate_limited", retry_after_s=math.ceil(wait_s))
            raise RequestError(401, "give the review token: Authorization: Bearer <token>", "unauthorized")
        return f"web review page ({_client(request)})"

    def _reviewers_page(self, name: str) -> web.FileResponse:
        if self.config.review_token is None:
            raise web.HTTPNotFound()
        return web.FileResponse(self._static / name, headers={"Cache-Control": "no-cache"})

    async def review_page(self, request: web.Request) -> web.FileResponse:
        return self._reviewers_page("review.html")

    async def review_list(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            self._reviewer(request)
            limit = _limit(request)
            proposals, counts = await asyncio.to_thread(self._proposals, limit)
        except RequestError as error:
            self.metrics.request(n.WEB_REVIEW_ENDPOINT, error.outcome, time.perf_counter() - started)
            return _error(error)
        self.metrics.request(n.WEB_REVIEW_ENDPOINT, "ok", time.perf_counter() - started)
        return _json({"counts": counts, "pending": proposals})

    def _proposals(self, limit: int) -> tuple[list[dict], dict]:
        import numpy as np
        from PIL import Image

        proposals = []
        for proposal in self.feedback.pending(limit):
            try:
                with Image.open(io.BytesIO(self.feedback.image(proposal.id))) as png:
                    pixels = np.asarray(png.convert("L")).tolist()
            except (OSError, NotPending):  # reviewed meanwhile, or not an image: not shown
                continue
            proposals.append({**asdict(proposal), "pixels": pixels})
        return proposals, self.feedback.counts()

    async def review_post(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            reviewer = self._reviewer(request)
            body = await self._read(request, 4096)
            try:
                document = json.loads(body)
            except (ValueError, RecursionError):
                document = None
            if not isinstance(document, dict):
                raise RequestError(400, 'send a JSON object: {"id": "<correction id>", "verdict": '
                                        '"accepted" or "rejected", "digit": 0-9 (optional)}', "bad_request")
            image_id, verdict, digit = document.get("id"), document.get("verdict"), document.get("digit")
            if verdict not in (ACCEPTED, REJECTED):
                raise RequestError(400, f'verdict must be "{ACCEPTED}" or "{REJECTED}"', "bad_request")
            if not isinstance(image_id, str) or not image_id:
                raise RequestError(400, "id must be the id of a pending correction", "bad_request")
            try:
                review = await asyncio.to_thread(self.feedback.review, image_id, verdict, reviewer=reviewer,
                                                 digit=digit)
            except ValueError as error:
                raise RequestError(400, _first_line(error), "bad_request") from None
            except NotPending as error:
                raise RequestError(409 if self.feedback.find(image_id) else 404, str(error), "not_pending") from None
            except OSError as error:
                log.error("cannot record a review in %s: %s", self.config.feedback_dir, error)
                raise RequestError(500, "the review could not be saved; nothing was changed", "error") from None
            log.info("review: %s %s as %d by %s", review.id, review.verdict, review.digit, reviewer)
        except RequestError as error:
            self.metrics.request(n.WEB_REVIEW_ENDPOINT, error.outcome, time.perf_counter() - started)
            return _error(error)
        self.metrics.request(n.WEB_REVIEW_ENDPOINT, "ok", time.perf_counter() - started)
        return _json({"review": asdict(review), "counts": await asyncio.to_thread(self.feedback.counts)})

    # -- the sheets' review (only with --review-token-file and the forms package) --------------------

    def _sheet_reviewer(self, request: web.Request) -> str:
        reviewer = self._reviewer(request)
        if self.sheet_queue is None:
            raise RequestError(501, NO_FORMS, "not_configured")
        return reviewer

    async def sheets_page(self, request: web.Request) -> web.FileResponse:
        return self._reviewers_page("review-sheets.html")

    async def sheets_list(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            self._sheet_reviewer(request)
            limit = _limit(request)
            pending, counts = await asyncio.to_thread(
                lambda: (self.sheet_queue.pending(limit), self.sheet_queue.counts()))
        except RequestError as error:
            self.metrics.request(n.WEB_SHEETS_ENDPOINT, error.outcome, time.perf_counter() - started)
            return _error(error)
        self.metrics.request(n.WEB_SHEETS_ENDPOINT, "ok", time.perf_counter() - started)
        return _json({"counts": counts, "pending": pending, "form": _form_document(self.sheets.form)})

    async def sheet_one(self, request: web.Request) -> web.Response:
        from web.sheet_queue import NotPending as SheetNotPending

        started = time.perf_counter()
        try:
            self._sheet_reviewer(request)
            try:
                record, marked, cells = await asyncio.to_thread(self.sheet_queue.get, request.match_info["id"])
            except SheetNotPending as error:
                raise RequestError(404, str(error), "not_pending") from None
            document = {**record, "marked": "data:image/jpeg;base64," + base64.b64encode(marked).decode(),
                        "cells": await asyncio.to_thread(_cell_pixels, cells), "form": _form_document(self.sheets.form)}
            document.pop("client", None)  # who sent it is in the log, not on the reviewers' screen
        except RequestError as error:
            self.metrics.request(n.WEB_SHEETS_ENDPOINT, error.outcome, time.perf_counter() - started)
            return _error(error)
        self.metrics.request(n.WEB_SHEETS_ENDPOINT, "ok", time.perf_counter() - started)
        return _json(document)

    async def sheet_review(self, request: web.Request) -> web.Response:
        from web.feedback import QueueFull as FeedbackFull
        from web.sheet_queue import BadReview
        from web.sheet_queue import NotPending as SheetNotPending

        started = time.perf_counter()
        try:
            reviewer = self._sheet_reviewer(request)
            body = await self._read(request, 64 * 1024)
            try:
                document = json.loads(body)
            except (ValueError, RecursionError):
                document = None
            if not isinstance(document, dict) or not isinstance(document.get("id"), str):
                raise RequestError(400, 'send a JSON object: {"id": "<sheet id>", "verdict": "confirmed" or '
                                        '"rejected", "boxes": {"<count id>": [digit or null, ...]}}', "bad_request")
            try:
                decision = await asyncio.to_thread(self.sheet_queue.review, document["id"], document.get("verdict"),
                                                   reviewer=reviewer, boxes=document.get("boxes"))
            except BadReview as error:
                raise RequestError(400, str(error), "bad_request") from None
            except SheetNotPending as error:
                status = 409 if self.sheet_queue.find(document["id"]) else 404
                raise RequestError(status, str(error), "not_pending") from None
            except (OSError, FeedbackFull, ValueError) as error:
                log.error("cannot record a sheet review in %s: %s", self.sheet_queue.root, error)
                raise RequestError(500, "the review could not be saved; the sheet still waits", "error") from None
            self.metrics.sheet_reviews.labels(self.sheets.form.name, decision["verdict"]).inc()
            log.info("sheet %s %s by %s", decision["id"], decision["verdict"], reviewer)
        except RequestError as error:
            self.metrics.request(n.WEB_SHEETS_ENDPOINT, error.outcome, time.perf_counter() - started)
            return _error(error)
        self.metrics.request(n.WEB_SHEETS_ENDPOINT, "ok", time.perf_counter() - started)
        counts = await asyncio.to_thread(self.sheet_queue.counts)
        return _json({"decision": decision, "counts": counts})

    async def model_info(self, request: web.Request) -> web.Response:
        try:
            versions = await self.model_server.versions()
        except ms.ModelServerError as error:
            log.warning("model server %s: %s", self.model_server.description, error.message)
            return _json({"error": error.message}, _MODEL_SERVER_STATUS[error.reason])
        # Not the model server's address: the page is public, the address is the operator's (in the log).
        return _json({"model_name": self.config.model_name, "versions": versions})

    async def ready(self, request: web.Request) -> web.Response:
        try:
            versions = await self.model_server.versions()
        except ms.ModelServerError as error:
            return web.Response(text=f"not ready: {error.message}\n", status=503)
        if not versions:
            return web.Response(text=f"not ready: the model server has no version of {self.config.model_name}\n",
                                status=503)
        return web.Response(text="ready\n")

    # -- reference profiles (--model-dir) ----------------------------------------------------------

    async def _reference(self, version: int) -> None:
        """Exports a version's reference profile the first time it answers (with --model-dir)."""
        if self.config.model_dir is None or version in self._profiles:
            return
        from components.reference import read_reference_profile

        self._profiles[version] = None
        path = self.config.model_dir / str(version)
        try:
            profile = await asyncio.to_thread(read_reference_profile, str(path))
        except (ValueError, OSError) as error:
            log.warning("version %d: reference profile ignored, no reference gauges: %s", version, error)
            return
        if profile is None:
            log.warning("version %d has no reference profile under %s: no reference gauges", version, path)
            return
        self._profiles[version] = profile
        self.metrics.set_reference(self.config.model_name, version, profile)

    async def _sync_references(self) -> None:
        """Every reference_sync_s: versions the model server no longer has lose their reference gauges."""
        while True:
            await asyncio.sleep(self.config.reference_sync_s)
            try:
                served = set(await self.model_server.versions())
            except ms.ModelServerError:
                continue  # down: keep what is there, try again later
            for version in [v for v in self._profiles if v not in served]:
                profile = self._profiles.pop(version)
                if profile is not None:
                    self.metrics.drop_reference(self.config.model_name, version, profile)

    async def _start(self, app: web.Application) -> None:
        if self.config.model_dir is not None:
            self._sync_task = asyncio.create_task(self._sync_references())

    # -- the page and the plumbing ------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self._static / "index.html", headers={"Cache-Control": "no-cache"})

    async def sheet_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self._static / "sheet.html", headers={"Cache-Control": "no-cache"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        try:
            self.metrics.pending.set((await asyncio.to_thread(self.feedback.counts))[PENDING])
        except OSError as error:  # the metrics still answer; the gauge keeps its last value
            log.warning("cannot count pending corrections in %s: %s", self.config.feedback_dir, error)
        if self.sheet_queue is not None:
            try:
                pending, oldest = await asyncio.to_thread(
                    lambda: (self.sheet_queue.counts()["pending"], self.sheet_queue.oldest()))
                self.metrics.sheet_queue(self.sheets.form.name, pending, oldest)
            except OSError as error:
                log.warning("cannot count the sheets waiting in %s: %s", self.sheet_queue.root, error)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": WebMetrics.content_type})

    async def _close(self, app: web.Application) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
        await self.model_server.close()

    # -- who may ask ---------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Refuses, before any handler runs: a Host the app does not answer for (DNS rebinding), and
        a state-changing request from another site (its Origin or Sec-Fetch-Site), or feedback that is
        not JSON (a text/plain POST is a "simple" cross-site request, sent without a preflight)."""
        refusal = self._refusal(request)
        if refusal is None:
            return await handler(request)
        self.metrics.request(_ENDPOINTS.get(request.path, "other"), refusal.outcome, 0.0)
        log.warning("refused %s %s (Host %r, Origin %r): %s", request.method, request.path, request.host,
                    request.headers.get("Origin"), refusal.message)
        if request.path.startswith("/api/"):
            return _error(refusal)
        return web.Response(text=refusal.message + "\n", status=refusal.status)

    def _refusal(self, request: web.Request) -> RequestError | None:
        hosts = self.config.hosts_answered
        name = _host_name(request.host)
        if hosts is not None and name not in hosts:
            return RequestError(421, f"this app does not answer for the host {name!r}", "misdirected")
        if request.method not in ("POST", "PUT", "PATCH", "DELETE"):
            return None
        origin = request.headers.get("Origin")
        allowed = origin is not None and origin.rstrip("/").lower() in self.config.allowed_origins
        if not allowed:
            site = request.headers.get("Sec-Fetch-Site")
            if site is not None and site not in ("same-origin", "none"):
                return RequestError(403, f"requests from another site ({site}) are refused", "cross_site")
            if origin is not None and urlsplit(origin).netloc.lower() != (request.host or "").lower():
                return RequestError(403, f"requests from another origin ({origin}) are refused", "cross_site")
        if request.path in _JSON_PATHS and request.content_type != "application/json":
            return RequestError(415, "send JSON, as Content-Type: application/json", "unsupported_media_type")
        endpoint = _ENDPOINTS.get(request.path)
        if endpoint is not None:
            wait_s = self._rates[endpoint].take(_client(request))
            if wait_s > 0:
                return RequestError(429, f"too many requests from this address: try again in {math.ceil(wait_s)} s",
                                    "rate_limited", retry_after_s=math.ceil(wait_s))
        return None

    def application(self) -> web.Application:
        # The largest body is an image; aiohttp refuses more before the handler reads it.
        app = web.Application(client_max_size=self.config.max_image_bytes + 1,
                              middlewares=[_json_errors, self._guard])
        app.router.add_get("/", self.page)
        app.router.add_static("/static/", self._static, follow_symlinks=False, show_index=False)
        app.router.add_post("/api/predict", self.predict)
        app.router.add_post("/api/read-sheet", self.read_sheet)
        app.router.add_post("/api/feedback", self.feedback_handler)
        app.router.add_get("/api/model", self.model_info)
        app.router.add_get("/review", self.review_page)
        app.router.add_get("/api/review", self.review_list)
        app.router.add_post("/api/review", self.review_post)
        app.router.add_get("/sheet", self.sheet_page)
        app.router.add_get("/review/sheets", self.sheets_page)
        app.router.add_get("/api/sheets", self.sheets_list)
        app.router.add_get("/api/sheets/{id}", self.sheet_one)
        app.router.add_post("/api/sheets", self.sheet_review)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/healthz", lambda request: web.Response(text="ok\n"))
        app.router.add_get("/readyz", self.ready)
        app.on_response_prepare.append(_security_headers)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._close)
        return app


def _limit(request: web.Request) -> int:
    """?limit= of a reviewers' list: 1-200, REVIEW_PAGE_SIZE if not given."""
    try:
        limit = int(request.query.get("limit", REVIEW_PAGE_SIZE))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 200:
        raise RequestError(400, "limit must be a whole number from 1 to 200", "bad_request")
    return limit


def _form_document(form) -> dict:
    """What the review page needs of the form: its counts' boxes and its checks, to recompute them as a person types."""
    return {"name": form.name, "title": form.title, "empty_box": form.empty_box,
            "counts": [{"id": count.id, "label": count.label, "digits": count.digits} for count in form.counts],
            "checks": [{"name": check.name, "terms": list(check.terms), "total": check.total,
                        "equation": check.describe()} for check in form.checks]}


def _cell_pixels(cells: dict[str, bytes]) -> dict[str, list]:
    """Each stored 28x28 cell PNG as rows of 8-bit gray, as the corrections' review page paints them."""
    import numpy as np
    from PIL import Image

    pixels = {}
    for name, png in cells.items():
        with Image.open(io.BytesIO(png)) as image:
            pixels[name] = np.asarray(image.convert("L")).tolist()
    return pixels


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers["Server"] = SERVER_NAME  # aiohttp's default names itself and its version


@web.middleware
async def _json_errors(request: web.Request, handler):
    """aiohttp's own errors under /api/ (404, 405, ...) as the API's one-line JSON; pages keep theirs."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if not request.path.startswith("/api/") or error.status < 400:
            raise
        return _json({"error": f"{error.reason}: {request.method} {request.path}"}, error.status)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception:  # a bug: logged whole, answered in one JSON line without its details
        log.exception("unexpected error on %s %s", request.method, request.path)
        if not request.path.startswith("/api/"):
            raise
        return _json({"error": "internal error (logged on the server)"}, 500)


async def serve(config: WebConfig, on_ready=None, stop: asyncio.Event | None = None,
                sock: socket.socket | None = None) -> None:
    """Runs the app until `stop` is set (or the task is cancelled); `on_ready(port)` once it listens.

    `sock`: the page's socket, bound and not listening (`serving.ports.reserve`), as `digits web`
    claims it before anything else; bound here if not given.
    """
    app = WebApp(config).application()
    runner = web.AppRunner(app, access_log_format='%a "%r" %s %b %Tfs')
    await runner.setup()
    try:
        site = (web.SockSite(runner, sock) if sock is not None
                else web.TCPSite(runner, config.host, config.port))
        await site.start()
        port = runner.addresses[0][1]
        if on_ready is not None:
            on_ready(port)
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await runner.cleanup()
