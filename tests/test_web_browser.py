"""The page in a real headless Chromium (Debian's, driven by Playwright), in front of a real `digits serve`.

One browser for the module; each test gets a fresh context whose every request is checked to stay
on loopback, and whose Content-Security-Policy violations and script errors fail the test.
Screenshots go to build/test-artifacts/web/ (or $DIGITS_TEST_ARTIFACTS): look at them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Error as PlaywrightError
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from monitoring import names as n
from serving.client import RestClient
from web.browser import CSP_RECORDER, LoopbackGuard, draw, touch
from web.config import WebConfig
from web.feedback import LOG_NAME
from web.process import start_web

pytestmark = [pytest.mark.slow]

ARTIFACTS = Path(os.environ.get("DIGITS_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "web"
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3, "is_mobile": True, "has_touch": True}
DESKTOP = {"viewport": {"width": 1280, "height": 800}, "device_scale_factor": 1}
# A "7" as two mouse strokes, in 0..1 of the pad.
SEVEN = [[(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)], [(0.35, 0.52), (0.65, 0.52)]]
ANSWER_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser") / "feedback"


@pytest.fixture(scope="module")
def app(model_server, feedback_dir):
    with start_web("--serving-url", model_server.rest_url, "--feedback-dir", feedback_dir) as web_app:
        yield web_app


@pytest.fixture
def open_page(browser):
    """Factory: a page of a fresh context; at teardown, nothing left loopback and nothing broke the page."""
    contexts = []

    def make(url: str, allow_errors: tuple[str, ...] = (), **options):
        """`allow_errors`: what the test itself provokes in the browser's log (a request it fails)."""
        context = browser.new_context(**(options or DESKTOP))
        context.set_default_timeout(ANSWER_TIMEOUT_MS)
        guard = LoopbackGuard(context)
        page = context.new_page()
        page.add_init_script(CSP_RECORDER)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        page.goto(url + "/")
        contexts.append((context, guard, page, errors, allow_errors))
        return page

    yield make
    for context, guard, page, errors, allow_errors in contexts:
        violations = page.evaluate("window.__cspViolations")
        context.close()
        assert guard.blocked == [], f"requests that left loopback: {guard.blocked}"
        assert violations == [], f"Content-Security-Policy violations: {violations}"
        # The model server being down and a drawing without ink are reported by the page itself; the
        # browser logs their 503 and 422 too. Policy violations are in `violations` (the policy test
        # clears the one it provokes).
        refused = ("the server responded with a status of 503", "the server responded with a status of 422",
                   *allow_errors)
        unexpected = [e for e in errors if not any(status in e for status in refused)
                      and "Content Security Policy" not in e]
        assert unexpected == [], f"errors on the page: {errors}"


def _answer(page, action) -> tuple[bytes, dict]:
    """Runs `action` (which makes the page ask the model, once per lifted pen); returns the image the
    page sent and the answer, for the answer the page ends up showing (or the last error).

    The page's requests to /api/predict pass through a route that keeps each body and answer.
    """
    exchanges: list[tuple[bytes, dict]] = []

    def keep(route) -> None:
        response = route.fetch()
        exchanges.append((route.request.post_data_buffer, json.loads(response.body())))
        try:
            route.fulfill(response=response)
        except PlaywrightError as error:
            # The page aborts the request of a drawing a newer stroke superseded (only the newest
            # drawing's answer is shown); if that happens while this handler waits for the answer,
            # the route is gone. The answer it would have shown is never looked for.
            if "already handled" not in str(error):
                raise

    page.route("**/api/predict", keep)
    try:
        action()
        page.wait_for_function("() => ['done', 'error'].includes(document.body.dataset.state)")
    finally:
        page.unroute("**/api/predict", keep)
    assert exchanges, "the page sent no image"
    shown = page.evaluate("document.body.dataset.state === 'done' && document.body.dataset.answerId")
    for sent, answer in reversed(exchanges):
        if not shown or answer.get("id") == shown:
            return sent, answer
    raise AssertionError(f"the page shows answer {shown}, which none of its {len(exchanges)} requests returned")


def _shown(page) -> dict:
    """What the page shows: the digit, the ten bars (digit, text, width), the version and the 28x28 image."""
    return page.evaluate("""() => ({
        digit: document.querySelector('#announce strong')?.textContent ?? null,
        announce: document.querySelector('#announce').textContent,
        bars: [...document.querySelectorAll('#bars li')].map((li) => ({
            digit: li.dataset.digit, pct: li.querySelector('.pct').textContent, top: li.classList.contains('top'),
            note: li.querySelector('.top-note').textContent, width: li.querySelector('.fill').style.width})),
        version: document.querySelector('#model-version').dataset.version,
        seen: [...document.querySelector('#seen').getContext('2d').getImageData(0, 0, 28, 28).data]
            .filter((_, i) => i % 4 === 0),
    })""")


def _check_page_shows(page, sent: bytes, answer: dict, model_server) -> None:
    """The page shows exactly what the model server answers for the image the page sent."""
    [direct] = RestClient(model_server.rest_url).predict([sent], with_image=True)
    assert answer["digit"] == direct.digit
    assert answer["probabilities"] == pytest.approx(direct.probabilities, abs=1e-6)
    shown = _shown(page)
    # What the page says depends on what the model decided (test_the_page_says_what_the_model_decided...).
    assert answer["decision"] == direct.decision
    if direct.decision == "not_a_digit":
        assert shown["digit"] is None and shown["announce"].startswith("That does not look like a digit")
    elif direct.decision == "unsure":
        assert shown["digit"] == str(direct.digit) and shown["announce"].startswith("Not sure: is it")
    else:
        assert shown["digit"] == str(direct.digit)
        assert f"{100 * direct.confidence:.1f}%" in shown["announce"]
    assert [bar["pct"] for bar in shown["bars"]] == [f"{100 * p:.1f}%" for p in direct.probabilities]
    assert [bar["top"] for bar in shown["bars"]] == [d == direct.digit for d in range(10)]
    assert shown["bars"][direct.digit]["note"] == " (the model's answer)"  # marked by more than colour
    assert [float(bar["width"].rstrip("%")) for bar in shown["bars"]] == pytest.approx(
        [100 * p for p in direct.probabilities], abs=0.01)
    newest = max(int(e["version"]) for e in RestClient(model_server.rest_url).status()["model_version_status"])
    assert shown["version"] == str(newest) == str(answer["model_version"])
    expected = [round(v * 255) for row in direct.normalized_image for v in row]
    assert max(abs(a - b) for a, b in zip(shown["seen"], expected)) <= 1


def _ink(png: bytes):
    """The sent image as a boolean ink mask (dark pixels)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (280, 280)
        return np.asarray(image.convert("L")) < 128


def test_drawing_with_the_mouse_shows_the_model_servers_answer(app, open_page, model_server):
    page = open_page(app.url)
    assert page.locator("#pad").evaluate("(pad) => getComputedStyle(pad).touchAction") == "none"
    sent, answer = _answer(page, lambda: draw(page, SEVEN))
    ink = _ink(sent)  # the shown answer is the last stroke's: both strokes are in its image
    assert ink[50:62, 80:200].any(axis=0).all()  # the 7's top bar
    assert ink[140:152, 110:170].any(axis=0).all()  # its cross bar
    assert not ink[:20].any() and not ink[:, :20].any()  # nothing outside what was drawn
    _check_page_shows(page, sent, answer, model_server)
    assert page.locator("#details").is_visible() and page.locator("#error").is_hidden()


def test_the_image_sent_is_what_was_drawn(app, open_page):
    page = open_page(app.url)
    stroke = [[(0.5, 0.2), (0.5, 0.8)]]  # one vertical line down the middle
    sent, _ = _answer(page, lambda: draw(page, stroke))
    ink = _ink(sent)
    rows = ink.any(axis=1).nonzero()[0]
    columns = ink.any(axis=0).nonzero()[0]
    # From y=56 to y=224 (plus the round caps), around x=140, about the pen's width (7.5 % of 280 = 21 px).
    assert 40 <= rows.min() <= 56 and 224 <= rows.max() <= 240
    assert 125 <= columns.min() and columns.max() <= 155 and 15 <= columns.max() - columns.min() <= 25


def test_undo_and_clear(app, open_page):
    page = open_page(app.url)
    _answer(page, lambda: draw(page, SEVEN[:1]))
    sent_two, _ = _answer(page, lambda: draw(page, SEVEN[1:]))
    sent_one, _ = _answer(page, lambda: page.locator("#undo").click())
    assert _ink(sent_two).sum() > _ink(sent_one).sum()
    page.locator("#clear").click()
    assert page.locator("#details").is_hidden()
    assert page.locator("#announce").text_content() == "Draw or upload a digit."
    assert page.locator("#undo").is_disabled() and page.locator("#clear").is_disabled()


def test_drawing_with_touch(app, browser, open_page, model_server):
    page = open_page(app.url, **PHONE)
    cdp = page.context.new_cdp_session(page)
    sent, answer = _answer(page, lambda: touch(page, cdp, [(0.5, 0.15), (0.5, 0.5), (0.5, 0.85)]))
    ink = _ink(sent)
    assert ink[60:220, 130:150].any(axis=1).all()  # a continuous line down the middle
    _check_page_shows(page, sent, answer, model_server)


def test_uploading_a_real_mnist_png(app, open_page, sample_tree, model_server):
    page = open_page(app.url)
    path = sorted((sample_tree / "testing" / "4").iterdir())[0]
    sent, answer = _answer(page, lambda: page.locator("#upload").set_input_files(str(path)))
    assert sent == path.read_bytes()  # the file as it is: the model server does the normalisation
    _check_page_shows(page, sent, answer, model_server)


def _app_metrics(app) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{app.url}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _painted(page, selector: str) -> dict:
    """Where an element is drawn once scrolled to: its box, whether it is what the screen shows at its
    centre (nothing covers it), and its colours."""
    return page.locator(selector).evaluate("""(element) => {
        element.scrollIntoView({block: 'center'});
        const box = element.getBoundingClientRect(), style = getComputedStyle(element);
        const top = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
        return {left: box.left, top: box.top, right: box.right, bottom: box.bottom, width: box.width,
                height: box.height, screenWidth: window.innerWidth, screenHeight: window.innerHeight,
                onTop: element.contains(top), visibility: style.visibility, opacity: style.opacity,
                color: style.color, background: style.backgroundColor};
    }""")


def test_a_blank_drawing_and_a_non_image_upload_are_explained(app, open_page, tmp_path):
    """The drawing pad exported untouched (by the browser itself) goes to the model, which finds no ink;
    the page says so in words one can see, and shows no answer. A file that is not an image is refused
    by the page itself. (A tap is not a blank drawing: see the next test.)"""
    page = open_page(app.url)
    blank = tmp_path / "blank-drawing.png"
    blank.write_bytes(base64.b64decode(page.evaluate("document.querySelector('#pad').toDataURL('image/png')")
                                       .removeprefix("data:image/png;base64,")))
    before = _app_metrics(app)
    sent, answer = _answer(page, lambda: page.locator("#upload").set_input_files(str(blank)))
    assert sent == blank.read_bytes()
    assert answer == {"error": "there is no digit in the image (no ink found): draw or upload a digit"}
    assert page.evaluate("document.body.dataset.state") == "error"
    assert page.locator("#error").text_content() == (
        "There is no digit to read: the image has no ink. Draw or upload a digit.")
    painted = _painted(page, "#error")
    assert painted["width"] > 100 and painted["height"] > 10, painted
    assert 0 <= painted["left"] and painted["right"] <= painted["screenWidth"], painted
    assert 0 <= painted["top"] and painted["bottom"] <= painted["screenHeight"], painted
    assert painted["onTop"] and painted["visibility"] == "visible" and painted["opacity"] == "1", painted
    assert painted["color"] != painted["background"], painted
    # No answer shown, and none counted: the app refused it as having no ink.
    assert page.locator("#details").is_hidden() and page.locator("#announce").text_content() == "No answer."
    assert page.evaluate("document.body.dataset.answerId") is None
    after = _app_metrics(app)
    for outcome, more in (("no_ink", 1), ("ok", 0)):
        key = (n.WEB_REQUESTS, (("endpoint", "predict"), ("outcome", outcome)))
        assert after.get(key, 0) - before.get(key, 0) == more, outcome
    assert {k: v for k, v in after.items() if k[0] == n.PREDICTIONS} == \
        {k: v for k, v in before.items() if k[0] == n.PREDICTIONS}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "blank-drawing.png"), full_page=True)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    page.locator("#upload").set_input_files(str(text))
    # The page is already in its error state: wait for the new words (the file is read asynchronously).
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('cannot be read as an image')")
    assert page.evaluate("document.body.dataset.state") == "error" and page.locator("#error").is_visible()


def test_a_tap_without_moving_is_a_dot_not_a_blank_drawing(app, open_page, model_server):
    """A tap leaves a dot of the pen's width where it landed, so drawing cannot make a blank image: the
    dot is sent and answered like any drawing."""
    page = open_page(app.url)
    sent, answer = _answer(page, lambda: draw(page, [[(0.5, 0.5)]]))
    ink = _ink(sent)
    rows, columns = ink.any(axis=1).nonzero()[0], ink.any(axis=0).nonzero()[0]
    # A disk about the pen's width (7.5 % of 280 = 21 px) around the middle of the pad, and nothing else.
    for found in (rows, columns):
        assert 15 <= found.max() - found.min() <= 25 and abs((found.min() + found.max()) / 2 - 140) <= 3
    assert answer["ink_fraction"] > 0
    _check_page_shows(page, sent, answer, model_server)
    assert page.locator("#error").is_hidden()


def test_model_server_down_is_said_clearly(open_page, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with start_web("--serving-url", f"http://127.0.0.1:{port}", "--feedback-dir", tmp_path) as down:
        page = open_page(down.url)
        page.wait_for_function("() => document.querySelector('#model-status').textContent.includes('not answering')")
        sent, answer = _answer(page, lambda: draw(page, SEVEN))
        assert page.evaluate("document.body.dataset.state") == "error"
        message = page.locator("#error").text_content()
        assert "The model server is not answering right now" in message
        assert str(port) not in message  # the model server's address is the operator's, not the public's
        assert page.locator("#error").get_attribute("role") == "alert"
        assert page.locator("#details").is_hidden()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "model-server-down.png"), full_page=True)


def test_a_correction_is_stored(app, open_page, feedback_dir):
    page = open_page(app.url)
    _, answer = _answer(page, lambda: draw(page, SEVEN))
    wrong = (answer["digit"] + 1) % 10
    # The model's own digit is offered unless it said the drawing is not a digit at all.
    assert page.locator(f"#digits button[data-digit='{answer['digit']}']").is_disabled() == (
        answer["decision"] != "not_a_digit")
    page.locator(f"#digits button[data-digit='{wrong}']").click()
    page.wait_for_function("() => document.querySelector('#feedback-status').classList.contains('ok')")
    assert f"saved as {'an' if wrong == 8 else 'a'} {wrong}" in page.locator("#feedback-status").text_content()
    assert all(button.is_disabled() for button in page.locator("#feedback button").all())
    lines = [json.loads(line) for line in (feedback_dir / LOG_NAME).read_text().splitlines()]
    [line] = [line for line in lines if line["corrected"] == wrong and line["predicted"] == answer["digit"]][-1:]
    stored = feedback_dir / line["image"]
    assert stored.parent.name == str(wrong) and stored.parent.parent.name == "pending"  # until reviewed
    assert "A reviewer checks corrections" in page.locator("#feedback-status").text_content()
    # The stored digit is the 28x28 image the page showed as "what the model saw".
    import numpy as np
    from PIL import Image

    with Image.open(stored) as png:
        assert png.size == (28, 28) and png.mode == "L"
        assert list(np.asarray(png).ravel()) == _shown(page)["seen"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "after-correction.png"), full_page=True)


def test_keyboard_only(app, open_page, sample_tree):
    """Upload with the keyboard (the alternative to drawing), then say it was right, without the mouse.

    The file input is reached with Tab and named by its label; choosing the file in the native
    dialog is what `set_input_files` stands in for. (Whether headless Chromium opens that dialog on
    a key press is the browser's business, and unreliable here: measured 3-5 of 8 presses of Space
    or Enter, with or without bringing the page to the front.)
    """
    page = open_page(app.url)
    path = sorted((sample_tree / "testing" / "2").iterdir())[0]
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "upload":
            break
    assert page.evaluate("document.activeElement.id") == "upload"
    assert page.get_by_label("Upload an image").evaluate("(input) => input.id") == "upload"
    assert page.evaluate("document.activeElement.type") == "file"
    _, answer = _answer(page, lambda: page.locator("#upload:focus").set_input_files(str(path)))
    assert page.locator("#announce").get_attribute("aria-live") == "polite"
    # "Yes, it is a 2", or, where the model said it is no digit at all, the digit's own button.
    focused = ("document.activeElement.id === 'right'" if answer["decision"] != "not_a_digit"
               else f"document.activeElement.dataset.digit === '{answer['digit']}'")
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate(focused):
            break
    assert page.evaluate(focused)
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#feedback-status').classList.contains('ok')")
    assert "noted as right" in page.locator("#feedback-status").text_content()


@pytest.mark.parametrize("name, options", [("phone", PHONE), ("desktop", DESKTOP)])
def test_phone_and_desktop_layouts(app, open_page, name, options):
    page = open_page(app.url, **options)
    if options.get("has_touch"):
        cdp = page.context.new_cdp_session(page)
        _answer(page, lambda: touch(page, cdp, [(0.3, 0.2), (0.7, 0.2), (0.45, 0.85)]))
    else:
        _answer(page, lambda: draw(page, SEVEN))
    layout = page.evaluate("""() => {
        const pad = document.querySelector('#pad').getBoundingClientRect();
        return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
                padWidth: pad.width, padHeight: pad.height, store: document.querySelector('#pad').width,
                ratio: window.devicePixelRatio, buttons: [...document.querySelectorAll('button')]
                    .filter((b) => b.offsetParent).map((b) => b.getBoundingClientRect().height)};
    }""")
    assert layout["scroll"] <= layout["inner"], "the page scrolls sideways"
    _assert_bars_painted(page)
    assert abs(layout["padWidth"] - layout["padHeight"]) < 1 and layout["padWidth"] >= 250
    assert layout["store"] == round(layout["padWidth"] * layout["ratio"])  # sharp on high-DPI screens
    assert min(layout["buttons"]) >= 44  # touch-sized
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _assert_bars_painted(page) -> None:
    """Each probability bar's fill is painted across its share of the track: its width (not its
    text) is the probability, it is as tall as the track, and its colour is not the track's."""
    bars = page.evaluate("""() => [...document.querySelectorAll('#bars li')].map((item) => {
        const track = item.querySelector('.track').getBoundingClientRect();
        const fill = item.querySelector('.fill').getBoundingClientRect();
        return {p: Number(item.dataset.probability), top: item.classList.contains('top'),
                track: [track.left, track.width, track.height], fill: [fill.left, fill.width, fill.height],
                colour: getComputedStyle(item.querySelector('.fill')).backgroundColor,
                trackColour: getComputedStyle(item.querySelector('.track')).backgroundColor};
    })""")
    assert len(bars) == 10 and sum(bar["top"] for bar in bars) == 1
    for bar in bars:
        (track_left, track_width, track_height), (fill_left, fill_width, fill_height) = bar["track"], bar["fill"]
        assert track_width > 50 and abs(fill_left - track_left) < 1, bar
        assert abs(fill_width - bar["p"] * track_width) <= 1.5, bar
        assert fill_width < 0.5 or abs(fill_height - track_height) < 1, bar
        assert bar["colour"] != bar["trackColour"], bar
    top = next(bar for bar in bars if bar["top"])
    assert top["fill"][1] >= max(bar["fill"][1] for bar in bars) > 0


def test_the_content_security_policy_is_enforced(app, open_page):
    """A slip (an inline script, a script from elsewhere) is blocked by the policy, and noticed."""
    page = open_page(app.url)
    ran = page.evaluate("""() => {
        window.__inlineRan = false;
        const script = document.createElement('script');
        script.textContent = 'window.__inlineRan = true;';
        document.body.appendChild(script);
        return window.__inlineRan;
    }""")
    assert ran is False
    page.wait_for_function("() => window.__cspViolations.length > 0")
    assert page.evaluate("window.__cspViolations")[0].startswith("script-src")
    page.evaluate("window.__cspViolations = []")  # seen; the teardown checks for any others


@pytest.mark.e2e
def test_a_correction_on_the_page_reaches_the_next_served_model(open_page, pushed_model, sample_tree, tmp_path):
    """The whole loop on tiny data: correct a digit on the page, rebuild the TFRecords with the feedback
    tree, run the pipeline, and find the correction in the new training data and a new version served."""
    from shutil import copytree

    from conftest import pipeline_run_args, run_digits, start_server
    from test_builder import _read_split

    serving = tmp_path / "serving"
    copytree(pushed_model, serving / "digits")
    [old_version] = [int(path.name) for path in (serving / "digits").iterdir()]
    feedback = tmp_path / "feedback"
    with start_server(serving / "digits") as server, \
            start_web("--serving-url", server.rest_url, "--feedback-dir", feedback,
                      "--model-dir", serving / "digits") as web_app:
        page = open_page(web_app.url)
        _, answer = _answer(page, lambda: draw(page, SEVEN))
        assert answer["model_version"] == old_version
        corrected = (answer["digit"] + 1) % 10
        page.locator(f"#digits button[data-digit='{corrected}']").click()
        page.wait_for_function("() => document.querySelector('#feedback-status').classList.contains('ok')")
        [line] = [json.loads(text) for text in (feedback / LOG_NAME).read_text().splitlines()]
        stored = (feedback / line["image"]).read_bytes()

        # A reviewer accepts it; the next build takes the accepted corrections into its train split, and
        # only there.
        reviewed = run_digits("feedback", "review", "--feedback-dir", feedback, "--accept", line["sha256"][:24])
        assert reviewed.returncode == 0 and "accepted 1" in reviewed.stdout, reviewed.stderr
        records = tmp_path / "records"
        built = run_digits("data", "build", sample_tree, "--out", records, "--per-class", "20",
                           "--test-per-class", "5", "--workers", "1", "--extra-source", feedback, "--quiet",
                           timeout=300)
        assert built.returncode == 0, built.stderr
        assert (stored, corrected) in _read_split(records, "train")
        assert all(image != stored for image, _ in _read_split(records, "test") + _read_split(records, "eval"))

        # The next pipeline run trains on it, the gates bless it, the Pusher pushes it, and the
        # model server picks the new version up by itself.
        result = run_digits(*pipeline_run_args(records, tmp_path / "root", serving), timeout=1500)
        assert result.returncode == 0, result.stderr[-3000:]
        versions = sorted(int(path.name) for path in (serving / "digits").iterdir())
        assert len(versions) == 2 and versions[0] == old_version
        new_version = versions[1]

        def served() -> bool:
            status = RestClient(server.rest_url).status()["model_version_status"]
            return any(int(entry["version"]) == new_version and entry["state"] == "AVAILABLE" for entry in status)

        deadline = time.monotonic() + 180
        while not served():
            assert time.monotonic() < deadline, "digits serve did not load the new version"
            time.sleep(0.5)
        time.sleep(WebConfig.version_ttl_s + 0.5)  # the web app re-reads the newest version after this
        page.locator("#clear").click()
        _, again = _answer(page, lambda: draw(page, SEVEN))
        assert again["model_version"] == new_version
        assert page.locator("#model-version").get_attribute("data-version") == str(new_version)


# The model's verdicts as a scripted model server answers them (TF Serving's REST rows, with the
# abstention outputs): what the page must say and let the person do for each.
VERDICT_ROW = {"probabilities": [0.0, 0.01, 0.01, 0.52, 0.01, 0.01, 0.01, 0.01, 0.41, 0.01], "ink_fraction": 0.12,
               "normalized_image": [[0.0] * 28] * 28, "ood_score": -4.1, "confidence": 0.55}
VERDICTS = {
    "accepted": ("It is a 3 (52.0% sure).", "Yes, it is a 3", True),
    "unsure": ("Not sure: is it a 3 or an 8?", "It is a 3", True),
    "not_a_digit": ("That does not look like a digit. If it is one, which is it?", None, False),
}


@pytest.fixture(scope="module")
def scripted_page_app(tmp_path_factory):
    """`digits web` in front of a scripted TF Serving REST API whose answer each test sets."""
    from test_web import ScriptedModelServer

    feedback = tmp_path_factory.mktemp("verdicts")
    with ScriptedModelServer([[1]], {1}) as server, \
            start_web("--serving-url", server.url, "--feedback-dir", feedback) as web_app:
        yield server, web_app, feedback


@pytest.mark.parametrize("verdict", list(VERDICTS))
def test_the_page_says_what_the_model_decided_and_asks_when_it_is_not_sure(scripted_page_app, open_page, sample_tree,
                                                                          verdict):
    """"It is a 3", "Not sure: is it a 3 or an 8?", "That does not look like a digit": painted, in its
    place, with the buttons the person needs (for a non-digit, every digit and no "it is a 3"), and a
    correction logged with the decision it corrected."""
    from data import contract

    server, web_app, feedback = scripted_page_app
    server.answer = (200, json.dumps({"predictions": [{**VERDICT_ROW, "decision": contract.DECISIONS.index(verdict),
                                                       "accepted": verdict == "accepted"}]}))
    page = open_page(web_app.url, **PHONE)
    path = sorted((sample_tree / "testing" / "3").iterdir())[0]
    _, answer = _answer(page, lambda: page.locator("#upload").set_input_files(str(path)))
    assert answer["decision"] == verdict and answer["runner_up"] == 8
    said, right_button, predicted_disabled = VERDICTS[verdict]
    announce = _painted(page, "#announce")
    assert page.locator("#announce").text_content() == said
    assert announce["onTop"] and announce["visibility"] == "visible" and announce["opacity"] == "1", announce
    assert 0 <= announce["left"] and announce["right"] <= announce["screenWidth"] and announce["height"] > 10, announce
    right = page.locator("#right")
    if right_button is None:
        assert right.is_hidden()
    else:
        assert right.is_visible() and right.text_content() == right_button and right.is_enabled()
    assert page.locator("#digits button[data-digit='3']").is_disabled() == predicted_disabled
    assert page.locator("#wrong-label").text_content() == ("Wrong? It is a:" if verdict == "accepted"
                                                           else "Which digit is it?")
    assert page.locator("#digits button[data-digit='8']").is_enabled()
    _assert_bars_painted(page)  # the 3 at 52 % of its track, the 8 at 41 %
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"verdict-{verdict}.png"), full_page=True)
    page.locator("#digits button[data-digit='8']").click()
    page.wait_for_function("() => document.querySelector('#feedback-status').classList.contains('ok')")
    assert "saved as an 8" in page.locator("#feedback-status").text_content()
    logged = json.loads((feedback / LOG_NAME).read_text().splitlines()[-1])
    assert (logged["predicted"], logged["corrected"], logged["decision"]) == (3, 8, verdict)


def test_a_correction_that_fails_can_be_sent_again(scripted_page_app, open_page, sample_tree):
    """The network fails under the correction: the page says it was not saved, and the buttons come
    back as they were (before, they stayed disabled); sent again, it is saved."""
    from data import contract

    server, web_app, feedback = scripted_page_app
    server.answer = (200, json.dumps({"predictions": [{**VERDICT_ROW, "accepted": True,
                                                       "decision": contract.DECISIONS.index("accepted")}]}))
    page = open_page(web_app.url, allow_errors=("net::ERR_CONNECTION_FAILED",), **PHONE)
    path = sorted((sample_tree / "testing" / "3").iterdir())[1]
    _answer(page, lambda: page.locator("#upload").set_input_files(str(path)))
    buttons = page.locator("#feedback button")
    before = [button.is_disabled() for button in buttons.all()]
    assert before.count(True) == 1  # the model's own digit, 3
    page.route("**/api/feedback", lambda route: route.abort("connectionfailed"))
    page.locator("#digits button[data-digit='8']").click()
    page.wait_for_function("() => document.querySelector('#feedback-status').classList.contains('bad')")
    assert page.locator("#feedback-status").text_content() == (
        "Not saved: the web app cannot be reached. Try again.")
    assert [button.is_disabled() for button in buttons.all()] == before
    page.unroute("**/api/feedback")
    page.locator("#digits button[data-digit='8']").click()
    page.wait_for_function("() => document.querySelector('#feedback-status').classList.contains('ok')")
    assert "saved as an 8" in page.locator("#feedback-status").text_content()
    assert all(button.is_disabled() for button in buttons.all())


REVIEW_TOKEN = "browser-review-token-0123456789"


@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_the_review_page_paints_each_proposal_and_records_the_verdicts(open_page, tmp_path, size):
    """The reviewers' page, behind its token: each pending correction's 28x28 image painted in its
    card (canvas pixels equal to the stored PNG, the card on screen and not overlapping the next), and
    accept, accept as another digit and reject each move the file and leave the page in step."""
    import numpy as np
    from PIL import Image

    from test_web import ScriptedModelServer
    from web.feedback import FeedbackStore

    feedback = tmp_path / "feedback"
    store = FeedbackStore(feedback)
    records = []
    for index in range(3):  # three distinct bars: a 1-ish shape in different places
        picture = [[1.0 if 10 + index * 3 <= x < 12 + index * 3 and 4 <= y < 24 else 0.0 for x in range(28)]
                   for y in range(28)]
        records.append(store.add(picture, predicted=7, corrected=1, confidence=0.93, model_name="digits",
                                 model_version=4, decision="accepted", client=f"10.0.0.{index}"))
    token_file = tmp_path / "token"
    token_file.write_text(REVIEW_TOKEN)
    with ScriptedModelServer([[1]], {1}) as server, \
            start_web("--serving-url", server.url, "--feedback-dir", feedback,
                      "--review-token-file", token_file) as app:
        page = open_page(app.url, allow_errors=("status of 401",), **(PHONE if size == "phone" else DESKTOP))
        page.goto(app.url + "/review")
        page.fill("#token", "not-the-token-not-the-token")
        page.click("#login button")
        page.wait_for_function("() => !document.querySelector('#error').hidden")
        assert "not the review token" in page.locator("#error").text_content()
        assert page.locator("#login").is_visible()

        page.fill("#token", REVIEW_TOKEN)
        page.click("#login button")
        page.wait_for_function("() => document.querySelectorAll('#queue li').length === 3")
        assert not page.locator("#login").is_visible()
        assert page.locator("#counts").text_content() == "3 waiting, 0 accepted, 0 rejected."
        cards = page.evaluate("""() => [...document.querySelectorAll('#queue li')].map((li) => {
            const canvas = li.querySelector('canvas'), box = canvas.getBoundingClientRect();
            const card = li.getBoundingClientRect();
            return {id: li.dataset.id, text: li.textContent, card: [card.left, card.top, card.right, card.bottom],
                    canvas: [box.left, box.top, box.width, box.height],
                    pixels: [...canvas.getContext('2d').getImageData(0, 0, 28, 28).data].filter((_, i) => i % 4 === 0)};
        })""")
        width = page.viewport_size["width"]
        for card, record in zip(cards, records):
            assert card["id"] == record.id and "proposed: 1" in card["text"]
            assert "model said 7 (93 %, sure)" in card["text"]
            with Image.open(feedback / record.image) as png:
                assert card["pixels"] == np.asarray(png).flatten().tolist()  # what is painted is the stored image
            left, top, canvas_width, canvas_height = card["canvas"]
            assert (canvas_width, canvas_height) == (112, 112) and 0 <= left and left + canvas_width <= width
            assert card["card"][2] <= width + 0.5  # no card runs off the screen
        for first, second in zip(cards, cards[1:]):  # side by side or one under the other, never on top
            a, b = first["card"], second["card"]
            assert a[2] <= b[0] + 0.5 or a[3] <= b[1] + 0.5 or b[2] <= a[0] + 0.5
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"review-{size}.png"), full_page=True)

        page.locator(f"li[data-id='{records[0].id}'] button.accept").click()
        page.wait_for_function("() => document.querySelectorAll('#queue li').length === 2")
        page.locator(f"li[data-id='{records[1].id}'] select").select_option("4")  # sends nothing yet
        assert page.locator("#queue li").count() == 2
        assert page.locator(f"li[data-id='{records[1].id}'] button.accept").text_content() == "Accept as 4"
        page.locator(f"li[data-id='{records[1].id}'] button.accept").click()
        page.wait_for_function("() => document.querySelectorAll('#queue li').length === 1")
        page.locator(f"li[data-id='{records[2].id}'] button.reject").click()
        page.wait_for_function("() => !document.querySelector('#empty').hidden")
        assert page.locator("#counts").text_content() == "0 waiting, 2 accepted, 1 rejected."
    assert sorted(p.relative_to(feedback).as_posix() for p in feedback.rglob("*.png")) == sorted([
        f"training/1/{records[0].id}.png", f"training/4/{records[1].id}.png", f"rejected/1/{records[2].id}.png"])
    reviews = [json.loads(line) for line in (feedback / "reviews.jsonl").read_text().splitlines()]
    assert [review["reviewer"] for review in reviews] == ["web review page (127.0.0.1)"] * 3


# -- Tally forms: the public page reads a sheet; a reviewer reads its boxes -------------------------------

SHEET_TOKEN = "sheet-review-token-0123456789"
RED = "rgb(164, 22, 26)"  # --error in style.css: the boxes to check


@pytest.fixture(scope="module")
def sheets_app(sevens_server, form_file, tmp_path_factory):
    """`digits web --form` in front of the server whose model answers 7 (tests/form_sheets.py's form)."""
    root = tmp_path_factory.mktemp("sheets-browser")
    (root / "token").write_text(SHEET_TOKEN)
    with start_web("--serving-url", sevens_server.rest_url, "--form", form_file, "--feedback-dir", root / "feedback",
                   "--review-token-file", root / "token") as app:
        app.feedback_dir = root / "feedback"
        yield app


def _painted_red(page, selector: str) -> int:
    """Red pixels of an <img> as the browser decoded it (drawn on a canvas: what is on screen, not the text)."""
    return page.evaluate("""(selector) => {
        const img = document.querySelector(selector);
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const ctx = canvas.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let red = 0;
        for (let i = 0; i < data.length; i += 4) red += data[i] > 150 && data[i + 1] < 80 && data[i + 2] < 80;
        return red;
    }""", selector)


def _no_sideways_scroll(page) -> None:
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], "the page scrolls sideways"


@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_an_uploaded_sheet_shows_what_to_check_and_a_reviewer_reads_its_boxes(sheets_app, open_page, form_file,
                                                                              tmp_path, size):
    """The public page reads a photographed sheet whose total was planted wrong (upside down): it says a person
    must check it, outlines the boxes of the failing sum in red in its table and on the photo, and that it went
    to review. On the reviewers' page the same sheet shows each box's image and the model's digit; the reviewer
    reads "issued" as 77, the sum is worked out again on the page, and the confirmed counts are recorded."""
    import numpy as np
    from PIL import Image

    from form_sheets import photo

    options = PHONE if size == "phone" else DESKTOP
    sheet = photo(form_file, {"issued": 777, "counted": 77}, tmp_path, f"planted-{size}", turned=True,
                  seed={"phone": 11, "desktop": 12}[size])
    page = open_page(sheets_app.url, **options)
    page.goto(sheets_app.url + "/sheet")
    page.set_input_files("#upload", str(sheet))
    page.wait_for_function("() => ['done', 'error'].includes(document.body.dataset.state)")
    assert page.evaluate("document.body.dataset.state") == "done", page.locator("#error").text_content()
    assert "do not add up" in page.locator("#announce").text_content()
    assert "turned 180" in page.locator("#announce").text_content()
    rows = page.evaluate("""() => [...document.querySelectorAll('#counts tbody tr')].map((tr) => ({
        count: tr.dataset.count, value: tr.querySelector('.value').textContent,
        boxes: [...tr.querySelectorAll('.box')].map((box) => ({text: box.textContent,
            look: box.classList.contains('look'), border: getComputedStyle(box).borderTopColor,
            rect: box.getBoundingClientRect().toJSON()}))}))""")
    assert [(row["count"], row["value"]) for row in rows] == [("issued", "777"), ("counted", "77")]
    assert [box["text"] for box in rows[0]["boxes"]] == ["7", "7", "7"]
    assert [box["look"] for box in rows[0]["boxes"]] == [True, True, True]  # every written box of the failing sum
    assert [box["look"] for box in rows[1]["boxes"]] == [False, True, True]
    assert all(box["border"] == RED for row in rows for box in row["boxes"] if box["look"])
    for row in rows:  # a count's boxes side by side on one line, in order
        tops = [box["rect"]["top"] for box in row["boxes"]]
        lefts = [box["rect"]["left"] for box in row["boxes"]]
        assert max(tops) - min(tops) < 2 and lefts == sorted(lefts), row
    assert page.locator("#checks li.fails").count() == 1
    assert page.locator("#review-note").text_content().startswith("Sent to a person for review")
    marked = page.evaluate("""() => {const img = document.querySelector('#marked'), box = img.getBoundingClientRect();
        return {natural: img.naturalWidth, width: box.width, right: box.right, complete: img.complete}}""")
    assert marked["complete"] and marked["natural"] > 0 and 0 < marked["right"] <= page.viewport_size["width"]
    assert _painted_red(page, "#marked") > 300  # the boxes to check, outlined on the photo
    _no_sideways_scroll(page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"sheet-{size}.png"), full_page=True)

    page.goto(sheets_app.url + "/review/sheets")
    page.fill("#token", SHEET_TOKEN)
    page.click("#login button")
    page.wait_for_function("() => ['shown', 'empty', 'error'].includes(document.body.dataset.state)")
    assert page.evaluate("document.body.dataset.state") == "shown", page.locator("#error").text_content()
    sheet_id = page.evaluate("document.body.dataset.sheet")
    pending = sheets_app.feedback_dir / "sheets" / "pending" / sheet_id
    boxes = page.evaluate("""() => [...document.querySelectorAll('tr[data-count]')].map((tr) => ({
        count: tr.dataset.count, value: tr.querySelector('.value').textContent,
        boxes: [...tr.querySelectorAll('.box-edit')].map((box) => {
            const canvas = box.querySelector('canvas'), input = box.querySelector('input');
            const rect = input.getBoundingClientRect();
            return {value: input.value, look: box.classList.contains('look'), rect: [rect.left, rect.top, rect.height],
                    visible: canvas !== null && canvas.getBoundingClientRect().width > 0,
                    pixels: canvas && [...canvas.getContext('2d').getImageData(0, 0, 28, 28).data]
                        .filter((_, i) => i % 4 === 0)};
        })}))""")
    assert [(row["count"], [b["value"] for b in row["boxes"]], row["value"]) for row in boxes] == [
        ("issued", ["7", "7", "7"], "777"), ("counted", ["", "7", "7"], "77")]
    for row in boxes:
        tops = [box["rect"][1] for box in row["boxes"]]
        assert max(tops) - min(tops) < 1, row  # one line, in order
        assert [box["rect"][0] for box in row["boxes"]] == sorted(box["rect"][0] for box in row["boxes"])
        assert min(box["rect"][2] for box in row["boxes"]) >= 44  # touch-sized inputs
        for index, box in enumerate(row["boxes"]):
            cell = pending / "cells" / f"{row['count']}.{index + 1}.png"
            assert box["visible"] == cell.is_file()
            if cell.is_file():  # what is painted is the image the model classified
                with Image.open(cell) as png:
                    assert box["pixels"] == np.asarray(png).flatten().tolist()
    assert page.evaluate("document.activeElement.closest('.box-edit').classList.contains('look')")
    assert page.locator("#checks li.fails").count() == 1
    _no_sideways_scroll(page)
    page.screenshot(path=str(ARTIFACTS / f"review-sheet-{size}.png"), full_page=True)

    page.locator("tr[data-count='issued'] .box-edit input").first.fill("")  # the hundreds box is empty
    page.wait_for_function("() => document.querySelector('#checks li.holds') !== null")
    assert page.locator("tr[data-count='issued'] .value").text_content() == "77"
    page.click("#confirm")
    page.wait_for_function("() => document.body.dataset.sheet !== %r || document.body.dataset.state === 'empty'"
                           % sheet_id)
    [decision] = [line for line in map(json.loads, (sheets_app.feedback_dir / "sheets" / "reviews.jsonl")
                                       .read_text().splitlines()) if line["id"] == sheet_id]
    assert decision["values"] == {"issued": 77, "counted": 77} and decision["checks"][0]["holds"] is True
    assert decision["changed"] == [{"count": "issued", "box": 1, "read": 7, "confirmed": None}]
    assert decision["training"] == []  # the model stood by every 7: an emptied box teaches no digit
