"""Driving the page in a real browser: Debian's chromium through Playwright, for the tests and the benchmark.

Playwright's own browser download is never used (`playwright install` needs the internet): the
browser is the distribution's `chromium` package, which `bash .ci/tasks.sh setup` installs. Every
request a page makes is checked: anything not on loopback is aborted and recorded, so a slip (a
CDN, a web font) fails whoever checks `blocked`.
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlsplit

from web.config import LOOPBACK_HOSTS

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ENV = "DIGITS_CHROMIUM"  # a chromium binary of your own


def chromium_path() -> str:
    """The chromium binary to drive: $DIGITS_CHROMIUM, else Debian's."""
    chosen = os.environ.get(CHROMIUM_ENV)
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise RuntimeError(f"{CHROMIUM_ENV}={chosen} is not an executable file")
        return chosen
    for candidate in (*CHROMIUM_CANDIDATES, shutil.which("chromium") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no chromium found: `bash .ci/tasks.sh setup` installs Debian's (apt-get install chromium), "
                       f"or set {CHROMIUM_ENV}=/path/to/chromium")


def launch(playwright):
    """A headless chromium (Playwright adds --no-sandbox where it runs as root)."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=["--disable-dev-shm-usage"])


class LoopbackGuard:
    """Routes every request of a browser context: loopback goes through, anything else is aborted and kept."""

    def __init__(self, context):
        self.blocked: list[str] = []
        context.route("**/*", self._route)

    def _route(self, route) -> None:
        url = route.request.url
        host = urlsplit(url).hostname or ""
        if url.startswith(("data:", "blob:")) or host in LOOPBACK_HOSTS:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")


# Records the page's Content-Security-Policy violations (an init script runs before the page's own).
CSP_RECORDER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


def draw(page, strokes: list[list[tuple[float, float]]], steps: int = 4) -> None:
    """Draws strokes (points in 0..1 of the pad) with the mouse: press, move through each point, release."""
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=steps)
        page.mouse.up()


def touch(page, cdp, stroke: list[tuple[float, float]]) -> None:
    """Draws one stroke with a finger: Chromium's touch events through the DevTools protocol."""
    box = page.locator("#pad").bounding_box()
    points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": points[0][0], "y": points[0][1]}]})
    for x, y in points[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
