"""The server-side batcher on its own: who waits, what is merged, who runs it, and who gets an error.

Each request runs on its own thread, as in the server (a REST worker or a gRPC thread).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from serving.batching import Arrivals, Batcher
from serving.config import BatchingConfig
from serving.errors import ServingError


class Model:
    """Records the batches it is called with; refuses any batch holding b"bad"; can be held."""

    def __init__(self):
        self.calls: list[list[bytes]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, inputs: dict) -> dict:
        self.entered.set()
        self.release.wait(timeout=30)
        images = list(inputs["image_bytes"])
        self.calls.append(images)
        if b"bad" in images:
            raise ServingError("INVALID_ARGUMENT", "Invalid PNG data")
        return {"length": np.array([len(image) for image in images])}


def _request(*images: bytes) -> dict:
    return {"image_bytes": np.array(images, dtype=object)}


class Clients:
    """Threads that each send one request through the batcher; on exit, the model is let go and they finish."""

    def __init__(self, batcher: Batcher, model: Model):
        self._batcher = batcher
        self._model = model
        self._pool = ThreadPoolExecutor(max_workers=16)

    def send(self, *images: bytes) -> Future:
        return self._pool.submit(self._batcher.run, _request(*images), len(images))

    def send_held(self, *images: bytes) -> Future:
        """Sends a request and holds the model inside its call (until `model.release` is set)."""
        self._model.release.clear()
        future = self.send(*images)
        assert self._model.entered.wait(timeout=10)
        return future

    def send_queued(self, *images: bytes) -> Future:
        """Sends a request and waits until it is queued behind the batch that is running."""
        queued = self._batcher.queued
        future = self.send(*images)
        _wait_for(lambda: self._batcher.queued == queued + 1)
        return future

    def __enter__(self) -> "Clients":
        return self

    def __exit__(self, *_) -> None:
        self._model.release.set()
        self._pool.shutdown(wait=True)


def _wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_lone_request_does_not_wait_for_company():
    model = Model()
    batcher = Batcher(model, BatchingConfig(batch_timeout_micros=60_000_000), "lone")
    with Clients(batcher, model) as clients:
        # Were it to wait for the 60 s timeout, result() would give up after 10 s.
        assert clients.send(b"abc").result(timeout=10)["length"].tolist() == [3]
    assert model.calls == [[b"abc"]]


def test_a_lone_request_runs_on_its_own_thread():
    threads = []

    def model(inputs: dict) -> dict:
        threads.append(threading.current_thread())
        return {"length": np.array([len(image) for image in inputs["image_bytes"]])}

    batcher = Batcher(model, BatchingConfig(), "inline")
    assert batcher.run(_request(b"abc"), 1)["length"].tolist() == [3]
    assert threads == [threading.current_thread()]


def test_requests_queued_while_the_model_is_busy_share_one_call():
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=4), "busy")
    with Clients(batcher, model) as clients:
        first = clients.send_held(b"a")
        rest = [clients.send_queued(b"b" * n) for n in range(1, 6)]  # 5 queue up behind
        model.release.set()
        assert first.result(timeout=10)["length"].tolist() == [1]
        assert [f.result(timeout=10)["length"].tolist() for f in rest] == [[1], [2], [3], [4], [5]]
    # The 5 queued ones: one call of 4 (max_batch_size), then the fifth.
    assert [len(call) for call in model.calls] == [1, 4, 1]


def test_one_bad_request_does_not_fail_the_others_in_its_batch():
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=8), "bad")
    with Clients(batcher, model) as clients:
        blocker = clients.send_held(b"x")
        good, bad, also_good = (clients.send_queued(data) for data in (b"ok", b"bad", b"fine"))
        model.release.set()
        blocker.result(timeout=10)
        assert good.result(timeout=10)["length"].tolist() == [2]
        assert also_good.result(timeout=10)["length"].tolist() == [4]
        with pytest.raises(ServingError, match="Invalid PNG data"):
            bad.result(timeout=10)
    assert [b"ok", b"bad", b"fine"] in model.calls  # tried together first, then one by one


def test_a_batch_waits_for_a_request_that_is_still_being_parsed():
    model = Model()
    arrivals = Arrivals()
    batcher = Batcher(model, BatchingConfig(max_batch_size=8, batch_timeout_micros=30_000_000), "wait", arrivals)
    parsing = threading.Event()
    go_on = threading.Event()

    def slow_client() -> None:
        with arrivals.tracking():  # counted from here...
            parsing.set()
            go_on.wait(timeout=10)
            batcher.run(_request(b"late"), 1)  # ...to here

    client = threading.Thread(target=slow_client)
    with Clients(batcher, model) as clients:
        try:
            client.start()
            assert parsing.wait(timeout=10)
            early = clients.send(b"early")
            _wait_for(lambda: batcher.busy)  # the early one leads, and waits for company
            go_on.set()
            assert early.result(timeout=20)["length"].tolist() == [5]
            client.join(timeout=20)
        finally:
            go_on.set()
    assert model.calls == [[b"early", b"late"]]
    assert arrivals.count == 0


def test_a_full_queue_refuses_with_unavailable():
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=1, max_enqueued_batches=1), "full")
    with Clients(batcher, model) as clients:
        running = clients.send_held(b"a")
        queued = clients.send_queued(b"b")
        with pytest.raises(ServingError, match="queue .* is full") as refused:
            batcher.run(_request(b"c"), 1)  # refused at once, on the caller's thread
        assert refused.value.code == "UNAVAILABLE" and refused.value.http_status == 503
        model.release.set()
        assert running.result(timeout=10) and queued.result(timeout=10)
