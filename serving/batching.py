"""Server-side batching: concurrent requests for one model version share one model call.

A thread per (version, signature) takes the first queued request, gathers what
else is queued (waiting up to `batch_timeout_micros` for more) until
`max_batch_size` examples, runs the signature once on the concatenation and
hands each request its rows. While the model is busy, new requests queue up, so
batches grow with load and a lone request never waits for company.
"""

from __future__ import annotations

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

Tensors = dict[str, np.ndarray]
RunFn = Callable[[Tensors], Tensors]


@dataclass
class _Task:
    inputs: Tensors
    size: int
    future: Future
    enqueued: float


class Batcher:
    def __init__(self, run: RunFn, config: BatchingConfig, name: str,
                 on_batch: Callable[[int, float], None] | None = None):
        self._run = run
        self._config = config
        self._queue: queue.Queue[_Task | None] = queue.Queue(config.max_enqueued_batches * config.max_batch_size)
        self._on_batch = on_batch  # (batch size, queueing seconds of the oldest task)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, inputs: Tensors, size: int) -> Future:
        future: Future = Future()
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
                remaining = deadline - time.monotonic()
                try:
                    task = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
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
