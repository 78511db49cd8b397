"""`digits web`'s backend over real HTTP on loopback, in front of a real `digits serve` (REST and gRPC)."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from data import contract
from monitoring import names as n
from serving.client import RestClient
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
    return requests.post(f"{app.url}/api/feedback", data=json.dumps(document), timeout=30)


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
    assert info["model_name"] == "digits" and info["model_server"] == model_server.rest_url
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
        assert f"127.0.0.1:{port}" in response.json()["error"]
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
    stored = feedback_dir / saved["image"]
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert stored == feedback_dir / "training" / str(wrong) / f"{digest[:24]}.png"
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


def test_the_same_image_is_stored_once_and_moves_with_a_newer_correction(web_app, feedback_dir, digits_by_class):
    image = digits_by_class[6][3]
    first, second, third = (_predict(web_app, image).json() for _ in range(3))
    wrong = (first["digit"] + 2) % 10
    other = (first["digit"] + 3) % 10
    saved = _feedback(web_app, {"id": first["id"], "digit": wrong}).json()
    assert not saved["duplicate"]
    name = Path(saved["image"]).name
    assert _feedback(web_app, {"id": second["id"], "digit": wrong}).json()["duplicate"]
    assert [p.relative_to(feedback_dir).as_posix() for p in feedback_dir.rglob(name)] == [f"training/{wrong}/{name}"]
    assert _feedback(web_app, {"id": third["id"], "digit": other}).json()["duplicate"]
    assert [p.relative_to(feedback_dir).as_posix() for p in feedback_dir.rglob(name)] == [f"training/{other}/{name}"]
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
    response = requests.post(f"{web_app.url}/api/feedback", data=body, timeout=10)
    assert response.status_code == 400, response.text
    assert "\n" not in response.json()["error"]
    assert (sorted(p for p in feedback_dir.rglob("*")) if feedback_dir.exists() else []) == before


def test_feedback_on_an_unknown_answer_is_a_410(web_app):
    response = _feedback(web_app, {"id": "0" * 32, "digit": 3})
    assert response.status_code == 410 and "classify the digit again" in response.json()["error"]


def test_store_writes_28x28_gray_pngs_only_inside_its_directory(tmp_path):
    from PIL import Image

    store = FeedbackStore(tmp_path / "fb")
    picture = [[(x * y) / (27 * 27) for x in range(28)] for y in range(28)]
    record = store.add(picture, predicted=4, corrected=9, confidence=0.7, model_name="digits", model_version=1)
    stored = tmp_path / "fb" / record.image
    assert stored.parent == tmp_path / "fb" / "training" / "9"
    with Image.open(stored) as png:
        assert (png.format, png.mode, png.size) == ("PNG", "L", (28, 28))
        assert png.getpixel((27, 27)) == 255 and png.getpixel((0, 0)) == 0
    for corrected in (10, -1, "3", None, True):
        with pytest.raises(ValueError):
            store.add(picture, predicted=4, corrected=corrected, confidence=0.5, model_name="digits", model_version=1)
    with pytest.raises(ValueError, match="not 28x28"):
        store.add([[0.5] * 10] * 10, predicted=4, corrected=3, confidence=0.5, model_name="digits", model_version=1)
    # A symlinked label directory that points outside is refused, not followed.
    (tmp_path / "fb" / "training" / "2").symlink_to(tmp_path)
    other = [[0.25] * 28] * 28
    with pytest.raises(ValueError, match="outside the feedback directory"):
        store.add(other, predicted=4, corrected=2, confidence=0.5, model_name="digits", model_version=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fb"]
    assert store.count() == 1


# -- metrics ----------------------------------------------------------------------------------------------


def test_metrics_use_the_shared_names_and_labels(web_app, digits_by_class):
    answer = _predict(web_app, digits_by_class[7][4]).json()
    _predict(web_app, b"nope")
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
