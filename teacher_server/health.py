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
    """grpc's asyncio health servicer whose Watch streams end with NOT_SERVING at shutdown.

    Watch is this class's own loop rather than a wrapper around grpc's: cancelling
    grpc's Watch while it is inside ``context.write`` (which a shutdown wakes it
    to do) could leave the stream open, about one run in six.
    """

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Condition()  # bound to the server's loop at first use

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        last = None
        while True:
            async with self._changed:  # read under the condition: no change is missed
                while True:
                    shutting = self._gracefully_shutting_down
                    status = not_serving if shutting else self._server_status.get(request.service, unknown)
                    if status != last or shutting:
                        break
                    await self._changed.wait()
            if status != last:  # written outside the lock: a slow watcher never blocks set()
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if shutting:
                return  # the stream ends (OK): an open stream would hold the drain

    async def set(self, service: str, status) -> None:
        await super().set(service, status)
        await self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service (grpc's behaviour), then end the Watch streams."""
        await super().enter_graceful_shutdown()
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
