"""Server-side batching: concurrent requests for one model version share one model call.

Requests queue per (version, signature). The request at the head of the queue
leads: on its own thread it gathers what else is queued, up to the batch size,
runs the signature once on the concatenation, hands each request its rows and
passes the lead to the head of what queued meanwhile. While the model is busy,
new requests queue up, so batches grow with load; a lone request runs on its own
thread, with no hand-off to a batching thread and back (a millisecond or so of a
single-image call on a small machine).

What TF Serving's batching does, this does too (tensorflow_serving/batching/
batching_session.cc and TensorFlow's shared_batch_scheduler.h): a request larger
than `max_batch_size` is refused with TF Serving's message, or split when large
batch splitting is on; a request whose deadline passed while it was queued is
dropped at dequeue with RESOURCE_EXHAUSTED instead of being run for nobody; the
time each request spent queued is reported. Where it differs, BatchingConfig
says so (`batch_wait`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serving.config import BatchingConfig
from serving.errors import ServingError, invalid_argument

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
RunFn = Callable[[Tensors], Tensors]
# Finds which of several requests has input the model refuses, more cheaply than running them
# one by one: returns, per request, the error it would get alone (None: it is fine).
LocateFn = Callable[[list[Tensors]], list[ServingError | None]]

QUEUE_TIMEOUT_MESSAGE = "Run() timeout exceeded while waiting in batching queue"  # TF Serving's
QUEUE_FULL_MESSAGE = "The batch scheduling queue to which this task was submitted is full"  # TF Serving's


def task_size_error(size: int, limit: int) -> ServingError:
    """TF Serving's refusal of a request larger than the batch limit (shared_batch_scheduler.h)."""
    return invalid_argument(f"Task size {size} is larger than maximum input batch size {limit}")


@dataclass(frozen=True)
class Caller:
    """When an answer stops being of use: the caller's deadline, or the caller having gone away."""

    deadline: float | None = None  # a time.monotonic() value; None: no deadline
    gone: Callable[[], bool] | None = None  # true once the client cancelled or closed its connection

    @staticmethod
    def within(seconds: float | None, gone: Callable[[], bool] | None = None) -> "Caller":
        return Caller(None if seconds is None else time.monotonic() + seconds, gone)

    def lost(self, now: float, queued: bool = True) -> ServingError | None:
        """The error to answer with instead of running the request, if nobody will read its answer.

        `queued`: it waited in a batch queue, where TF Serving answers an expired request with
        RESOURCE_EXHAUSTED; unbatched, the deadline simply passed before the model ran.
        """
        if self.deadline is not None and now >= self.deadline:
            if queued:
                return ServingError("RESOURCE_EXHAUSTED", QUEUE_TIMEOUT_MESSAGE)
            return ServingError("DEADLINE_EXCEEDED", "the request's deadline passed before the model ran")
        if self.gone is not None and self.gone():
            return ServingError("CANCELLED", "the client cancelled the request or closed its connection")
        return None


NO_CALLER = Caller()


@dataclass(frozen=True)
class BatchStats:
    """What one request, dequeue or model call did, for the metrics (serving/metrics.py)."""

    queued_s: list[float] = field(default_factory=list)  # per request taken off the queue, dropped ones too
    input_sizes: list[int] = field(default_factory=list)  # per input tensor of a request, as it is submitted
    batch_size: int | None = None  # examples in a model call, padded as TF Serving would pad them
    padding: int = 0  # of which padding


class Arrival:
    """A request on its way to a batcher: counted from when its servable is known until it is queued.

    While any request is on its way, a batch that is not full may wait for it (batch_wait
    "arriving"). Ends when the request is queued (`Batcher.run`) or fails first (`close`).
    """

    __slots__ = ("_batcher", "_open")

    def __init__(self, batcher: "Batcher"):
        self._batcher = batcher
        self._open = True

    def _end(self) -> None:  # under the batcher's lock
        if self._open:
            self._open = False
            self._batcher._arriving -= 1

    def close(self) -> None:
        """The request will not be queued after all (its input was refused): nobody waits for it."""
        with self._batcher._changed:
            self._end()
            self._batcher._changed.notify_all()

    def __enter__(self) -> "Arrival":
        return self

    def __exit__(self, *_) -> None:
        if self._open:
            self.close()


class _Request:
    """One caller's request: its parts (several when large batch splitting cut it up) and their signal."""

    __slots__ = ("caller", "parts", "signal")

    def __init__(self, caller: Caller):
        self.caller = caller
        self.parts: list[_Part] = []
        self.signal = threading.Semaphore(0)  # released when one of its parts is resolved or given the lead


class _Part:
    __slots__ = ("request", "inputs", "size", "enqueued", "outputs", "error", "done", "leads")

    def __init__(self, request: _Request, inputs: Tensors, size: int, enqueued: float):
        self.request = request
        self.inputs = inputs
        self.size = size
        self.enqueued = enqueued
        self.outputs: Tensors | None = None
        self.error: BaseException | None = None
        self.done = False
        self.leads = False

    def lead(self) -> None:
        self.leads = True
        self.request.signal.release()

    def resolve(self, outputs: Tensors | None = None, error: BaseException | None = None) -> None:
        self.outputs, self.error, self.done = outputs, error, True
        self.request.signal.release()


class Batcher:
    """Batches the concurrent requests for one signature of one version (leader/follower, see above)."""

    def __init__(self, run: RunFn, config: BatchingConfig, name: str,
                 on_stats: Callable[[BatchStats], None] | None = None, locate: LocateFn | None = None):
        self.name = name
        self._run = run
        self._locate = locate
        self._config = config
        self._capacity = config.max_enqueued_batches * config.max_batch_size  # queued examples
        self._on_stats = on_stats
        self._changed = threading.Condition()  # guards all below; notified when a request queues or stops coming
        self._queue: collections.deque[_Part] = collections.deque()
        self._queued_examples = 0
        self._arriving = 0
        self._leading = False  # a thread is gathering or running a batch; when False the queue is empty

    # -- introspection (tests, metrics) -------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A batch is being gathered or run."""
        return self._leading

    @property
    def queued(self) -> int:
        """Parts of requests waiting for a batch (not counting the batch being run)."""
        return len(self._queue)

    @property
    def arriving(self) -> int:
        return self._arriving

    # -- requests -----------------------------------------------------------------------------

    def arrival(self) -> Arrival:
        """Counts a request on its way here (see `Arrival`); pass it to `run`, or close it."""
        with self._changed:
            self._arriving += 1
        return Arrival(self)

    def check_size(self, size: int) -> None:
        """Refuses a request larger than a batch, as TF Serving does (unless splitting is on)."""
        if size > self._config.max_batch_size:
            raise task_size_error(size, self._config.max_batch_size)

    def run(self, inputs: Tensors, size: int, caller: Caller = NO_CALLER, arrival: Arrival | None = None) -> Tensors:
        """This request's outputs, computed in one model call with the requests queued beside it."""
        try:
            self.check_size(size)
        except ServingError:
            if arrival is not None:
                arrival.close()
            raise
        self._report(BatchStats(input_sizes=[size] * len(inputs)))
        request = _Request(caller)
        now = time.monotonic()
        request.parts = [_Part(request, part, part_size, now) for part, part_size in self._split(inputs, size)]
        with self._changed:
            if arrival is not None:
                arrival._end()
            if self._queued_examples + size > self._capacity:
                self._changed.notify_all()  # a leader waiting for this arrival stops waiting
                raise ServingError("UNAVAILABLE", QUEUE_FULL_MESSAGE)
            self._queue.extend(request.parts)
            self._queued_examples += size
            self._changed.notify_all()  # a leader gathering its batch may be waiting for these
            if not self._leading:
                self._leading = request.parts[0].leads = True  # the queue was empty: it is at the head
        led: set[int] = set()
        while True:
            for index, part in enumerate(request.parts):
                if part.leads and index not in led:
                    led.add(index)
                    self._lead()
            if all(part.done for part in request.parts):
                break
            request.signal.acquire()  # a part was resolved, or heads the queue and now leads
        errors = [part.error for part in request.parts if part.error is not None]
        if errors:
            raise errors[0]
        return _concatenate([part.outputs for part in request.parts])

    def _split(self, inputs: Tensors, size: int) -> list[tuple[Tensors, int]]:
        step = self._config.execution_batch_size
        if size <= step:
            return [(inputs, size)]
        return [({name: value[start:start + step] for name, value in inputs.items()}, min(step, size - start))
                for start in range(0, size, step)]

    # -- the leader -----------------------------------------------------------------------------

    def _lead(self) -> None:
        """Gathers a batch from the head of the queue, runs it, and passes the lead on."""
        try:
            batch = self._gather()
            if batch:
                self._settle(batch)
        finally:
            with self._changed:
                if self._queue:
                    self._queue[0].lead()
                else:
                    self._leading = False

    def _pop(self) -> _Part:
        part = self._queue.popleft()
        self._queued_examples -= part.size
        return part

    def _gather(self) -> list[_Part]:
        """The batch to run: the head of the queue and what fits behind it, after the batch's wait.

        As in TF Serving's ProcessBatch, a request is dequeued when its batch is processed: its
        queueing time ends then, and then it is dropped if nobody will read its answer.
        """
        limit = self._config.execution_batch_size
        with self._changed:
            first = self._pop()
            batch, size = [first], first.size
            deadline = first.enqueued + self._config.batch_timeout_micros / 1e6
            while size < limit:
                if self._queue:
                    if size + self._queue[0].size > limit:
                        break  # it starts the next batch
                    part = self._pop()
                    batch.append(part)
                    size += part.size
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._config.batch_wait == "arriving" and self._arriving == 0):
                    break  # nobody else is on the way: run now
                self._changed.wait(timeout=remaining)  # woken when a request queues or stops coming
        now = time.monotonic()
        self._report(BatchStats(queued_s=[now - part.enqueued for part in batch]))
        kept = []
        for part in batch:
            lost = part.request.caller.lost(now)
            if lost is None:
                kept.append(part)
            else:
                part.resolve(error=lost)
        return kept

    def _report(self, stats: BatchStats) -> None:
        if self._on_stats is None:
            return
        try:
            self._on_stats(stats)
        except Exception:  # metrics must not cost the batch its answers
            log.exception("recording batch metrics failed")

    def _call(self, parts: list[_Part]) -> Tensors:
        size = sum(part.size for part in parts)
        padded = self._config.padded_size(size)
        self._report(BatchStats(batch_size=padded, padding=padded - size))
        return self._run(_concatenate([part.inputs for part in parts]))

    def _settle(self, parts: list[_Part], located: bool = False) -> None:
        """Runs the parts as one batch and resolves every one; a bad request never fails its neighbours."""
        try:
            outputs = self._call(parts)
        except ServingError as error:
            if len(parts) == 1:
                parts[0].resolve(error=error)
            elif error.code != "INVALID_ARGUMENT":  # not one request's input: the model failed for all
                for part in parts:
                    part.resolve(error=error)
            else:
                self._isolate(parts, located)
            return
        except BaseException as error:  # resolves every part: a request must never hang
            log.exception("batched model call failed")
            for part in parts:
                if not part.done:
                    part.resolve(error=ServingError("INTERNAL", f"model call failed: {error}"))
            return
        start = 0
        for part in parts:
            end = start + part.size
            part.resolve({name: value[start:end] for name, value in outputs.items()})
            start = end

    def _isolate(self, parts: list[_Part], located: bool) -> None:
        """One request's bad input (say, bytes that do not decode) failed the whole call.

        First ask `locate` which requests are bad (cheap: it decodes, it does not run the
        model) and run the rest once more as one batch; if that cannot tell, or the rest
        still fails, halve the batch: log2(n) extra calls, never one call per request.
        """
        if self._locate is not None and not located:
            try:
                verdicts = self._locate([part.inputs for part in parts])
            except Exception:  # locating is an optimisation: halving still isolates
                log.exception("locating the bad request in a batch failed")
                verdicts = [None] * len(parts)
            if any(verdicts):
                good = []
                for part, error in zip(parts, verdicts):
                    if error is None:
                        good.append(part)
                    else:
                        part.resolve(error=error)
                if good:
                    self._settle(good, located=True)
                return
        middle = len(parts) // 2
        self._settle(parts[:middle], located=True)
        self._settle(parts[middle:], located=True)


def _concatenate(tensors: list[Tensors]) -> Tensors:
    """Several requests' tensors as one, alias by alias, in order (one request's as they are)."""
    if len(tensors) == 1:
        return tensors[0]
    return {name: np.concatenate([each[name] for each in tensors]) for name in tensors[0]}
