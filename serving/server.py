"""`digits serve`: the model manager, the REST and gRPC front ends, and an orderly life cycle.

Start: load the versions on disk (so the ports open with a model), open gRPC and
REST, print where. SIGTERM or SIGINT: stop accepting, let in-flight requests finish
(up to the grace period), unload, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from serving import runtime
from serving.config import ServerConfig
from serving.grpc_service import make_server
from serving.metrics import ServingMetrics
from serving.models import ModelManager
from serving.rest import make_app
from serving.service import PredictionService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    rest_port: int
    grpc_port: int
    versions: list[int]


def serve(config: ServerConfig, on_ready: Callable[[Endpoints], None] | None = None) -> None:
    """Runs until SIGTERM/SIGINT. `on_ready` is called once both ports accept requests."""
    asyncio.run(_serve(config, on_ready))


async def _serve(config: ServerConfig, on_ready) -> None:
    log.info("%s", runtime.apply(config.onednn, config.intra_op_threads, config.inter_op_threads))
    metrics = ServingMetrics()
    manager = ModelManager(config, metrics)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, manager.start)
    service = PredictionService(manager, metrics)
    executor = ThreadPoolExecutor(max_workers=config.max_concurrent_requests, thread_name_prefix="rest")
    grpc_server, grpc_port = make_server(config, service)
    runner = web.AppRunner(make_app(config, service, executor), access_log=None,
                           shutdown_timeout=config.shutdown_grace_s, handle_signals=False)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        grpc_server.start()
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.rest_port, reuse_address=True)
        await site.start()
        rest_port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for
        if on_ready is not None:
            on_ready(Endpoints(rest_port, grpc_port, manager.available_versions()))
        await stop.wait()
        log.info("shutting down: finishing in-flight requests (up to %.0f s)", config.shutdown_grace_s)
    finally:
        grpc_done = grpc_server.stop(config.shutdown_grace_s)
        await runner.cleanup()  # stops accepting, waits for running handlers up to shutdown_timeout
        await loop.run_in_executor(None, grpc_done.wait)
        executor.shutdown(wait=True)
        await loop.run_in_executor(None, manager.stop)
