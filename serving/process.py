"""`digits serve` as a child process on loopback: started, awaited until ready, stopped by PID.

For tests, benchmarks and scripts that need a real server and must clean it up.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class ChildProcess:
    """A `digits` subcommand running as a child: its output so far, and a stop by PID."""

    def __init__(self, process: subprocess.Popen, output: list[str], errors: list[str] | None = None):
        self.process = process
        self.output = output  # its stdout and stderr lines so far, as they came (threads keep reading)
        self.errors = errors if errors is not None else []  # its stderr lines alone

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (graceful), then SIGKILL if it has not exited in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        readers = getattr(self.process, "readers", ())
        for reader in readers:  # until they have taken everything it wrote
            reader.join(timeout=30)
        if not any(reader.is_alive() for reader in readers):  # its pipes, now, not whenever it is collected
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *_) -> None:
        self.stop()


class ServerProcess(ChildProcess):
    """A running `digits serve`, on ports the OS picked."""

    def __init__(self, process: subprocess.Popen, rest_port: int, grpc_port: int, output: list[str],
                 errors: list[str] | None = None):
        super().__init__(process, output, errors)
        self.rest_url = f"http://127.0.0.1:{rest_port}"
        self.grpc_target = f"127.0.0.1:{grpc_port}"


def spawn_digits(*args: str, cwd: Path | None = None) -> tuple[subprocess.Popen, list[str], list[str]]:
    """Starts `python -m digits ARGS...` without waiting.

    Returns the process, the list its stdout and stderr lines are appended to as they come, and the
    list of its stderr lines alone (each filled by a reader thread).
    """
    process = subprocess.Popen([sys.executable, "-m", "digits", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, bufsize=1)
    output: list[str] = []
    errors: list[str] = []

    def read(stream, *into: list[str]) -> None:
        for line in iter(stream.readline, ""):
            for lines in into:
                lines.append(line)

    process.readers = [threading.Thread(target=read, args=(stream, *into), daemon=True)
                       for stream, into in ((process.stdout, (output,)), (process.stderr, (output, errors)))]
    for reader in process.readers:
        reader.start()
    return process, output, errors


def spawn_server(model_dir: Path, *extra: str, cwd: Path | None = None) -> tuple[subprocess.Popen, list[str]]:
    """Starts `digits serve --model-dir MODEL_DIR --rest-port 0 --grpc-port 0 EXTRA...` without waiting.

    Returns the process and the list its stdout and stderr lines are appended to (by threads).
    """
    process, output, _ = _spawn_serve(model_dir, extra, cwd)
    return process, output


def _spawn_serve(model_dir: Path, extra: tuple[str, ...], cwd: Path | None):
    return spawn_digits("serve", "--model-dir", model_dir, "--host", "127.0.0.1", "--rest-port", "0",
                        "--grpc-port", "0", *extra, cwd=cwd)


def start_server(model_dir: Path, *extra: str, timeout: float = 180, cwd: Path | None = None) -> ServerProcess:
    """Starts `digits serve` as `spawn_server` does and waits until it is ready."""
    process, output, errors = _spawn_serve(model_dir, extra, cwd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = "".join(output)
        if "ready (" in text:
            rest = re.search(r"REST\s+http://127\.0\.0\.1:(\d+)/", text)
            grpc_port = re.search(r"gRPC\s+127\.0\.0\.1:(\d+)", text)
            return ServerProcess(process, int(rest.group(1)), int(grpc_port.group(1)), output, errors)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    process.wait(timeout=30)
    raise RuntimeError("digits serve did not become ready:\n" + "".join(output)[-3000:])
