"""The teacher's ``grpc.health.v1`` service: grpc's own, except that Watch streams end at shutdown.

An open ``Health/Watch`` stream (Envoy, grpc's client-side health checking,
``grpc_health_probe -watch``) is an in-flight RPC, and
``grpc.aio.Server.stop(grace)`` waits for in-flight RPCs: with grpc's servicer
a SIGTERMed teacher with one watcher drained its requests and then sat out the
rest of ``grace_s`` before exiting. Here each stream gets NOT_SERVING when
shutdown starts and then ends (``OK``), so the drain waits only for requests.
New health checks are refused from the moment gRPC stops accepting calls
(:meth:`teacher_server.server.TeacherServer.stop`), which health checkers read
as unhealthy too.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

__all__ = ["HealthServicer"]


class HealthServicer(health_aio.HealthServicer):
    """grpc's asyncio health servicer whose Watch streams end with NOT_SERVING at shutdown."""

    def __init__(self) -> None:
        super().__init__()
        self._shutting_down = asyncio.Event()  # bound to the server's loop at its first wait

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        # grpc's Watch never returns while the client listens: run it beside the shutdown event.
        watch = asyncio.ensure_future(super().Watch(request, context))
        shutdown = asyncio.ensure_future(self._shutting_down.wait())
        try:
            await asyncio.wait({watch, shutdown}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the client cancels the stream (this handler is cancelled)
            watch.cancel()
            shutdown.cancel()
        if watch.done() and not watch.cancelled() and watch.exception() is not None:
            raise watch.exception()
        # grpc's Watch may have sent NOT_SERVING already: a repeated status is harmless
        # (a watcher acts on the latest one), a stream left open holds the drain.
        await context.write(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING))

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service (grpc's behaviour), then end the Watch streams."""
        await super().enter_graceful_shutdown()
        self._shutting_down.set()
