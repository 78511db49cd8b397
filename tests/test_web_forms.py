"""POST /api/read-sheet: `digits web --form` over real HTTP on loopback in front of a real `digits serve`, reading
generated photos of a small form as `digits read --form --json --marked` does, with its metrics.

As in tests/test_forms_read.py, the server serves a copy of the tiny model that answers 7 for every image:
which boxes hold ink decides every number (777 against 77), so what is under test is the path from the
photo through the web app's model-server client to the verdict, not the model's reading.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import run_digits
from monitoring import names as n
from form_sheets import photo
from web.config import WebConfig
from web.process import start_web

pytestmark = [pytest.mark.slow]

FORM = "ballot-account"  # FORM_YAML's name: the `form` label of the sheet metrics
CHECK = "every ballot issued is counted"


@pytest.fixture(scope="module")
def sheets_app(sevens_server, form_file, tmp_path_factory):
    with start_web("--serving-url", sevens_server.rest_url, "--form", form_file,
                   "--feedback-dir", tmp_path_factory.mktemp("feedback")) as app:
        yield app


def _read_sheet(app, body: bytes) -> requests.Response:
    return requests.post(f"{app.url}/api/read-sheet", data=body, timeout=60)


def _metrics(app) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{app.url}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _sheets(metrics: dict, outcome: str) -> float:
    return metrics[(n.WEB_SHEETS, (("form", FORM), ("outcome", outcome)))]


def _marked(answer: dict):
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert answer["marked"].startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(answer["marked"][len(prefix):])))


def test_a_sheet_is_read_as_digits_read_reads_it(sheets_app, sevens_server, form_file, tmp_path):
    """The values, checks and verdict of the page's API are `digits read --json`'s for the same photo, the
    marked sheet is a PNG no larger than 1600 px a side, and the counters say what was read."""
    sheet = photo(form_file, {"issued": 77, "counted": 77}, tmp_path, "consistent")
    before = _metrics(sheets_app)
    response = _read_sheet(sheets_app, sheet.read_bytes())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["verdict"] == "accepted" and answer["accepted"] is True and answer["turned"] == 0
    assert {k: c["value"] for k, c in answer["counts"].items()} == {"issued": 77, "counted": 77}
    assert answer["counts"]["issued"]["boxes"][0] is None  # the empty hundreds box: a blank, not a 0
    assert [c["holds"] for c in answer["checks"]] == [True]

    cli = run_digits("read", "--form", form_file, sheet, "--rest", sevens_server.rest_url, "--json")
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    del expected["image"]
    assert {k: v for k, v in answer.items() if k not in ("marked", "verdict")} == expected

    marked = _marked(answer)
    assert marked.format == "PNG" and max(marked.size) <= 1600
    pixels = np.asarray(marked.convert("RGB")).astype(int)
    green = (pixels[..., 1] > 100) & (pixels[..., 0] < 60) & (pixels[..., 2] < 90)
    assert green.sum() > 200  # the accepted boxes outlined in green

    after = _metrics(sheets_app)
    assert _sheets(after, "accepted") - _sheets(before, "accepted") == 1
    counts = (n.WEB_SHEET_COUNTS, (("form", FORM), ("outcome", "accepted")))
    assert after[counts] - before[counts] == 2
    ok = (n.WEB_REQUESTS, (("endpoint", n.WEB_READ_SHEET_ENDPOINT), ("outcome", "ok")))
    assert after[ok] - before.get(ok, 0) == 1


def test_a_planted_wrong_total_is_inconsistent_and_counted(sheets_app, form_file, tmp_path):
    sheet = photo(form_file, {"issued": 777, "counted": 77}, tmp_path, "planted", turned=True, seed=1)
    before = _metrics(sheets_app)
    response = _read_sheet(sheets_app, sheet.read_bytes())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["verdict"] == "inconsistent" and answer["accepted"] is False and answer["turned"] == 180
    assert {k: c["value"] for k, c in answer["counts"].items()} == {"issued": 777, "counted": 77}
    assert answer["checks"] == [{"name": CHECK, "equation": "counted = issued", "holds": False, "sum": 77,
                                 "total": 777}]
    assert answer["counts"]["issued"]["review_boxes"] == [1, 2, 3]  # every written box of a failing check
    pixels = np.asarray(_marked(answer).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 300  # outlined in red for the person

    after = _metrics(sheets_app)
    assert _sheets(after, "inconsistent") - _sheets(before, "inconsistent") == 1
    failures = (n.WEB_SHEET_CHECK_FAILURES, (("check", CHECK), ("form", FORM)))
    assert after[failures] - before[failures] == 1
    assert _sheets(after, "accepted") == _sheets(before, "accepted")


def test_what_is_no_sheet_is_a_one_line_4xx_counted_unreadable(sheets_app):
    from PIL import Image

    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 700), dtype=np.uint8)).save(noise, "PNG")
    too_large = b"\xff\xd8\xff" + bytes(5_000_000)  # the app takes WebConfig.max_image_bytes, 4 MiB
    before = _metrics(sheets_app)
    cases = [(b"not an image", 415, "not a PNG or JPEG image"),
             (noise.getvalue(), 422, "not a form: no printed frame found"),
             (too_large, 413, f"the request is 5.0 MB; the most this endpoint takes is "
                              f"{WebConfig.max_image_bytes / 1e6:.1f} MB")]
    for body, status, message in cases:
        response = _read_sheet(sheets_app, body)
        assert (response.status_code, response.json()) == (status, {"error": message})
    after = _metrics(sheets_app)
    assert _sheets(after, "unreadable") - _sheets(before, "unreadable") == len(cases)
    assert _sheets(after, "accepted") == _sheets(before, "accepted")
    refused = (n.WEB_REQUESTS, (("endpoint", n.WEB_READ_SHEET_ENDPOINT), ("outcome", "not_a_form")))
    assert after[refused] - before.get(refused, 0) == 1
    assert "Traceback" not in "".join(sheets_app.output)


def test_the_model_server_down_is_the_503_predict_gives(form_file, tmp_path):
    sheet = photo(form_file, {"issued": 77, "counted": 77}, tmp_path, "good")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    with start_web("--serving-url", f"http://127.0.0.1:{port}", "--feedback-dir", tmp_path, "--form",
                   form_file) as app:
        response = _read_sheet(app, sheet.read_bytes())
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json() == {"error": "cannot reach the model server (ClientConnectorError)"}
        metrics = _metrics(app)
        assert metrics[(n.WEB_MODEL_SERVER_ERRORS, (("reason", "unavailable"),))] == 1
        assert _sheets(metrics, "unreadable") == 0  # the model server's fault, not the photo's
        # Every sheet series of the form is there from the start, at 0.
        assert {labels: value for (name, labels), value in metrics.items() if name == n.WEB_SHEETS} == {
            (("form", FORM), ("outcome", outcome)): 0 for outcome in n.SHEET_OUTCOMES}


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_the_model_server_client_answers_a_batch_in_order(sevens_server, transport):
    """A batch larger than one request takes is split and answered in order (the blank cells say so)."""
    from PIL import Image

    from web import model_server as ms

    def png(ink: int) -> bytes:
        pixels = np.zeros((28, 28), np.uint8)
        pixels[6:22, 12:16] = ink
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        return out.getvalue()

    images = [png(255), png(0), png(255), png(255), png(0)]
    config = (WebConfig(serving_url=sevens_server.rest_url) if transport == "rest"
              else WebConfig(serving_url=None, grpc_target=sevens_server.grpc_target))

    async def ask():
        client = ms.connect(config)
        try:
            return await client.predict_batch(images, 2)
        finally:
            await client.close()

    # In a thread of its own: the session's headless browser (Playwright's sync API) keeps an event loop
    # running in this one once a browser test has run.
    with ThreadPoolExecutor(1) as pool:
        answers = pool.submit(asyncio.run, ask()).result(timeout=60)
    assert [answer.blank for answer in answers] == [False, True, False, False, True]
    assert {answer.digit for answer in answers if not answer.blank} == {7}
