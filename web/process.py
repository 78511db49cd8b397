"""`digits web` as a child process on loopback: started, awaited until ready, stopped by PID.

For tests and benchmarks that need the real app (its own process, its own event loop) and must
clean it up. (Not part of the app: the web image leaves serving/process.py out.)
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from serving.process import ChildProcess, spawn_digits


class WebProcess(ChildProcess):
    """A running `digits web` on a port the OS picked."""

    def __init__(self, process: subprocess.Popen, port: int, output: list[str], errors: list[str] | None = None):
        super().__init__(process, output, errors)
        self.url = f"http://127.0.0.1:{port}"


# Tests and benchmarks are one client (loopback) sending far more than a person: without rate limits
# unless they set them (the rate-limit test does).
UNLIMITED = ("--predicts-per-minute", "1000000", "--feedback-per-minute", "1000000",
             "--sheets-per-minute", "1000000")


def start_web(*args: str | Path, timeout: float = 60, cwd: Path | None = None) -> WebProcess:
    """Starts `digits web --host 127.0.0.1 --port 0 ARGS...` and waits until it listens; without rate
    limits unless ARGS give them."""
    limits = () if any(str(arg).endswith("-per-minute") for arg in args) else UNLIMITED
    process, output, errors = spawn_digits("web", "--host", "127.0.0.1", "--port", "0", *limits, *args, cwd=cwd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = "".join(output)
        found = re.search(r"on http://127\.0\.0\.1:(\d+)/", text)
        if found and "ready (" in text:
            return WebProcess(process, int(found.group(1)), output, errors)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=30)
    raise RuntimeError("digits web did not become ready:\n" + "".join(output)[-3000:])
