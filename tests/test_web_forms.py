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


TOKEN = "sheet-review-token-0123456789"


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feedback")


@pytest.fixture(scope="module")
def sheets_app(sevens_server, form_file, feedback_dir, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN)
    with start_web("--serving-url", sevens_server.rest_url, "--form", form_file, "--feedback-dir", feedback_dir,
                   "--review-token-file", token) as app:
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
    assert {k: v for k, v in answer.items() if k not in ("marked", "verdict", "review")} == expected
    assert answer["review"] is None  # accepted: nobody needs to look at it

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


def _sheets_api(app, method: str, path: str = "", token: str | None = TOKEN, **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, f"{app.url}/api/sheets{path}", headers=headers, timeout=30, **kwargs)


def _gauge(metrics: dict, name: str) -> float | None:
    return metrics.get((name, (("form", FORM),)))


def test_a_sheet_for_a_person_waits_until_a_reviewer_reads_its_boxes(sheets_app, feedback_dir, form_file, tmp_path):
    """The planted sheet is answered as inconsistent and queued; the reviewers' API gives its marked photo and
    the image of each written box; the reviewer reads box 1 of "issued" as a 1 (the model said 7), and the
    decision is recorded with the sums as written, the box becomes a training digit and the gauges follow."""
    from PIL import Image

    sheet = photo(form_file, {"issued": 777, "counted": 77}, tmp_path, "queued", seed=5)
    answer = _read_sheet(sheets_app, sheet.read_bytes()).json()
    assert answer["verdict"] == "inconsistent"
    assert answer["review"]["queued"] is True and answer["review"]["state"] == "pending"
    sheet_id = answer["review"]["id"]
    again = _read_sheet(sheets_app, sheet.read_bytes()).json()["review"]
    assert again == answer["review"]  # the same photo waits once

    queue = _sheets_api(sheets_app, "GET")
    assert queue.status_code == 200, queue.text
    listing = queue.json()
    assert sheet_id in [item["id"] for item in listing["pending"]]
    assert listing["form"]["counts"] == [{"id": "issued", "label": "Ballots issued", "digits": 3},
                                         {"id": "counted", "label": "Ballots counted", "digits": 3}]
    waiting = listing["counts"]["pending"]
    metrics = _metrics(sheets_app)
    assert _gauge(metrics, n.WEB_SHEETS_PENDING) == waiting >= 1
    assert _gauge(metrics, n.WEB_SHEET_OLDEST_PENDING) > 0

    shown = _sheets_api(sheets_app, "GET", f"/{sheet_id}").json()
    assert "client" not in shown and shown["reading"]["verdict"] == "inconsistent"
    prefix = "data:image/jpeg;base64,"
    assert shown["marked"].startswith(prefix)
    marked = Image.open(io.BytesIO(base64.b64decode(shown["marked"][len(prefix):])))
    assert marked.format == "JPEG" and max(marked.size) <= 1600
    assert sorted(shown["cells"]) == ["counted.2", "counted.3", "issued.1", "issued.2", "issued.3"]
    assert np.asarray(shown["cells"]["issued.1"]).shape == (28, 28) and np.asarray(shown["cells"]["issued.1"]).max() > 0

    decided = _sheets_api(sheets_app, "POST", json={"id": sheet_id, "verdict": "confirmed",
                                                    "boxes": {"issued": [1, 7, 7], "counted": [None, 7, 7]}})
    assert decided.status_code == 200, decided.text
    decision = decided.json()["decision"]
    assert decision["values"] == {"issued": 177, "counted": 77}
    assert decision["reviewer"] == "web review page (127.0.0.1)"
    assert [check["holds"] for check in decision["checks"]] == [False]  # as written: still a case to escalate
    assert decision["changed"] == [{"count": "issued", "box": 1, "read": 7, "confirmed": 1}]
    [trained] = decision["training"]
    assert (feedback_dir / "training" / "1" / f"{trained}.png").is_file()
    assert decided.json()["counts"]["pending"] == waiting - 1

    after = _metrics(sheets_app)
    assert _gauge(after, n.WEB_SHEETS_PENDING) == waiting - 1
    assert after[(n.WEB_SHEET_REVIEWS, (("form", FORM), ("verdict", "confirmed")))] \
        - metrics[(n.WEB_SHEET_REVIEWS, (("form", FORM), ("verdict", "confirmed")))] == 1
    if waiting == 1:
        assert _gauge(after, n.WEB_SHEET_OLDEST_PENDING) is None  # nothing waits: the series is gone

    twice = _sheets_api(sheets_app, "POST", json={"id": sheet_id, "verdict": "rejected"})
    assert (twice.status_code, twice.json()) == (409, {"error": f"no sheet {sheet_id!r} waits for review"})


def test_the_reviewers_api_refuses_what_is_not_a_review(sheets_app, form_file, tmp_path):
    sheet = photo(form_file, {"issued": 777, "counted": 77}, tmp_path, "bad-reviews", seed=6)
    sheet_id = _read_sheet(sheets_app, sheet.read_bytes()).json()["review"]["id"]
    unknown = "0" * 24
    cases = [
        (_sheets_api(sheets_app, "GET", token=None), 401, "give the review token: Authorization: Bearer <token>"),
        (_sheets_api(sheets_app, "GET", f"/{sheet_id}", token="not-the-token-not-the-token"), 401,
         "give the review token: Authorization: Bearer <token>"),
        (_sheets_api(sheets_app, "GET", f"/{unknown}"), 404, f"no sheet {unknown!r} waits for review"),
        (_sheets_api(sheets_app, "GET", "?limit=0"), 400, "limit must be a whole number from 1 to 200"),
        (_sheets_api(sheets_app, "POST", data="id=1", headers={"Content-Type": "text/plain"}), 415,
         "send JSON, as Content-Type: application/json"),
        (_sheets_api(sheets_app, "POST", json=[sheet_id]), 400, 'send a JSON object: {"id": "<sheet id>", "verdict": '
                                                                '"confirmed" or "rejected", "boxes": {"<count id>": '
                                                                '[digit or null, ...]}}'),
        (_sheets_api(sheets_app, "POST", json={"id": unknown, "verdict": "rejected"}), 404,
         f"no sheet {unknown!r} waits for review"),
        (_sheets_api(sheets_app, "POST", json={"id": sheet_id, "verdict": "confirmed"}), 400,
         'give "boxes": {"<count id>": [digit or null for each box], ...} for every count'),
        (_sheets_api(sheets_app, "POST", json={"id": sheet_id, "verdict": "confirmed",
                                               "boxes": {"issued": [7, None, 7], "counted": [None, 7, 7]}}), 400,
         "Ballots issued: an empty box between digits"),
        (_sheets_api(sheets_app, "POST", json={"id": sheet_id, "verdict": "maybe"}), 400,
         "a verdict is confirmed or rejected, got 'maybe'"),
    ]
    for response, status, message in cases:
        assert (response.status_code, response.json()) == (status, {"error": message})
    assert sheet_id in [item["id"] for item in _sheets_api(sheets_app, "GET").json()["pending"]]  # still waiting
    assert _sheets_api(sheets_app, "POST", json={"id": sheet_id, "verdict": "rejected"}).status_code == 200
    assert "Traceback" not in "".join(sheets_app.output)


def test_without_a_token_there_is_no_review_and_a_full_queue_still_answers(sevens_server, form_file, tmp_path):
    """No --review-token-file: the reviewers' pages and API do not exist. Past its share of the queue, a
    client's sheet is still read and answered; the answer says it was not queued, and why."""
    first = photo(form_file, {"issued": 777, "counted": 77}, tmp_path, "first", seed=7)
    second = photo(form_file, {"issued": 77, "counted": 777}, tmp_path, "second", seed=8)
    with start_web("--serving-url", sevens_server.rest_url, "--form", form_file, "--feedback-dir", tmp_path / "fb",
                   "--pending-sheets-per-client", "1") as app:
        assert _sheets_api(app, "GET").status_code == 404
        assert requests.get(f"{app.url}/review/sheets", timeout=10).status_code == 404
        assert requests.get(f"{app.url}/sheet", timeout=10).status_code == 200  # the public page is there
        assert _read_sheet(app, first.read_bytes()).json()["review"]["queued"] is True
        response = _read_sheet(app, second.read_bytes())
        assert response.status_code == 200 and response.json()["verdict"] == "inconsistent"
        assert response.json()["review"] == {
            "queued": False, "reason": "a sheet from this address already waits for a person: keep the paper "
                                       "sheet and send it again later"}
        assert _gauge(_metrics(app), n.WEB_SHEETS_PENDING) == 1
