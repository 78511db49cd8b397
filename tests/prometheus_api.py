"""What the monitoring tests need to talk to a real Prometheus: free ports, queries, waiting."""

from __future__ import annotations

import socket
import time

import requests


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def query(prometheus_url: str, expr: str) -> dict:
    """One instant query through Prometheus's HTTP API; returns the whole JSON answer (errors included)."""
    response = requests.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=30)
    answer = response.json()
    answer.setdefault("http_status", response.status_code)
    return answer


def result(prometheus_url: str, expr: str) -> list[dict]:
    answer = query(prometheus_url, expr)
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    return answer["data"]["result"]


def wait_for(condition, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Polls `condition()` until it returns something truthy; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
