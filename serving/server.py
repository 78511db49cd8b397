"""`digits serve`: the model manager, the REST and gRPC front ends, and an orderly life cycle.

Start: load the versions on disk (so the ports open with a model), open gRPC and
REST, print where. SIGTERM or SIGINT at any moment, start-up included: stop
accepting, let in-flight requests finish, and return, all within the grace period
from the signal (a second signal cuts the wait short). What cannot be waited for
within it, such as a version load under way (TensorFlow cannot interrupt one), is
left behind: the caller then ends the process (`digits serve` exits 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from serving import runtime
from serving.config import ServerConfig
from serving.grpc_service import make_server
from serving.metrics import ServingMetrics
from serving.models import ModelManager, freeze_startup_heap
from serving.ports import PortError, bound_port, reserve_all
from serving.rest import make_app
from serving.service import PredictionService
from serving.workers import Workers

log = logging.getLogger(__name__)
_POLL_S = 0.02  # how often shutdown looks at what is still running


@dataclass(frozen=True)
class Endpoints:
    rest_port: int
    grpc_port: int
    versions: list[int]


def serve(config: ServerConfig, on_ready: Callable[[Endpoints], None] | None = None,
          sockets: tuple[socket.socket, socket.socket] | None = None) -> None:
    """Runs until SIGTERM/SIGINT. `on_ready` is called once both ports accept requests.

    `sockets`: the REST and gRPC sockets, bound and not listening (`serving.ports.reserve_all`), as
    `digits serve` claims them before importing TensorFlow; reserved here if not given.
    """
    if sockets is None:
        sockets = tuple(reserve_all(config.ports()))
    rest_socket, grpc_socket = sockets
    try:
        asyncio.run(_serve(config, on_ready, rest_socket, grpc_socket))
    finally:
        rest_socket.close()
        grpc_socket.close()


class _Stop:
    """The stop signal: when it came, and whether a second one asked not to wait any longer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, grace_s: float):
        self._loop = loop
        self._grace_s = grace_s
        self.requested = asyncio.Event()
        self.deadline: float | None = None

    def __call__(self) -> None:
        if self.requested.is_set():
            log.info("second stop signal: not waiting any longer")
            self.deadline = self._loop.time()
            return
        self.deadline = self._loop.time() + self._grace_s
        self.requested.set()

    def remaining(self) -> float:
        return max(0.0, self.deadline - self._loop.time()) if self.deadline is not None else float("inf")

    async def wait_until(self, done: Callable[[], bool]) -> bool:
        """Waits for `done()` while the grace lasts; False if time ran out first."""
        while not done():
            if self.remaining() <= 0:
                return False
            await asyncio.sleep(min(_POLL_S, self.remaining()))
        return True


async def _serve(config: ServerConfig, on_ready, rest_socket: socket.socket, grpc_socket: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = _Stop(loop, config.shutdown_grace_s)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    log.info("%s", runtime.apply(config.onednn, config.intra_op_threads, config.inter_op_threads))
    freeze_startup_heap()
    metrics = ServingMetrics()
    manager = ModelManager(config, metrics)
    if not await _load_existing(manager, stop):
        log.info("stopped during start-up, before the ports opened")
        return
    service = PredictionService(manager, metrics, config.max_concurrent_requests)
    workers = Workers(config.max_concurrent_requests, "rest")  # one per admitted predict: none ever waits for one
    # The reservation holds the gRPC port exclusively until gRPC binds it itself: it is released just
    # before, a window of microseconds (should another process bind the port in it, gRPC's bind fails
    # and the server ends with one line, after grpcio's own log line).
    grpc_port = bound_port(grpc_socket)
    grpc_socket.close()
    grpc_server, grpc_port = make_server(config, service, port=grpc_port)
    runner = web.AppRunner(make_app(config, service, workers), access_log=None,
                           shutdown_timeout=config.shutdown_grace_s, handle_signals=False)
    grpc_server.start()
    await runner.setup()
    site = web.SockSite(runner, rest_socket)
    try:
        await site.start()  # listens on the reserved socket
    except OSError as error:
        grpc_server.stop(None)
        raise PortError(f"cannot listen on {config.host}:{bound_port(rest_socket)} (REST): "
                        f"{error.strerror or error}") from None
    manager.start_polling()
    rest_port = bound_port(rest_socket)  # the real port when 0 was asked for
    if on_ready is not None:
        on_ready(Endpoints(rest_port, grpc_port, manager.available_versions()))
    await stop.requested.wait()

    log.info("shutting down: finishing %d in-flight predict requests (up to %.1f s)",
             service.admission.in_flight, stop.remaining())
    grpc_done = grpc_server.stop(stop.remaining())  # refuses new calls now; cancels the rest when the grace ends
    await site.stop()  # the REST port stops accepting connections
    manager.stop(timeout=0)  # no new loads; one under way is not waited for
    drained = await stop.wait_until(lambda: service.admission.in_flight == 0)
    # Answers already computed are written out, idle keep-alive connections closed; waited for here, not
    # by aiohttp's own timeout (the whole grace, fixed at its start), so that a second signal ends it too.
    cleanup = asyncio.ensure_future(runner.cleanup())
    if await stop.wait_until(cleanup.done):
        cleanup.result()  # re-raises a failed cleanup
    else:
        drained = False
        await _cancel(cleanup)
    if not await stop.wait_until(grpc_done.is_set):
        drained = False
    workers.stop()
    if drained:
        log.info("stopped: every in-flight request was answered")
    else:
        log.warning("stopped at the end of the grace period with %d predict requests unanswered",
                    service.admission.in_flight)


async def _cancel(task: asyncio.Future) -> None:
    """Cancels `task` and waits until it has ended. aiohttp's connection shutdown swallows a cancellation
    at each of its waits (on Python 3.10), so it is cancelled again until it ends."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_POLL_S)


async def _load_existing(manager: ModelManager, stop: _Stop) -> bool:
    """Loads the versions on disk on a daemon thread, so that a stop signal need not wait for it.

    Returns False if the signal came first (the load is left to finish or die with the process).
    """
    loader = Workers(1, "initial-load")
    loaded = loader.run(manager.load_existing)
    stopped = asyncio.ensure_future(stop.requested.wait())
    await asyncio.wait({loaded, stopped}, return_when=asyncio.FIRST_COMPLETED)
    loader.stop()
    if stop.requested.is_set():
        return False
    stopped.cancel()
    loaded.result()  # re-raises a failed load
    return True
