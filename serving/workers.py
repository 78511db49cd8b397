"""Threads that run blocking work for the event loop (REST predicts, the first load): a fixed set,
fed through one C queue.

`concurrent.futures.ThreadPoolExecutor.submit` takes a Python-level semaphore to decide whether to
start a thread; with dozens of workers releasing it, the event loop spent 27 % of its time there
under overload (a py-spy profile), and the loop is what answers health checks. Here handing work
over is one `SimpleQueue.put` and the answer comes back with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable


class Workers:
    """`count` threads, started at once, running functions for an asyncio event loop."""

    def __init__(self, count: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{index}", daemon=True)
                         for index in range(count)]
        for thread in self._threads:
            thread.start()

    def run(self, function: Callable, *args) -> asyncio.Future:
        """The result of `function(*args)`, run on one of the threads, as a future of the running loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((loop, future, function, args))
        return future

    def stop(self) -> None:
        """Threads finish what they run and take nothing more (they are daemons: none holds the exit)."""
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, function, args = item
            try:
                result, error = function(*args), None
            except BaseException as raised:  # handed to the awaiting coroutine, which decides
                result, error = None, raised
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody awaits the answer any more
                pass


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
