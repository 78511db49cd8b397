"""A small Alertmanager webhook receiver: prints each alert as one line, keeps a JSON-lines log.

Standard library only, so that the same file runs in `digits monitor`, in the tests and in the
`alert-receiver` container of docker/compose.yaml (a stock python image, file mounted):

    python monitoring/alert_receiver.py --host 127.0.0.1 --port 9095 [--log alerts.jsonl]

Alertmanager POSTs its webhook payload (version 4) to any path; the path names the receiver
(`/pager`, `/tickets`, `/watchdog`). GET /healthz answers 200. With `--runbook docs/runbook.md`,
GET /runbook answers the runbook as HTML, each section's anchor its heading in lower case
(`/runbook#digitsmodelserverdown`): the alerts' `runbook_url` (monitoring/rules.py) points there.
Replace it with your paging and ticketing integrations in monitoring/alertmanager/alertmanager.yml
for production.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BODY_BYTES = 1 << 20  # Alertmanager batches alerts; a megabyte is thousands of them
RUNBOOK_PATH = "/runbook"
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


def heading_anchor(title: str) -> str:
    """The anchor of a heading, as Python-Markdown's `toc` extension makes it (and GitHub, for one word)."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", title).strip().lower())


# Readable on a phone, where pages are opened: long queries scroll inside their block, not the page.
PAGE_STYLE = ("body{font-family:sans-serif;line-height:1.45;max-width:58em;margin:0 auto;padding:0 1em}"
              "pre{overflow-x:auto;background:#f4f4f4;padding:.5em}table{display:block;max-width:100%;overflow-x:auto}"
              ":not(pre)>code,h1,h2,h3{overflow-wrap:anywhere}")


def render_runbook(text: str) -> str:
    """The runbook as an HTML page. With the `markdown` package (in the project's environment) it is
    rendered; without it (the compose container's stock Python) headings become anchored titles and
    the rest is shown as written."""
    try:
        import markdown
    except ImportError:
        parts, in_code = [], False
        for line in text.splitlines():
            in_code ^= line.startswith("```")
            heading = None if in_code else _HEADING.match(line)
            if heading:
                level, title = len(heading[1]), heading[2]
                parts.append(f'<h{level} id="{heading_anchor(title)}">{html.escape(title)}</h{level}>')
            else:
                parts.append(f"<pre>{html.escape(line)}</pre>" if line.strip() else "")
        body = "\n".join(parts)
    else:
        body = markdown.markdown(text, extensions=["toc", "tables", "fenced_code"],
                                 extension_configs={"toc": {"slugify": lambda value, _sep: heading_anchor(value)}})
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Runbook</title>\n'
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{PAGE_STYLE}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def format_alert(receiver: str, alert: dict) -> str:
    """One line an on-call person can read: status, severity, name, where, what, and the runbook."""
    labels = alert.get("labels", {})
    annotations = alert.get("annotations", {})
    where = " ".join(f"{key}={labels[key]}" for key in ("model_name", "model_version", "instance", "job")
                     if key in labels)
    return (f"[{receiver}] {str(alert.get('status', '?')).upper()} {labels.get('severity', '?')} "
            f"{labels.get('alertname', '?')} {where}: "
            f"{annotations.get('description') or annotations.get('summary', '')}"
            f" (runbook: {annotations.get('runbook_url', 'none')})")


class _Handler(BaseHTTPRequestHandler):
    server_version = "digits-alert-receiver"
    log_path: Path | None = None
    runbook: Path | None = None
    lock = threading.Lock()

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, "ok\n")
        elif self.path.split("?")[0] == RUNBOOK_PATH and self.runbook is not None:
            try:
                page = render_runbook(self.runbook.read_text(encoding="utf-8"))
            except OSError as error:
                self._answer(503, f"cannot read the runbook {self.runbook}: {error.strerror}\n")
                return
            self._answer(200, page, "text/html")
        else:
            self._answer(404, "not found: POST Alertmanager webhooks to any path, GET /healthz"
                              f"{', GET ' + RUNBOOK_PATH if self.runbook is not None else ''}\n")

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(411, "a Content-Length header is required\n")
            return
        if length > MAX_BODY_BYTES:
            self._answer(413, f"payload of {length} bytes is larger than {MAX_BODY_BYTES}\n")
            return
        try:
            payload = json.loads(self.rfile.read(length))
            alerts = payload["alerts"]
            if not isinstance(alerts, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._answer(400, "not an Alertmanager webhook payload (JSON with an 'alerts' list)\n")
            return
        receiver = self.path.strip("/") or "webhook"
        with self.lock:
            for alert in alerts:
                print(format_alert(receiver, alert if isinstance(alert, dict) else {}), flush=True)
            if self.log_path is not None:
                record = {"received_at": time.time(), "receiver": receiver, "payload": payload}
                with self.log_path.open("a", encoding="utf-8") as log:
                    log.write(json.dumps(record, sort_keys=True) + "\n")
        self._answer(200, "ok\n")

    def _answer(self, status: int, text: str, content_type: str = "text/plain") -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass  # one line per alert is printed above; access logs would bury it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print Alertmanager webhook alerts, one line each.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9095)
    parser.add_argument("--log", type=Path, default=None, help="append every payload to this JSON-lines file")
    parser.add_argument("--runbook", type=Path, default=None,
                        help=f"serve this Markdown file (docs/runbook.md) as HTML at {RUNBOOK_PATH}")
    args = parser.parse_args(argv)
    if args.runbook is not None and not args.runbook.is_file():
        print(f"error: --runbook {args.runbook}: no such file", file=sys.stderr)
        return 2
    _Handler.log_path = args.log
    _Handler.runbook = args.runbook
    try:
        server = ThreadingHTTPServer((args.host, args.port), _Handler)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port}: {error.strerror}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"alert receiver listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
