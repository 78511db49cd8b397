"""Server-side batching: concurrent requests for one model version share one model call.

Requests queue per (version, signature). The request at the head of the queue
leads: on its own thread it gathers what else is queued, up to `max_batch_size`
examples (waiting up to `batch_timeout_micros` for requests that are still being
parsed), runs the signature once on the concatenation, hands each request its
rows and passes the lead to the head of what queued meanwhile. While the model is
busy, new requests queue up, so batches grow with load; a lone request never
waits for company and runs on its own thread, with no hand-off to a batching
thread and back (a millisecond or so of a single-image call on a small machine).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass(eq=False)
class _Task:
    inputs: Tensors
    size: int
    enqueued: float
    ready: threading.Event = field(default_factory=threading.Event)
    leads: bool = False  # set (with `ready`) when it heads the queue and its thread is to run the next batch
    outputs: Tensors | None = None
    error: BaseException | None = None

    def lead(self) -> None:
        self.leads = True
        self.ready.set()

    def resolve(self, outputs: Tensors | None = None, error: BaseException | None = None) -> None:
        self.outputs, self.error = outputs, error
        self.ready.set()

    def result(self) -> Tensors:
        if self.error is not None:
            raise self.error
        return self.outputs


class Batcher:
    """Batches the concurrent requests for one signature of one version (leader/follower, see above)."""

    def __init__(self, run: RunFn, config: BatchingConfig, name: str, arrivals: Arrivals | None = None,
                 on_batch: Callable[[int, float], None] | None = None):
        self.name = name
        self._run = run
        self._arrivals = arrivals or Arrivals()
        self._config = config
        self._capacity = config.max_enqueued_batches * config.max_batch_size
        self._on_batch = on_batch  # (batch size, queueing seconds of the oldest task)
        self._changed = threading.Condition()  # guards the queue and the lead; notified when a task queues
        self._queue: collections.deque[_Task] = collections.deque()
        self._leading = False  # a thread is gathering or running a batch; when False the queue is empty

    @property
    def busy(self) -> bool:
        """A batch is being gathered or run."""
        return self._leading

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the one being run)."""
        return len(self._queue)

    def run(self, inputs: Tensors, size: int) -> Tensors:
        """This request's outputs, computed in one model call with the requests queued beside it."""
        task = _Task(inputs, size, time.monotonic())
        self._arrivals.arrived()
        with self._changed:
            if len(self._queue) >= self._capacity:
                raise ServingError("UNAVAILABLE", "The batch scheduling queue to which this task was submitted is full")
            self._queue.append(task)
            self._changed.notify()  # a leader gathering its batch may be waiting for this one
            if not self._leading:
                self._leading = task.leads = True
        if not task.leads:
            task.ready.wait()  # its rows are ready, or it heads the queue and now leads
        if task.leads:
            self._lead()
        return task.result()

    def _lead(self) -> None:
        """Gathers a batch from the head of the queue, runs it, and passes the lead on."""
        batch, size = self._gather()
        try:
            if self._on_batch is not None:
                self._on_batch(size, time.monotonic() - batch[0].enqueued)
        except Exception:  # metrics must not cost the batch its answers
            log.exception("recording batch metrics failed")
        try:
            _settle(batch, self._run)
        finally:
            with self._changed:
                if self._queue:
                    self._queue[0].lead()
                else:
                    self._leading = False

    def _gather(self) -> tuple[list[_Task], int]:
        limit = self._config.max_batch_size
        deadline = time.monotonic() + self._config.batch_timeout_micros / 1e6
        with self._changed:
            first = self._queue.popleft()
            batch, size = [first], first.size
            while size < limit:
                if self._queue:
                    if size + self._queue[0].size > limit:
                        break  # it starts the next batch: a request is never split
                    task = self._queue.popleft()
                    batch.append(task)
                    size += task.size
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._arrivals.count == 0:
                    break  # nobody else is coming: run now
                # Short waits, to notice when the last arriving request was refused elsewhere.
                self._changed.wait(timeout=min(remaining, _ARRIVAL_POLL_S))
        return batch, size


def _settle(tasks: list[_Task], run: RunFn) -> None:
    """Runs the tasks as one batch and resolves every one of them; a bad request never fails its neighbours."""
    try:
        if len(tasks) == 1:
            outputs = run(tasks[0].inputs)
        else:
            outputs = run({name: np.concatenate([task.inputs[name] for task in tasks])
                           for name in tasks[0].inputs})
        start = 0
        for task in tasks:
            end = start + task.size
            task.resolve({name: value[start:end] for name, value in outputs.items()})
            start = end
    except ServingError as error:
        if len(tasks) == 1:
            tasks[0].resolve(error=error)
            return
        # One request's bad input (say, bytes that are not an image) fails the whole call:
        # run them one by one so only that request gets the error.
        for task in tasks:
            _settle([task], run)
    except BaseException as error:  # resolves every task: a request must never hang
        log.exception("batched model call failed")
        for task in tasks:
            if task.outputs is None and task.error is None:
                task.resolve(error=ServingError("INTERNAL", f"model call failed: {error}"))
