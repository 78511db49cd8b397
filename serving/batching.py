"""Server-side batching: concurrent requests for one model version share one model call.

A thread per (version, signature) takes the first queued request, gathers what
else is queued until `max_batch_size` examples (waiting up to
`batch_timeout_micros` for requests that are still being parsed), runs the
signature once on the concatenation and hands each request its rows. While the
model is busy, new requests queue up, so batches grow with load, and a lone
request never waits for company.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from serving.config import BatchingConfig
from serving.errors import ServingError

log = logging.getLogger(__name__)

_ARRIVAL_POLL_S = 0.0005
Tensors = dict[str, np.ndarray]
RunFn = Callable[[Tensors], Tensors]


class Arrivals:
    """Counts requests that are on their way to a batcher (being parsed and checked).

    A batch that is not full waits for more work only while such requests exist, and at
    most `batch_timeout_micros`: under load, batches fill up; a lone request never waits.
    Each request is handled on one thread from parsing to submission, so the mark is
    thread-local.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0
        self._local = threading.local()

    @property
    def count(self) -> int:
        return self._count

    def add(self) -> None:
        """Counts a request before the thread that will submit it is known (see `tracking(added=True)`)."""
        with self._lock:
            self._count += 1

    def remove(self) -> None:
        with self._lock:
            self._count -= 1

    @contextlib.contextmanager
    def tracking(self, added: bool = False):
        """Counts this thread's request until it reaches a batcher; `added`: `add()` counted it already."""
        if not added:
            self.add()
        self._local.arriving = True
        try:
            yield
        finally:
            self.arrived()

    def arrived(self) -> None:
        """This thread's request reached a batcher (or failed before): it no longer counts."""
        if getattr(self._local, "arriving", False):
            self._local.arriving = False
            self.remove()


@dataclass
class _Task:
    inputs: Tensors
    size: int
    future: Future
    enqueued: float


class Batcher:
    def __init__(self, run: RunFn, config: BatchingConfig, name: str, arrivals: Arrivals | None = None,
                 on_batch: Callable[[int, float], None] | None = None):
        self._run = run
        self._arrivals = arrivals or Arrivals()
        self._config = config
        self._queue: queue.Queue[_Task | None] = queue.Queue(config.max_enqueued_batches * config.max_batch_size)
        self._on_batch = on_batch  # (batch size, queueing seconds of the oldest task)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, inputs: Tensors, size: int) -> Future:
        future: Future = Future()
        self._arrivals.arrived()
        if self._closed:  # the version was unloaded after the request picked it: serve it directly
            _settle([_Task(inputs, size, future, time.monotonic())], self._run)
            return future
        try:
            self._queue.put_nowait(_Task(inputs, size, future, time.monotonic()))
        except queue.Full:
            raise ServingError("UNAVAILABLE", "The batch scheduling queue to which this task was submitted is full")
        return future

    def close(self) -> None:
        """Serves what is queued, then stops the thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        carry: _Task | None = None
        while True:
            first = carry or self._queue.get()
            carry = None
            if first is None:
                return
            tasks, size = [first], first.size
            deadline = time.monotonic() + self._config.batch_timeout_micros / 1e6
            stop = False
            while size < self._config.max_batch_size:
                try:
                    task = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._arrivals.count == 0:
                        break  # nobody else is coming: run now
                    try:  # short waits, to notice when the last arriving request was refused elsewhere
                        task = self._queue.get(timeout=min(remaining, _ARRIVAL_POLL_S))
                    except queue.Empty:
                        continue
                if task is None:
                    stop = True
                    break
                if size + task.size > self._config.max_batch_size:
                    carry = task  # starts the next batch; a request is never split
                    break
                tasks.append(task)
                size += task.size
            if self._on_batch is not None:
                self._on_batch(size, time.monotonic() - first.enqueued)
            _settle(tasks, self._run)
            if stop:
                if carry is not None:
                    _settle([carry], self._run)
                return


def _settle(tasks: list[_Task], run: RunFn) -> None:
    """Runs the tasks as one batch and resolves their futures; a bad request never fails its neighbours."""
    try:
        if len(tasks) == 1:
            outputs = run(tasks[0].inputs)
        else:
            outputs = run({name: np.concatenate([task.inputs[name] for task in tasks])
                           for name in tasks[0].inputs})
    except ServingError as error:
        if len(tasks) == 1:
            tasks[0].future.set_exception(error)
            return
        # One request's bad input (say, bytes that are not an image) fails the whole call:
        # run them one by one so only that request gets the error.
        for task in tasks:
            _settle([task], run)
        return
    except BaseException as error:  # resolves every future: a request must never hang
        log.exception("batched model call failed")
        for task in tasks:
            task.future.set_exception(ServingError("INTERNAL", f"model call failed: {error}"))
        return
    start = 0
    for task in tasks:
        end = start + task.size
        task.future.set_result({name: value[start:end] for name, value in outputs.items()})
        start = end
