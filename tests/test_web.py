"""`digits web`'s backend over real HTTP on loopback, in front of a real `digits serve` (REST and gRPC),
and of scripted model servers for the answers a real one does not give (malformed, a version gone)."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import http.server
import io
import json
import math
import os
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from data import contract
from monitoring import names as n
from serving.client import RestClient
from serving_clients import declaration_problems
from web.config import WebConfig
from web.feedback import LOG_NAME, FeedbackStore, digit_png
from web.process import start_web

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def digits_by_class(sample_tree) -> dict[int, list[bytes]]:
    """Ten held-out MNIST PNGs of each digit."""
    return {digit: [path.read_bytes() for path in sorted((sample_tree / "testing" / str(digit)).iterdir())[:10]]
            for digit in range(10)}


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web") / "feedback"


@pytest.fixture(scope="module")
def web_app(model_server, feedback_dir, pushed_model):
    with start_web("--serving-url", model_server.rest_url, "--feedback-dir", feedback_dir,
                   "--model-dir", pushed_model) as app:
        yield app


def _predict(app, body: bytes, **headers) -> requests.Response:
    return requests.post(f"{app.url}/api/predict", data=body, headers=headers, timeout=60)


def _feedback(app, document) -> requests.Response:
    return requests.post(f"{app.url}/api/feedback", data=json.dumps(document), timeout=30,
                         headers={"Content-Type": "application/json"})


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _metrics(app) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{app.url}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- answers ------------------------------------------------------------------------------------------------


def test_the_answer_is_the_model_servers(web_app, model_server, digits_by_class):
    image = digits_by_class[3][0]
    response = _predict(web_app, image, **{"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    answer = response.json()
    [direct] = RestClient(model_server.rest_url).predict([image], with_image=True)
    assert answer["digit"] == direct.digit
    assert answer["probabilities"] == pytest.approx(direct.probabilities, abs=1e-6)
    assert answer["confidence"] == pytest.approx(direct.confidence, abs=1e-6)
    assert answer["ink_fraction"] == pytest.approx(direct.ink_fraction, abs=1e-6)
    # The 28x28 image is the model's own normalized_image output, as 8-bit gray.
    expected = [[round(value * 255) for value in row] for row in direct.normalized_image]
    assert len(answer["normalized_image"]) == 28 and all(len(row) == 28 for row in answer["normalized_image"])
    assert max(abs(a - b) for row_a, row_b in zip(answer["normalized_image"], expected)
               for a, b in zip(row_a, row_b)) <= 1
    # The version that answered is the newest loaded one, named by the backend.
    versions = sorted(int(e["version"]) for e in RestClient(model_server.rest_url).status()["model_version_status"])
    assert answer["model_version"] == versions[-1] and answer["model_name"] == "digits"
    assert len(answer["id"]) == 32
    assert response.headers["Cache-Control"] == "no-store"


def test_jpeg_and_rgba_canvas_exports_are_answered(web_app, digits_by_class):
    from PIL import Image

    digit = Image.open(io.BytesIO(digits_by_class[1][0])).convert("L")
    jpeg = io.BytesIO()
    digit.convert("RGB").save(jpeg, format="JPEG", quality=80)
    # What a canvas exports: dark ink on a transparent background.
    canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    canvas.paste(Image.new("RGBA", (280, 280), (20, 20, 20, 255)), mask=digit.resize((280, 280)))
    for body in (jpeg.getvalue(), _png(canvas)):
        response = _predict(web_app, body)
        assert response.status_code == 200, response.text
        assert response.json()["ink_fraction"] > 0


def _photo(digit_png: bytes, side: int, orientation: int | None = None, grain: float = 0.0) -> bytes:
    """A phone photo of a digit: dark ink on light paper, `side` pixels, as a JPEG. With `orientation`
    6 the pixels are stored turned a quarter to the left and EXIF says to turn them back to the right
    (a phone held upright); `grain` adds sensor noise, which JPEG cannot compress away."""
    import numpy as np
    from PIL import Image

    digit = Image.open(io.BytesIO(digit_png)).convert("L").resize((side, side), Image.Resampling.BILINEAR)
    paper = 235 - np.asarray(digit, dtype=np.float64) * 0.8
    if grain:
        paper = paper + np.random.default_rng(0).normal(0, grain, paper.shape)
    photo = Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8)).convert("RGB")
    out, exif = io.BytesIO(), Image.Exif()
    if orientation is not None:
        photo = photo.rotate(90, expand=True)  # stored turned left; orientation 6 turns it right to view
        exif[0x0112] = orientation
    photo.save(out, format="JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


def test_a_phone_photo_is_read_upright_as_the_page_shows_it(web_app, digits_by_class):
    """EXIF orientation 6 (a phone held upright): the model sees the digit as the page shows it, not on
    its side (before: on its side)."""
    import numpy as np

    image = digits_by_class[7][0]
    seen = {name: np.asarray(_predict(web_app, body).json()["normalized_image"], dtype=np.float64)
            for name, body in (("upright", _photo(image, 600)), ("turned, EXIF 6", _photo(image, 600, orientation=6)),
                               ("on its side", _photo(image, 600, orientation=1)))}
    assert np.abs(seen["turned, EXIF 6"] - seen["upright"]).mean() < 8
    assert np.abs(seen["on its side"] - seen["upright"]).mean() > 20


def test_a_photo_larger_than_the_model_server_takes_is_reduced_not_refused(web_app, digits_by_class):
    """A 1.5 MB photo (the app takes 4 MB, `digits serve` 1 MB an image): reduced to 1,024 pixels a
    side before it is sent, and answered (before: the model server's 400)."""
    from data import contract

    photo = _photo(digits_by_class[3][0], 2400, grain=12)
    assert contract.MAX_SERVED_IMAGE_BYTES < len(photo) < WebConfig.max_image_bytes
    response = _predict(web_app, photo)
    assert response.status_code == 200, response.text
    assert response.json()["ink_fraction"] > 0


@pytest.mark.parametrize("case", ["blank", "not_an_image", "truncated", "empty", "gif", "bomb"])
def test_bad_images_get_a_4xx_with_one_line(web_app, digits_by_class, case):
    from PIL import Image

    png = digits_by_class[0][0]
    if case == "bomb":  # 25 megapixels in ~25 KB: more pixels than the app takes, whatever the file's size
        body = _png(Image.new("L", (5000, 5000), 255))
        assert len(body) < 100_000
    else:
        body = {"blank": _png(Image.new("L", (280, 280), 255)), "not_an_image": b"hello, world",
                "truncated": png[: len(png) // 2], "empty": b"", "gif": b"GIF89a" + b"\0" * 20}.get(case)
    expected = {"blank": 422, "not_an_image": 415, "truncated": 400, "empty": 400, "gif": 415, "bomb": 413}[case]
    response = _predict(web_app, body)
    assert response.status_code == expected, response.text
    message = response.json()["error"]
    assert message and "\n" not in message and "Traceback" not in message


def test_too_large_a_body_is_a_413_before_it_is_read(web_app):
    limit = WebConfig.max_image_bytes
    response = _predict(web_app, b"\x89PNG\r\n\x1a\n" + b"\0" * limit)
    assert response.status_code == 413
    assert "MB" in response.json()["error"]


def test_unknown_api_paths_and_methods_are_json_errors(web_app):
    missing = requests.get(f"{web_app.url}/api/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = requests.get(f"{web_app.url}/api/predict", timeout=10)
    assert wrong.status_code == 405 and "error" in wrong.json()
    assert requests.get(f"{web_app.url}/static/../app.py", timeout=10).status_code == 404
    assert requests.get(f"{web_app.url}/static/", timeout=10).status_code in (403, 404)


def test_every_answer_has_the_content_security_policy(web_app):
    for path in ("/", "/static/app.js", "/static/style.css", "/api/model", "/metrics", "/nothing"):
        response = requests.get(web_app.url + path, timeout=10)
        policy = response.headers.get("Content-Security-Policy", "")
        assert "default-src 'self'" in policy, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = requests.get(web_app.url + "/", timeout=10).text
    # Nothing inline and nothing from elsewhere: the policy would block it.
    assert "<script>" not in page and "style=" not in page and "http" not in page.replace('href="/', "")


def test_model_info_and_readiness(web_app, model_server):
    info = requests.get(f"{web_app.url}/api/model", timeout=10).json()
    assert info["model_name"] == "digits" and "model_server" not in info  # the address is the operator's
    assert info["versions"] and all(isinstance(v, int) for v in info["versions"])
    assert requests.get(f"{web_app.url}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{web_app.url}/healthz", timeout=10).text == "ok\n"


# -- the model server down or slow -------------------------------------------------------------------------


def test_model_server_down_is_a_503_at_once(digits_by_class, tmp_path):
    port = _free_port()  # nothing listens there
    with start_web("--serving-url", f"http://127.0.0.1:{port}", "--feedback-dir", tmp_path) as app:
        started = time.monotonic()
        response = _predict(app, digits_by_class[2][0])
        assert time.monotonic() - started < 10
        assert response.status_code == 503
        # Said, without the model server's address: the page is public (the app's log has it).
        assert response.json()["error"] == "cannot reach the model server (ClientConnectorError)"
        assert requests.get(f"{app.url}/readyz", timeout=10).status_code == 503
        metrics = _metrics(app)
        assert metrics[(n.WEB_MODEL_SERVER_ERRORS, (("reason", "unavailable"),))] == 1
        assert metrics[(n.WEB_REQUESTS, (("endpoint", "predict"), ("outcome", "model_unavailable")))] == 1


def test_a_model_server_that_never_answers_is_a_504_within_the_timeout(digits_by_class, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    stop = threading.Event()

    def hold() -> None:  # accepts connections and never answers
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with start_web("--serving-url", url, "--feedback-dir", tmp_path, "--model-timeout", "1") as app:
            started = time.monotonic()
            response = _predict(app, digits_by_class[2][0])
            elapsed = time.monotonic() - started
            assert response.status_code == 504, response.text
            assert "did not answer within 1 s" in response.json()["error"]
            assert elapsed < 15
    finally:
        stop.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        listener.close()


def test_grpc_mode_answers_as_rest_does(model_server, digits_by_class, tmp_path, web_app):
    image = digits_by_class[8][0]
    with start_web("--grpc", model_server.grpc_target, "--feedback-dir", tmp_path, timeout=120) as grpc_app:
        by_grpc = _predict(grpc_app, image).json()
        by_rest = _predict(web_app, image).json()
        assert by_grpc["digit"] == by_rest["digit"]
        assert by_grpc["probabilities"] == pytest.approx(by_rest["probabilities"], abs=1e-5)
        assert by_grpc["normalized_image"] == by_rest["normalized_image"]
        assert by_grpc["model_version"] == by_rest["model_version"]
        assert requests.get(f"{grpc_app.url}/api/model", timeout=30).json()["versions"]


# -- a model server that answers wrongly, or unloads the version meanwhile --------------------------------

STATUS_PATH = "/v1/models/digits"
WELL_FORMED_ROW = {contract.PROBABILITIES_OUTPUT: [0.02] * 9 + [0.82], contract.INK_FRACTION_OUTPUT: 0.1,
                   contract.NORMALIZED_IMAGE_OUTPUT: [[0.0] * 28] * 28}
WELL_FORMED_ANSWER = (200, json.dumps({"predictions": [WELL_FORMED_ROW]}))


def _predict_path(version: int) -> str:
    return f"POST {STATUS_PATH}/versions/{version}:predict"


class ScriptedModelServer:
    """TF Serving's REST API played from a script, on loopback in a thread; every request is kept, in order.

    Each model status read gets the next of `statuses` (the last one repeats): a list of AVAILABLE
    versions, or a body sent as it is. A predict of a version in `loaded` gets `answer` (HTTP status,
    body); of any other version, TF Serving's 404 for a version it does not have.
    """

    def __init__(self, statuses: list[list[int] | str], loaded: set[int],
                 answer: tuple[int, str] = WELL_FORMED_ANSWER):
        self.statuses, self.loaded, self.answer = list(statuses), set(loaded), answer
        self.requests: list[str] = []
        self.delay_s = 0.0  # each predict takes this long
        self.in_flight = self.most_in_flight = 0
        self._count = threading.Lock()
        script = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # the test reads `requests`, not stderr
                pass

            def _send(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                script.requests.append(f"GET {self.path}")
                versions = script.statuses.pop(0) if len(script.statuses) > 1 else script.statuses[0]
                self._send(200, versions if isinstance(versions, str) else json.dumps({"model_version_status": [
                    {"version": str(v), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
                    for v in sorted(versions, reverse=True)]}))

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                script.requests.append(f"POST {self.path}")
                found = re.fullmatch(rf"{STATUS_PATH}/versions/(\d+):predict", self.path)
                if found and int(found.group(1)) in script.loaded:
                    with script._count:
                        script.in_flight += 1
                        script.most_in_flight = max(script.most_in_flight, script.in_flight)
                    try:
                        time.sleep(script.delay_s)
                        self._send(*script.answer)
                    finally:
                        with script._count:
                            script.in_flight -= 1
                else:
                    version = found.group(1) if found else "?"
                    self._send(404, json.dumps(
                        {"error": f"Servable not found for request: Specific(digits, {version})"}))

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ScriptedModelServer:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@pytest.fixture(scope="module")
def scripted_server():
    with ScriptedModelServer([[1]], {1}) as server:
        yield server


@pytest.fixture(scope="module")
def scripted_app(scripted_server, tmp_path_factory):
    """`digits web` in front of the scripted model server (REST)."""
    with start_web("--serving-url", scripted_server.url, "--feedback-dir", tmp_path_factory.mktemp("scripted")) as app:
        yield app


@pytest.fixture
def scripted(scripted_server):
    """The scripted model server, reset: version 1 loaded and answering well."""
    scripted_server.statuses, scripted_server.loaded, scripted_server.answer = [[1]], {1}, WELL_FORMED_ANSWER
    scripted_server.delay_s, scripted_server.most_in_flight = 0.0, 0
    return scripted_server


def _check_counted_as_the_model_servers(before: dict, after: dict, reason: str) -> None:
    """One more model-server failure of `reason`, one more predict with its outcome, and no prediction counted."""
    for key in ((n.WEB_MODEL_SERVER_ERRORS, (("reason", reason),)),
                (n.WEB_REQUESTS, (("endpoint", "predict"), ("outcome", f"model_{reason}")))):
        assert after.get(key, 0) - before.get(key, 0) == 1, key
    predictions = [{key: value for key, value in metrics.items() if key[0] == n.PREDICTIONS}
                   for metrics in (before, after)]
    assert predictions[0] == predictions[1]


NOT_ROWS = "the answer's predictions are not a list of objects"
NOT_ONE_ROW = "answered for more or fewer images than it was sent"
# What a model server may answer instead of a digits model's answer: (HTTP status, body, reason, words).
MALFORMED_REST_ANSWERS = {
    "no predictions": (200, {"outputs": [WELL_FORMED_ROW]}, "bad_answer", NOT_ROWS),
    "no rows": (200, {"predictions": []}, "bad_answer", NOT_ONE_ROW),
    "two rows for one image": (200, {"predictions": [WELL_FORMED_ROW] * 2}, "bad_answer", NOT_ONE_ROW),
    "a row of numbers": (200, {"predictions": [[0.1] * 10]}, "bad_answer", NOT_ROWS),
    "no ink fraction": (200, {"predictions": [{name: value for name, value in WELL_FORMED_ROW.items()
                                               if name != contract.INK_FRACTION_OUTPUT}]},
                        "bad_answer", "has no 'ink_fraction'"),
    "nine probabilities": (200, {"predictions": [{**WELL_FORMED_ROW, contract.PROBABILITIES_OUTPUT: [0.1] * 9}]},
                           "bad_answer", "9 probabilities; expected 10"),
    "a 27-row image": (200, {"predictions": [{**WELL_FORMED_ROW, contract.NORMALIZED_IMAGE_OUTPUT: [[0.0] * 28] * 27}]},
                       "bad_answer", "normalised image is not 28x28"),
    "a decision no model makes": (200, {"predictions": [{**WELL_FORMED_ROW, contract.DECISION_OUTPUT: 7}]},
                                  "bad_answer", "decision 7 is none of"),
    "text for numbers": (200, {"predictions": [{**WELL_FORMED_ROW, contract.PROBABILITIES_OUTPUT: ["high"] * 10}]},
                         "bad_answer", "is not a digits model's"),
    # TF Serving writes a broken model's NaN as it is: valid to Python's json, not to the page's JSON.parse.
    "NaN probabilities": (200, {"predictions": [{**WELL_FORMED_ROW, contract.PROBABILITIES_OUTPUT: [math.nan] * 10}]},
                          "bad_answer", "not numbers (NaN or infinity)"),
    "not JSON": (200, "<html><body>It works!</body></html>", "bad_answer", "HTTP 200 with a body that is not JSON"),
    "an empty body": (200, "", "bad_answer", "HTTP 200 with a body that is not JSON"),
    "a JSON list": (200, "[0.1, 0.9]", "bad_answer", "HTTP 200 with a JSON list, not an object"),
    "an error page": (500, "<html><body>Internal Server Error</body></html>", "error", "answered HTTP 500"),
}


def _assert_a_502_in_one_line(response, words: str) -> None:
    """A 502 whose one-line message blames the model server in the case's own words."""
    assert response.status_code == 502, response.text
    message = response.json()["error"]
    assert message.startswith("the model server") and words in message, message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("case", list(MALFORMED_REST_ANSWERS))
def test_a_malformed_model_answer_is_a_502_with_one_line(scripted_app, scripted, digits_by_class, case):
    """Whatever a model server answers that is not a digits model's answer, the page gets a 502 and one
    line that says so, counted as the model server's failure, and nothing is counted as a prediction."""
    status, body, reason, words = MALFORMED_REST_ANSWERS[case]
    scripted.answer = (status, body if isinstance(body, str) else json.dumps(body))
    before = _metrics(scripted_app)
    response = _predict(scripted_app, digits_by_class[2][0])
    _assert_a_502_in_one_line(response, words)
    assert scripted.requests[-1] == _predict_path(1)  # the model server was asked, and this is its answer
    _check_counted_as_the_model_servers(before, _metrics(scripted_app), reason)


@pytest.mark.parametrize("body", ['{"model_version_status": ["1"]}', '{"model_version_status": 1}',
                                  '{"model_version_status": [{"version": "one", "state": "AVAILABLE"}]}',
                                  "<html><body>It works!</body></html>"])
def test_a_malformed_model_status_is_a_502_and_not_ready(scripted_app, scripted, body):
    scripted.statuses = [body]
    response = requests.get(f"{scripted_app.url}/api/model", timeout=30)
    assert response.status_code == 502, response.text
    message = response.json()["error"]
    assert message in ("the model status is not TF Serving's",
                       "the model server answered HTTP 200 with a body that is not JSON")
    ready = requests.get(f"{scripted_app.url}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.text == f"not ready: {message}\n"


def test_a_well_formed_scripted_answer_is_shown(scripted_app, scripted, digits_by_class):
    """The scripted model server answers as TF Serving does: the 502s above are the malformation's."""
    response = _predict(scripted_app, digits_by_class[2][0])
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["digit"], answer["model_version"]) == (9, 1)
    assert answer["probabilities"] == pytest.approx(WELL_FORMED_ROW[contract.PROBABILITIES_OUTPUT])


def test_an_overloaded_model_server_is_a_503_with_retry_after(scripted, scripted_app, digits_by_class):
    """`digits serve` answers 429 past its admission limit: the page hears 503 and when to try again,
    not a 502 (before: 502), counted as the model server's overload."""
    scripted.answer = (429, json.dumps({"error": "too many requests in flight (limit 64); retry later"}))
    before = _metrics(scripted_app)
    response = _predict(scripted_app, digits_by_class[2][0])
    assert response.status_code == 503 and response.headers["Retry-After"] == "1", response.text
    assert response.json()["error"] == "the model server is busy: too many requests in flight (limit 64); retry later"
    _check_counted_as_the_model_servers(before, _metrics(scripted_app), "overloaded")


def test_a_flood_waits_for_the_model_servers_slots_and_is_never_a_502(scripted, digits_by_class, tmp_path):
    """200 predictions at once through an app allowed 4 model-server connections, each predict taking
    50 ms: the model server never sees more than 4 at once. With a 1 s model timeout most wait too
    long: those are 503 with Retry-After; nothing else but 200."""
    from concurrent.futures import ThreadPoolExecutor

    scripted.delay_s = 0.05
    image = digits_by_class[2][0]
    with start_web("--serving-url", scripted.url, "--feedback-dir", tmp_path, "--model-connections", "4",
                   "--model-timeout", "1") as app:
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=200))
        with ThreadPoolExecutor(200) as pool:
            answers = list(pool.map(lambda _: session.post(f"{app.url}/api/predict", data=image, timeout=60,
                                                           headers={"Content-Type": "image/png"}), range(200)))
    statuses = collections.Counter(answer.status_code for answer in answers)
    assert set(statuses) <= {200, 503} and statuses[200] >= 4, statuses
    assert all(answer.headers.get("Retry-After") == "1" for answer in answers if answer.status_code == 503)
    assert scripted.most_in_flight <= 4


@pytest.mark.parametrize("detail, status", [
    ("too many requests in flight (limit 64); retry later", 503),  # digits serve's admission limit
    ("Received message larger than max (5000000 vs. 4194304)", 400),  # gRPC's own size limit: the image's fault
])
def test_grpc_resource_exhausted_is_told_apart(scripted_grpc_app, scripted_grpc, digits_by_class, detail, status):
    scripted_grpc.answer = ("RESOURCE_EXHAUSTED", detail)
    response = _predict(scripted_grpc_app, digits_by_class[2][0])
    assert response.status_code == status, response.text
    assert (response.headers.get("Retry-After") == "1") == (status == 503)


def test_a_version_unloaded_meanwhile_is_read_again_once(digits_by_class, tmp_path):
    """REST predicts name their version (the newest AVAILABLE one, from the model status); when it was
    unloaded since (TF Serving's 404), the app reads the status again and retries once, with what it reads now."""
    with ScriptedModelServer([[2], [3]], loaded={3}) as server, \
            start_web("--serving-url", server.url, "--feedback-dir", tmp_path) as app:
        response = _predict(app, digits_by_class[1][0])
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == 3
        assert server.requests == [f"GET {STATUS_PATH}", _predict_path(2), f"GET {STATUS_PATH}", _predict_path(3)]


def test_a_version_missing_again_after_the_reread_is_a_503_without_another_retry(digits_by_class, tmp_path):
    """The retry is once: the newly read version missing too is reported, not chased."""
    with ScriptedModelServer([[2], [3], [4]], loaded=set()) as server, \
            start_web("--serving-url", server.url, "--feedback-dir", tmp_path) as app:
        response = _predict(app, digits_by_class[1][0])
        assert server.requests == [f"GET {STATUS_PATH}", _predict_path(2), f"GET {STATUS_PATH}", _predict_path(3)]
        assert response.status_code == 503, response.text
        assert response.json()["error"] == ("the model server is unavailable: "
                                            "Servable not found for request: Specific(digits, 3)")
        assert _metrics(app)[(n.WEB_MODEL_SERVER_ERRORS, (("reason", "unavailable"),))] == 1



class ScriptedGrpcModelServer:
    """TF Serving's gRPC PredictionService played from a script, on loopback: each Predict gets the
    outputs in `answer` ({name: (values, shape)}, bytes values as a string tensor), or, when `answer`
    is a status code's name, fails with it. `predicts` counts the calls."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        self.answer: dict | str = GRPC_WELL_FORMED
        self.predicts = 0
        script = self

        class Service(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                script.predicts += 1
                if isinstance(script.answer, (str, tuple)):
                    code, detail = (script.answer, "scripted failure") if isinstance(script.answer, str) \
                        else script.answer
                    context.abort(getattr(grpc.StatusCode, code), detail)
                response = predict_pb2.PredictResponse()
                response.model_spec.name = request.model_spec.name
                response.model_spec.version.value = 1
                for name, (values, shape) in script.answer.items():
                    response.outputs[name].CopyFrom(_tensor(values, shape))
                return response

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Service(), self._server)
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> ScriptedGrpcModelServer:
        self._server.start()
        return self

    def __exit__(self, *_) -> None:
        self._server.stop(grace=None).wait(10)


def _tensor(values: list, shape: list[int]):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    dims = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape])
    if values and isinstance(values[0], bytes):
        return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=values, tensor_shape=dims)
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=values, tensor_shape=dims)


GRPC_WELL_FORMED = {contract.PROBABILITIES_OUTPUT: (WELL_FORMED_ROW[contract.PROBABILITIES_OUTPUT], [1, 10]),
                    contract.INK_FRACTION_OUTPUT: ([0.1], [1]),
                    contract.NORMALIZED_IMAGE_OUTPUT: ([0.0] * 28 * 28, [1, 28, 28])}
# What a model server may answer over gRPC instead of a digits model's answer: (outputs, reason, words).
MALFORMED_GRPC_ANSWERS = {
    "no outputs": ({}, "bad_answer", "has no 'probabilities'"),
    "no normalised image": ({name: GRPC_WELL_FORMED[name] for name in (contract.PROBABILITIES_OUTPUT,
                                                                        contract.INK_FRACTION_OUTPUT)},
                            "bad_answer", "has no 'normalized_image'"),
    "nine probabilities": ({**GRPC_WELL_FORMED, contract.PROBABILITIES_OUTPUT: ([0.1] * 9, [1, 9])},
                           "bad_answer", "9 probabilities; expected 10"),
    "a 27-row image": ({**GRPC_WELL_FORMED, contract.NORMALIZED_IMAGE_OUTPUT: ([0.0] * 27 * 28, [1, 27, 28])},
                       "bad_answer", "normalised image is not 28x28"),
    "values that do not fill the shape": ({**GRPC_WELL_FORMED, contract.PROBABILITIES_OUTPUT: ([0.1] * 10, [1, 12])},
                                          "bad_answer", "an output holds 10 values for the shape [1, 12]"),
    "strings for numbers": ({**GRPC_WELL_FORMED, contract.PROBABILITIES_OUTPUT: ([b"high"] * 10, [1, 10])},
                            "bad_answer", "an output of type DT_STRING, not a number"),
    "NaN probabilities": ({**GRPC_WELL_FORMED, contract.PROBABILITIES_OUTPUT: ([math.nan] * 10, [1, 10])},
                          "bad_answer", "not numbers (NaN or infinity)"),
    "an internal error": ("INTERNAL", "error", "answered INTERNAL: scripted failure"),
}


@pytest.fixture(scope="module")
def scripted_grpc():
    with ScriptedGrpcModelServer() as server:
        yield server


@pytest.fixture(scope="module")
def scripted_grpc_app(scripted_grpc, tmp_path_factory):
    """`digits web --grpc` in front of the scripted gRPC model server."""
    with start_web("--grpc", scripted_grpc.target, "--feedback-dir", tmp_path_factory.mktemp("scripted-grpc"),
                   timeout=120) as app:
        yield app


def test_a_well_formed_scripted_grpc_answer_is_shown(scripted_grpc_app, scripted_grpc, digits_by_class):
    """The scripted gRPC model server answers as TF Serving does: the 502s below are the malformation's."""
    scripted_grpc.answer = GRPC_WELL_FORMED
    response = _predict(scripted_grpc_app, digits_by_class[2][0])
    assert response.status_code == 200, response.text
    assert (response.json()["digit"], response.json()["model_version"]) == (9, 1)


@pytest.mark.parametrize("case", list(MALFORMED_GRPC_ANSWERS))
def test_a_malformed_grpc_answer_is_a_502_with_one_line(scripted_grpc_app, scripted_grpc, digits_by_class, case):
    """As over REST: in gRPC mode an answer that is not a digits model's is a 502 and one line, counted
    as the model server's failure, and nothing is counted as a prediction."""
    scripted_grpc.answer, reason, words = MALFORMED_GRPC_ANSWERS[case]
    predicts = scripted_grpc.predicts
    before = _metrics(scripted_grpc_app)
    response = _predict(scripted_grpc_app, digits_by_class[2][0])
    _assert_a_502_in_one_line(response, words)
    assert scripted_grpc.predicts == predicts + 1
    _check_counted_as_the_model_servers(before, _metrics(scripted_grpc_app), reason)


# -- feedback ---------------------------------------------------------------------------------------------


def _log(feedback_dir: Path) -> list[dict]:
    path = feedback_dir / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_correction_is_stored_as_a_labelled_png_with_a_log_line(web_app, feedback_dir, digits_by_class,
                                                                     model_server):
    from PIL import Image

    image = digits_by_class[4][1]
    answer = _predict(web_app, image).json()
    wrong = (answer["digit"] + 1) % 10
    before = len(_log(feedback_dir))
    response = _feedback(web_app, {"id": answer["id"], "digit": wrong})
    assert response.status_code == 200, response.text
    saved = response.json()
    assert saved["stored"] and not saved["right"]
    stored = feedback_dir / "pending" / str(wrong) / f"{saved['correction_id']}.png"  # until a reviewer decides
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert saved["correction_id"] == digest[:24] and "state" not in saved  # a stranger learns nothing of reviews
    # What is kept is what the model classified: its normalized_image, as MNIST's own format.
    [direct] = RestClient(model_server.rest_url).predict([image], with_image=True)
    assert stored.read_bytes() == digit_png(direct.normalized_image)
    with Image.open(stored) as png:
        assert (png.format, png.mode, png.size) == ("PNG", "L", (28, 28))
    [line] = _log(feedback_dir)[before:]
    assert line["predicted"] == answer["digit"] and line["corrected"] == wrong
    assert line["model_version"] == answer["model_version"] and line["sha256"] == digest
    assert line["confidence"] == pytest.approx(answer["confidence"], abs=1e-6)
    # Judged once: a second verdict on the same answer is refused, and nothing changes.
    again = _feedback(web_app, {"id": answer["id"], "digit": (wrong + 1) % 10})
    assert again.status_code == 409 and "already judged" in again.json()["error"]
    assert len(_log(feedback_dir)) == before + 1
    metrics = _metrics(web_app)
    key = (n.WEB_FEEDBACK, (("corrected_class", str(wrong)), ("model_name", "digits"),
                            ("model_version", str(answer["model_version"])),
                            ("predicted_class", str(answer["digit"])), ("verdict", "corrected")))
    assert metrics[key] >= 1
    # Every (predicted, corrected) pair of the version exists from its first answer on, so that
    # rate() sees the first correction of each.
    pairs = [labels for name, labels in metrics if name == n.WEB_FEEDBACK
             and dict(labels)["model_version"] == str(answer["model_version"])]
    assert len(pairs) == 100


def test_simultaneous_judgements_of_one_answer_are_taken_once(scripted, digits_by_class, tmp_path):
    """24 corrections of one answer at the same moment: one is stored and counted, 23 get 409,
    one log line, one image."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    feedback = tmp_path / "feedback"
    with start_web("--serving-url", scripted.url, "--feedback-dir", feedback) as app:
        answer = _predict(app, digits_by_class[9][0]).json()
        assert answer["digit"] == 9
        start = threading.Barrier(24)

        def judge(digit: int) -> int:
            start.wait(10)
            return _feedback(app, {"id": answer["id"], "digit": digit}).status_code

        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(judge, [index % 9 for index in range(24)]))
        assert sorted(statuses) == [200] + [409] * 23
        assert len(_log(feedback)) == 1 and len(list(feedback.rglob("*.png"))) == 1
        counted = sum(value for (name, labels), value in _metrics(app).items()
                      if name == n.WEB_FEEDBACK and dict(labels)["verdict"] == "corrected")
        assert counted == 1


def test_a_right_answer_is_counted_and_stores_nothing(web_app, feedback_dir, digits_by_class):
    answer = _predict(web_app, digits_by_class[5][2]).json()
    files_before = sorted(feedback_dir.rglob("*.png")) if feedback_dir.exists() else []
    log_before = len(_log(feedback_dir))
    response = _feedback(web_app, {"id": answer["id"], "digit": answer["digit"]})
    assert response.status_code == 200 and response.json() == {
        "right": True, "stored": False, "message": f"Thanks: {answer['digit']} noted as right."}
    assert (sorted(feedback_dir.rglob("*.png")) if feedback_dir.exists() else []) == files_before
    assert len(_log(feedback_dir)) == log_before
    digit = str(answer["digit"])
    key = (n.WEB_FEEDBACK, (("corrected_class", digit), ("model_name", "digits"),
                            ("model_version", str(answer["model_version"])), ("predicted_class", digit),
                            ("verdict", "right")))
    assert _metrics(web_app)[key] >= 1


def test_the_same_image_is_stored_once_where_it_was_first_proposed(web_app, feedback_dir, digits_by_class):
    image = digits_by_class[6][3]
    first, second, third = (_predict(web_app, image).json() for _ in range(3))
    wrong = (first["digit"] + 2) % 10
    other = (first["digit"] + 3) % 10
    saved = _feedback(web_app, {"id": first["id"], "digit": wrong}).json()
    assert not saved["duplicate"]
    name = f"{saved['correction_id']}.png"
    assert _feedback(web_app, {"id": second["id"], "digit": wrong}).json()["duplicate"]
    assert [p.relative_to(feedback_dir).as_posix() for p in feedback_dir.rglob(name)] == [f"pending/{wrong}/{name}"]
    assert _feedback(web_app, {"id": third["id"], "digit": other}).json()["duplicate"]  # logged, not moved
    assert [p.relative_to(feedback_dir).as_posix() for p in feedback_dir.rglob(name)] == [f"pending/{wrong}/{name}"]
    assert [line["corrected"] for line in _log(feedback_dir) if line["image"].endswith(name)] == [wrong, wrong, other]


@pytest.mark.parametrize("document", [
    {"id": "../../etc/passwd", "digit": 3},
    {"id": "0" * 32, "digit": "../../x"},
    {"id": "0" * 32, "digit": 10},
    {"id": "0" * 32, "digit": -1},
    {"id": "0" * 32, "digit": True},
    {"id": "0" * 32, "digit": 3.0},
    {"id": "0" * 32},
    [1, 2],
    "not json",
])
def test_bad_feedback_is_a_400_and_writes_nothing(web_app, feedback_dir, document):
    before = sorted(p for p in feedback_dir.rglob("*")) if feedback_dir.exists() else []
    body = document if isinstance(document, str) else json.dumps(document)
    response = requests.post(f"{web_app.url}/api/feedback", data=body, timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "\n" not in response.json()["error"]
    assert (sorted(p for p in feedback_dir.rglob("*")) if feedback_dir.exists() else []) == before


def test_hostile_feedback_bodies_get_one_json_line(scripted, scripted_app):
    """Nested thousands deep (Python's json recurses): 400, not a 500; chunked past the 4,096 bytes
    feedback takes: 413 once the limit is passed, however long it would go on."""
    response = requests.post(f"{scripted_app.url}/api/feedback", data="[" * 2000 + "]" * 2000, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"].startswith("send JSON"), response.text
    # A chunked body that goes on: the answer comes once 4,096 bytes have passed, while the body is
    # still open (before, the app waited for all of it, in memory).
    host, port = urlsplit(scripted_app.url).hostname, urlsplit(scripted_app.url).port
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(b"POST /api/feedback HTTP/1.1\r\nHost: " + f"{host}:{port}".encode()
                    + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):
            raw.sendall(b"3e8\r\n" + b" " * 1000 + b"\r\n")
        answer = raw.recv(65536).decode()
    status, _, rest = answer.partition("\r\n")
    assert status == "HTTP/1.1 413 Request Entity Too Large", answer
    assert json.loads(rest.split("\r\n\r\n", 1)[1]) == {
        "error": "the request is larger than the 4,096 bytes this endpoint takes"}


def test_other_sites_and_other_host_names_are_refused_and_counted(scripted, scripted_app, digits_by_class):
    """What a hostile page can make a visitor's browser send: a cross-site POST (its Origin and
    Sec-Fetch-Site say so), a text/plain "simple" POST of a correction (no preflight), and, after
    DNS rebinding, its own host name. Each is refused before any handler runs, and counted."""
    answer = _predict(scripted_app, digits_by_class[9][2]).json()
    url, host = scripted_app.url, urlsplit(scripted_app.url).netloc
    correction = json.dumps({"id": answer["id"], "digit": 4})
    json_type = {"Content-Type": "application/json"}
    cases = [
        ("feedback", {**json_type, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, 403),
        ("feedback", {**json_type, "Origin": "https://evil.example"}, 403),  # an older browser: Origin only
        ("feedback", {"Content-Type": "text/plain", "Sec-Fetch-Site": "same-origin"}, 415),
        ("feedback", {**json_type, "Host": "evil.example:8080", "Origin": "http://evil.example:8080",
                      "Sec-Fetch-Site": "same-origin"}, 421),  # DNS rebinding: the page's own origin
        ("predict", {"Content-Type": "image/png", "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
         403),
    ]
    before = _metrics(scripted_app)
    for endpoint, headers, status in cases:
        body = correction if endpoint == "feedback" else digits_by_class[9][2]
        response = requests.post(f"{url}/api/{endpoint}", data=body, headers=headers, timeout=30)
        assert response.status_code == status, (headers, response.text)
        assert "\n" not in response.json()["error"]
    assert requests.get(url, headers={"Host": "rebound.example"}, timeout=30).status_code == 421
    after = _metrics(scripted_app)
    refused = {(dict(labels)["endpoint"], dict(labels)["outcome"]): value - before.get((name, labels), 0)
               for (name, labels), value in after.items() if name == n.WEB_REQUESTS}
    assert refused[("feedback", "cross_site")] == 2 and refused[("feedback", "unsupported_media_type")] == 1
    assert refused[("feedback", "misdirected")] == 1 and refused[("predict", "cross_site")] == 1
    assert refused[("other", "misdirected")] == 1
    # The page's own requests pass: same origin, by the loopback name or the address.
    same = requests.post(f"{url}/api/feedback", data=correction, timeout=30,
                         headers={**json_type, "Origin": url, "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200, same.text
    assert requests.get(url.replace("127.0.0.1", "localhost"), timeout=30).status_code == 200
    assert host.startswith("127.0.0.1:")


def test_one_client_is_rate_limited_and_cannot_evict_other_peoples_answers(scripted, digits_by_class, tmp_path):
    """Past its predicts (or judgements) per minute a client gets 429 with Retry-After, counted; and
    its flood of answers pushes out its own oldest, not the answers others are about to judge."""
    image = digits_by_class[2][0]
    with start_web("--serving-url", scripted.url, "--feedback-dir", tmp_path, "--predicts-per-minute", "5",
                   "--feedback-per-minute", "2") as app:
        statuses = [_predict(app, image) for _ in range(7)]
        assert [r.status_code for r in statuses] == [200] * 5 + [429] * 2
        limited = statuses[-1]
        assert 1 <= int(limited.headers["Retry-After"]) <= 12, limited.headers
        assert limited.json()["error"].startswith("too many requests from this address")
        ids = [r.json()["id"] for r in statuses[:5]]
        judged = [_feedback(app, {"id": answer_id, "digit": 3}).status_code for answer_id in ids[:3]]
        assert judged == [200, 200, 429]
        counted = {dict(labels)["endpoint"]: value for (name, labels), value in _metrics(app).items()
                   if name == n.WEB_REQUESTS and dict(labels)["outcome"] == "rate_limited"}
        assert counted == {"predict": 2, "feedback": 1}


def test_the_answers_kept_are_shared_fairly_between_clients():
    from web.app import RecentAnswers, RateLimiter

    recent = RecentAnswers(max_count=100, per_client=3)
    theirs = recent.add("their answer", client="10.0.0.2")
    mine = [recent.add(f"mine {index}", client="10.0.0.1") for index in range(50)]
    assert recent.get(theirs) == "their answer"  # 50 of mine evicted only mine
    assert [recent.get(answer_id) for answer_id in mine[-3:]] == ["mine 47", "mine 48", "mine 49"]
    assert recent.get(mine[0]) is None
    assert recent.claim(mine[0], 3) is None and recent.claim(mine[-1], 3) is None  # a forgotten one is not claimed
    assert recent.claim(mine[-1], 4) == 3
    # The overall bound still holds across many clients, the oldest out first.
    crowded = RecentAnswers(max_count=4, per_client=3)
    kept = [crowded.add(index, client=f"10.0.1.{index}") for index in range(6)]
    assert [crowded.get(answer_id) for answer_id in kept] == [None, None, 2, 3, 4, 5]
    # The token bucket: a minute's worth at once, then one every 60/rate seconds.
    now = [0.0]
    limiter = RateLimiter(per_minute=6, max_clients=2, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(6)] == [0.0] * 6
    assert limiter.take("a") == pytest.approx(10.0)
    now[0] = 10.0
    assert limiter.take("a") == 0.0 and limiter.take("b") == 0.0 and limiter.take("c") == 0.0
    assert limiter.take("a") == 0.0  # three clients in a table of two: the longest idle, a, was forgotten


def test_decodes_and_predicts_wait_their_turn_and_a_long_wait_is_a_503(tmp_path):
    """At most `decode_slots` uploads are decoded at once (a 4096x4096 photo is ~64 MB decoded); the
    rest wait, and one that would wait past the model timeout is told the app is busy."""
    import asyncio

    from web.app import RequestError, WebApp

    app = WebApp(WebConfig(decode_slots=2, model_timeout_s=0.3, feedback_dir=tmp_path), model_server=object())
    running, peak = 0, 0

    async def work(seconds: float) -> float:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(seconds)
        running -= 1
        return seconds

    async def main() -> None:
        busy = RequestError(503, "busy", "busy")
        assert await asyncio.gather(*(app._in_turn(app._decode_slots, busy, work, 0.05) for _ in range(8))) == [
            0.05] * 8
        assert peak == 2
        waited = await asyncio.gather(*(app._in_turn(app._decode_slots, busy, work, 0.5) for _ in range(3)),
                                      return_exceptions=True)
        assert waited.count(busy) == 1 and waited.count(0.5) == 2

    # In a thread of its own: Playwright's sync API may have left an event loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, main()).result(timeout=60)


def test_which_host_names_the_app_answers():
    from web.app import _host_name

    assert WebConfig().hosts_answered == ("localhost", "127.0.0.1", "::1")  # listening on loopback
    assert WebConfig(host="0.0.0.0").hosts_answered is None  # behind a proxy: any, unless given
    assert WebConfig(host="0.0.0.0", allowed_hosts=("Digits.Example",)).hosts_answered == ("digits.example",)
    assert WebConfig(allowed_origins=("https://forms.example/",)).allowed_origins == ("https://forms.example",)
    for bad in ({"allowed_hosts": ("http://digits.example",)}, {"allowed_hosts": ("digits.example:80",)},
                {"allowed_origins": ("forms.example",)}, {"allowed_origins": ("https://forms.example/app",)}):
        with pytest.raises(ValueError, match="--allowed-"):
            WebConfig(**bad)
    assert [_host_name(h) for h in ("127.0.0.1:8080", "[::1]:8080", "LocalHost", "evil.example:80", None)] == [
        "127.0.0.1", "::1", "localhost", "evil.example", ""]


def test_no_version_or_heap_address_is_shown(scripted, scripted_app, digits_by_class):
    for path in ("/", "/api/model", "/api/nothing", "/static/style.css", "/metrics"):
        server = requests.get(f"{scripted_app.url}{path}", timeout=30).headers.get("Server")
        assert server == "digits-web", (path, server)
    scripted.answer = (400, json.dumps({"error": "cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>"}))
    response = _predict(scripted_app, digits_by_class[2][0])
    assert response.status_code == 400
    assert response.json()["error"] == (
        "the model server refused the image: cannot identify image file <_io.BytesIO object>")


def test_feedback_on_an_unknown_answer_is_a_410(web_app):
    response = _feedback(web_app, {"id": "0" * 32, "digit": 3})
    assert response.status_code == 410 and "classify the digit again" in response.json()["error"]


def test_store_writes_28x28_gray_pngs_only_inside_its_directory(tmp_path):
    from PIL import Image

    store = FeedbackStore(tmp_path / "fb")
    picture = [[(x * y) / (27 * 27) for x in range(28)] for y in range(28)]
    record = store.add(picture, predicted=4, corrected=9, confidence=0.7, model_name="digits", model_version=1)
    stored = tmp_path / "fb" / record.image
    assert stored.parent == tmp_path / "fb" / "pending" / "9"
    with Image.open(stored) as png:
        assert (png.format, png.mode, png.size) == ("PNG", "L", (28, 28))
        assert png.getpixel((27, 27)) == 255 and png.getpixel((0, 0)) == 0
    for corrected in (10, -1, "3", None, True):
        with pytest.raises(ValueError):
            store.add(picture, predicted=4, corrected=corrected, confidence=0.5, model_name="digits", model_version=1)
    with pytest.raises(ValueError, match="not 28x28"):
        store.add([[0.5] * 10] * 10, predicted=4, corrected=3, confidence=0.5, model_name="digits", model_version=1)
    # A symlinked label directory that points outside is refused, not followed.
    (tmp_path / "fb" / "pending" / "2").symlink_to(tmp_path)
    other = [[0.25] * 28] * 28
    with pytest.raises(ValueError, match="outside the feedback directory"):
        store.add(other, predicted=4, corrected=2, confidence=0.5, model_name="digits", model_version=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fb"]
    assert store.counts() == {"pending": 1, "accepted": 0, "rejected": 0}


def _store_state(root: Path) -> tuple[list[str], list[str]]:
    """(image files under the store, relative; log lines): what a crash at any step may leave."""
    images = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.png"))
    log = (root / LOG_NAME).read_text().splitlines() if (root / LOG_NAME).exists() else []
    return images, log


@pytest.mark.parametrize("step", ["image write", "rename", "log line", "log fsync"])
def test_a_failed_step_leaves_neither_the_image_nor_the_log_line_without_the_other(tmp_path, monkeypatch, step):
    """Each step of storing a correction made to fail in turn: the store is left as it was (the first
    correction, once, with its line), the error reaches the caller, and the next try succeeds."""
    import web.feedback as feedback

    store = FeedbackStore(tmp_path / "fb")
    first = [[0.25] * 28] * 28
    store.add(first, predicted=4, corrected=3, confidence=0.5, model_name="digits", model_version=1)
    before = _store_state(tmp_path / "fb")
    picture = [[(x * y) / (27 * 27) for x in range(28)] for y in range(28)]

    def broken(*_, **__):
        raise OSError(28, "No space left on device")

    target = {"image write": (feedback.os, "fdopen"), "rename": (feedback.os, "replace"),
              "log line": (feedback.os, "write"), "log fsync": (feedback.os, "fsync")}[step]
    with monkeypatch.context() as patched:
        if step == "log fsync":  # the image's own fsyncs pass; the log's (the last) fails
            real, calls = os.fsync, []

            def fsync(descriptor):
                calls.append(descriptor)
                if len(calls) > 2:
                    broken()
                return real(descriptor)
            patched.setattr(*target, fsync)
        else:
            patched.setattr(*target, broken)
        with pytest.raises(OSError, match="No space left"):
            store.add(picture, predicted=4, corrected=9, confidence=0.7, model_name="digits", model_version=1)
    assert _store_state(tmp_path / "fb") == before
    # The same image moved to another digit: a failed log line moves it back.
    with monkeypatch.context() as patched:
        patched.setattr(feedback.os, "write", broken)
        with pytest.raises(OSError):
            store.add(first, predicted=4, corrected=5, confidence=0.5, model_name="digits", model_version=1)
    assert _store_state(tmp_path / "fb") == before
    store.add(picture, predicted=4, corrected=9, confidence=0.7, model_name="digits", model_version=1)
    images, log = _store_state(tmp_path / "fb")
    assert len(images) == 2 and len(log) == 2


def test_a_short_write_still_appends_the_whole_log_line(tmp_path, monkeypatch):
    import web.feedback as feedback

    real = os.write
    monkeypatch.setattr(feedback.os, "write", lambda descriptor, data: real(descriptor, bytes(data[:7])))
    store = FeedbackStore(tmp_path / "fb")
    record = store.add([[0.5] * 28] * 28, predicted=1, corrected=7, confidence=0.9, model_name="digits",
                       model_version=3)
    [line] = (tmp_path / "fb" / LOG_NAME).read_text().splitlines()
    assert json.loads(line)["sha256"] == record.sha256


def test_a_correction_that_could_not_be_stored_can_be_sent_again(scripted, digits_by_class, tmp_path):
    """The store fails (its training directory is a file): 500, nothing stored, and the answer is not
    marked judged, so the same correction succeeds once the store works."""
    feedback_root = tmp_path / "feedback"
    feedback_root.mkdir()
    (feedback_root / "pending").write_text("not a directory")
    with start_web("--serving-url", scripted.url, "--feedback-dir", feedback_root) as app:
        answer = _predict(app, digits_by_class[9][1]).json()
        failed = _feedback(app, {"id": answer["id"], "digit": 4})
        assert failed.status_code == 500 and "nothing was stored" in failed.json()["error"]
        assert _log(feedback_root) == []
        (feedback_root / "pending").unlink()
        again = _feedback(app, {"id": answer["id"], "digit": 4})
        assert again.status_code == 200 and again.json()["stored"], again.text
        assert len(_log(feedback_root)) == 1


# -- metrics ----------------------------------------------------------------------------------------------


def test_metrics_use_the_shared_names_and_labels(web_app, digits_by_class):
    """The families on the page, answers, feedback and reference profile included, are the ones declared in
    monitoring/names.py, with their kinds, labels and buckets; none undeclared."""
    answer = _predict(web_app, digits_by_class[7][4]).json()
    _predict(web_app, b"nope")
    assert _feedback(web_app, {"id": answer["id"], "digit": answer["digit"]}).status_code == 200
    assert declaration_problems(requests.get(f"{web_app.url}/metrics", timeout=10).text) == []
    metrics = _metrics(web_app)
    version = str(answer["model_version"])
    assert metrics[(n.PREDICTIONS, (("model_name", "digits"), ("model_version", version),
                                    ("predicted_class", str(answer["digit"]))))] >= 1
    assert metrics[(f"{n.CONFIDENCE}_count", (("model_name", "digits"), ("model_version", version)))] >= 1
    buckets = {dict(labels)["le"] for name, labels in metrics if name == f"{n.CONFIDENCE}_bucket"}
    assert buckets == {n.bucket_label(b) for b in n.CONFIDENCE_BUCKETS} | {"+Inf"}
    assert metrics[(n.WEB_REQUESTS, (("endpoint", "predict"), ("outcome", "ok")))] >= 1
    assert metrics[(n.WEB_REQUESTS, (("endpoint", "predict"), ("outcome", "bad_request")))] >= 1
    assert metrics[(f"{n.WEB_REQUEST_DURATION}_count", (("endpoint", "predict"), ("outcome", "ok")))] >= 1
    assert not any(name.endswith("_created") for name, _ in metrics)


def test_bad_options_are_one_line_errors(tmp_path):
    from conftest import run_digits

    (tmp_path / "file").write_text("x")
    for args, message in [
        (["--serving-url", "localhost:8501"], "must be an http(s) URL"),
        (["--serving-url", "http://127.0.0.1:8501", "--grpc", "127.0.0.1:8500"], "not both"),
        (["--grpc", "nohost"], "HOST:PORT"),
        (["--feedback-dir", str(tmp_path / "file")], "is not a directory"),
        (["--model-timeout", "0"], "must be positive"),
    ]:
        result = run_digits("web", "--port", "0", *args, timeout=60)
        assert result.returncode != 0, args
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_answering_versions_reference_profile_is_exported(web_app, pushed_model, digits_by_class):
    """With --model-dir, the drift rules get each answering version's reference from the web app too."""
    from components.reference import read_reference_profile

    answer = _predict(web_app, digits_by_class[0][5]).json()
    version = str(answer["model_version"])
    profile = read_reference_profile(str(pushed_model / version))
    metrics = _metrics(web_app)
    shares = {dict(labels)["class"]: value for (name, labels), value in metrics.items()
              if name == n.REFERENCE_CLASS_SHARE and dict(labels)["model_version"] == version}
    assert shares == pytest.approx(profile["class_share"])
    assert metrics[(n.REFERENCE_EXAMPLES, (("model_name", "digits"), ("model_version", version)))] == \
        profile["examples"]
    assert metrics[(n.REFERENCE_CONFIDENCE_MEAN, (("model_name", "digits"), ("model_version", version)))] == \
        pytest.approx(profile["confidence_mean"])
