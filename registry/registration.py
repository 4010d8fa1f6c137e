"""``TeacherRegistration``: a teacher's membership in its service, kept alive by heartbeats.

Lifecycle::

    reg = TeacherRegistration(url, "imagenet-r101", record, heartbeat_s=1.0, ttl_s=3.0)
    reg.start()                # registers (retrying up to startup_timeout_s), starts heartbeats
    reg.set_load(in_flight=3)  # written with the next heartbeat
    reg.set_serving(False)     # deregisters now, stops heartbeats (unhealthy / draining)
    reg.set_serving(True)      # registers again at once
    reg.close()                # deregisters and publishes a leave event

Each heartbeat, in one MULTI/EXEC, rewrites the record with ``SET ... PX
ttl``, refreshes the member's expiry score (Redis server time + ttl) and the
service's entry in ``edistill:services``. When ZADD reports the member as
new (first registration, or Redis came back empty after a restart, or a
reader pruned a late member) a ``join`` event is published, so watchers
react within a heartbeat. Redis outages are survived: a warning is logged
once, heartbeats keep trying, and the first one that succeeds registers the
teacher again by itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from redis import exceptions as redis_exc

from registry import keys
from registry._outage import OutageLog
from registry.connection import connect, map_redis_error, server_time_ms
from registry.errors import RegistryAuthError, RegistryConfigError, RegistryError
from registry.record import TeacherRecord, encode_record
from registry.urls import redact_url

__all__ = ["TeacherRegistration"]

logger = logging.getLogger(__name__)

# Fields the registration owns: changing them through update() would orphan
# keys (service, teacher_id) or lie about time.
_MANAGED_FIELDS = frozenset({"service", "teacher_id", "started_at", "updated_at", "schema"})


class TeacherRegistration:
    """Registers one teacher in a service and keeps it alive with heartbeats.

    Args:
        url: Redis URL (``redis://``, ``rediss://``, ``unix://``; password or
            ACL user as redis-py understands them). Never logged unredacted.
        service: service name; must equal ``record.service``.
        record: what students see; ``started_at``/``updated_at`` are filled in
            from the Redis server's clock.
        heartbeat_s: seconds between heartbeats.
        ttl_s: seconds after the last heartbeat until the teacher counts as
            gone; must exceed ``heartbeat_s`` (3x is a good ratio: two lost
            beats are tolerated).
        startup_timeout_s: how long :meth:`start` retries the first
            registration before raising (0 = one attempt).

    Raises:
        RegistryConfigError: bad names, URL, or timing values.
    """

    def __init__(
        self,
        url: str,
        service: str,
        record: TeacherRecord,
        *,
        heartbeat_s: float = 1.0,
        ttl_s: float = 3.0,
        startup_timeout_s: float = 10.0,
    ) -> None:
        keys.validate_name(service, "service")
        if not isinstance(record, TeacherRecord):
            raise RegistryConfigError(f"record must be a TeacherRecord, got {type(record).__name__}")
        if record.service != service:
            raise RegistryConfigError(f"record.service {record.service!r} does not match service {service!r}")
        if not heartbeat_s > 0:
            raise RegistryConfigError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        if not ttl_s > heartbeat_s:
            raise RegistryConfigError(
                f"ttl_s must be greater than heartbeat_s (e.g. 3x), got ttl_s={ttl_s} heartbeat_s={heartbeat_s}"
            )
        if ttl_s * 1000 < 1:
            raise RegistryConfigError(f"ttl_s must be at least 0.001, got {ttl_s}")
        if startup_timeout_s < 0:
            raise RegistryConfigError(f"startup_timeout_s must be >= 0, got {startup_timeout_s}")
        encode_record(record)  # size check now, not in the heartbeat thread
        self._url = url
        self._service = service
        self._heartbeat_s = heartbeat_s
        self._ttl_ms = int(ttl_s * 1000)
        self._startup_timeout_s = startup_timeout_s
        # A command that takes longer than the TTL cannot keep us alive anyway.
        timeout_s = min(2.0, ttl_s)
        self._client = connect(url, socket_timeout_s=timeout_s, connect_timeout_s=timeout_s)
        self._members_key = keys.members_key(service)
        self._record_key = keys.record_key(service, record.teacher_id)
        self._channel = keys.channel(service)
        self._who = f"registration of teacher {record.endpoint} in {service!r}"
        self._outage = OutageLog(logger, url, self._who)

        # Concurrency: _record_lock guards only self._record and is held for
        # microseconds, so update()/set_load() from a teacher's request path
        # never wait on Redis. _io_lock serializes every Redis write and
        # guards _serving/_registered/_started_at_s, so a heartbeat can
        # never land after set_serving(False) or close() deregistered us.
        self._record_lock = threading.Lock()
        self._record = record
        self._io_lock = threading.Lock()
        self._serving = True
        self._registered = False
        self._started_at_s = 0.0
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- public -----------------------------------------------------------

    @property
    def record(self) -> TeacherRecord:
        """The current record (timestamps from the last successful heartbeat)."""
        with self._record_lock:
            return self._record

    @property
    def registered(self) -> bool:
        """Whether the last heartbeat succeeded and the teacher is not deregistered."""
        return self._registered

    @property
    def serving(self) -> bool:
        """False after ``set_serving(False)``: no heartbeats, not registered."""
        return self._serving

    @property
    def last_error(self) -> RegistryError | None:
        """The error of the last failed Redis operation while still failing, else None."""
        error = self._outage.last_error
        return error if isinstance(error, RegistryError) else None

    def start(self) -> "TeacherRegistration":
        """Register now and start heartbeating in a daemon thread.

        Retries while Redis is unreachable for up to ``startup_timeout_s``.

        Raises:
            RegistryAuthError: Redis refused the credentials (not retried).
            RegistryUnavailableError: still unreachable after ``startup_timeout_s``.
        """
        if self._thread is not None:
            raise RegistryError(f"{self._who} was already started")
        deadline = time.monotonic() + self._startup_timeout_s
        warned = False
        while True:
            try:
                with self._io_lock:
                    self._beat_locked()
                break
            except (redis_exc.RedisError, OSError) as exc:
                error = map_redis_error(exc, self._url, "registering")
                remaining = deadline - time.monotonic()
                if isinstance(error, RegistryAuthError) or remaining <= 0:
                    self._client.close()
                    raise error from exc
                if not warned:  # otherwise a teacher is silent for the whole startup timeout
                    warned = True
                    logger.warning("%s: cannot reach Redis at %s; retrying for %g s (%s)",
                                   self._who, redact_url(self._url), self._startup_timeout_s, error)
                else:
                    logger.debug("%s: first registration failed, retrying: %s", self._who, error)
                time.sleep(min(self._heartbeat_s, remaining))
        self._thread = threading.Thread(target=self._run, name=f"edistill-heartbeat-{self._service}", daemon=True)
        self._thread.start()
        return self

    def update(self, **changes: Any) -> None:
        """Change record fields (e.g. ``in_flight=3``, ``model_version="v2"``).

        Validated now; written to Redis with the next heartbeat.

        Raises:
            BadRecordError: invalid value, or the record would exceed its size limit.
            RegistryConfigError: a field the registration manages
                (service, teacher_id, started_at, updated_at, schema).
        """
        managed = _MANAGED_FIELDS.intersection(changes)
        if managed:
            raise RegistryConfigError(f"cannot update managed record field(s): {', '.join(sorted(managed))}")
        with self._record_lock:
            new = self._record.replace(**changes)
            encode_record(new)
            self._record = new

    def set_load(self, in_flight: int, queued: int = 0, requests_total: int | None = None) -> None:
        """Report the current load; shorthand for :meth:`update`."""
        changes: dict[str, Any] = {"in_flight": in_flight, "queued": queued}
        if requests_total is not None:
            changes["requests_total"] = requests_total
        self.update(**changes)

    def set_serving(self, serving: bool) -> None:
        """Stop (``False``: deregister now, no heartbeats) or resume (``True``) serving.

        Deregistration is best effort: if Redis is unreachable a warning is
        logged and the entry expires within one TTL. Resuming registers again
        on the heartbeat thread at once.
        """
        with self._io_lock:
            if serving == self._serving:
                return
            self._serving = serving
            if not serving:
                self._deregister_locked("stopped serving")
        if serving:
            logger.info("%s: serving again, registering", self._who)
            self._wake.set()

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop heartbeats, deregister (best effort) and publish a leave event. Idempotent.

        Returns True if this call removed the entry from Redis; False if it
        could not (Redis unreachable: a warning was logged and the entry
        expires within one TTL) or there was nothing to remove (already
        closed, or not serving).
        """
        if self._closing:
            return False
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        removed = False
        with self._io_lock:
            if self._serving:
                removed = self._deregister_locked("closing")
            self._serving = False
        self._client.close()
        return removed

    def __enter__(self) -> "TeacherRegistration":
        """Start (unless already started); :meth:`close` on exit."""
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- heartbeat thread -------------------------------------------------

    def _run(self) -> None:
        next_beat = time.monotonic() + self._heartbeat_s
        while True:
            self._wake.wait(max(0.0, next_beat - time.monotonic()))
            self._wake.clear()
            if self._closing:
                return
            next_beat = time.monotonic() + self._heartbeat_s
            with self._io_lock:
                if not self._serving or self._closing:
                    continue
                try:
                    self._beat_locked()
                except (redis_exc.RedisError, OSError) as exc:
                    self._registered = False
                    self._outage.failed(exc, "heartbeating", "retrying every heartbeat, will re-register by itself")
                except Exception:  # keep beating whatever happens; a dead thread = a silently dead teacher
                    logger.exception("%s: unexpected error in heartbeat", self._who)

    def _beat_locked(self) -> None:
        """One heartbeat. Caller holds _io_lock."""
        now_ms = server_time_ms(self._client)
        if not self._started_at_s:
            self._started_at_s = now_ms / 1000.0
        with self._record_lock:
            record = self._record.replace(started_at=self._started_at_s, updated_at=now_ms / 1000.0)
        data = encode_record(record)
        expiry_ms = now_ms + self._ttl_ms
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._record_key, data, px=self._ttl_ms)
        pipe.zadd(self._members_key, {record.teacher_id: expiry_ms})
        pipe.pexpire(self._members_key, keys.HOUSEKEEPING_TTL_MS)
        pipe.zadd(keys.SERVICES_KEY, {self._service: expiry_ms})
        pipe.pexpire(keys.SERVICES_KEY, keys.HOUSEKEEPING_TTL_MS)
        added = pipe.execute()[1]
        with self._record_lock:
            # Keep fields changed by update() since the snapshot above.
            self._record = self._record.replace(started_at=record.started_at, updated_at=record.updated_at)
        was_registered, self._registered = self._registered, True
        recovered = self._outage.ok()
        if added:
            self._publish("join", record)
            if recovered or was_registered:
                logger.info("%s: registered again (Redis lost the entry)", self._who)
            else:
                logger.info("%s: registered (heartbeat %gs, ttl %gs)", self._who, self._heartbeat_s, self._ttl_ms / 1000)

    def _deregister_locked(self, why: str) -> bool:
        """Remove our entry and publish a leave event; True if done. Caller holds _io_lock. Never raises."""
        self._registered = False
        record = self.record
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.zrem(self._members_key, record.teacher_id)
            pipe.delete(self._record_key)
            pipe.publish(self._channel, _event("leave", record))
            pipe.execute()
            logger.info("%s: deregistered (%s)", self._who, why)
            return True
        except (redis_exc.RedisError, OSError) as exc:
            error = map_redis_error(exc, self._url, "deregistering")
            logger.warning("%s: %s; the entry expires by itself within %gs", self._who, error, self._ttl_ms / 1000)
            return False

    def _publish(self, event: str, record: TeacherRecord) -> None:
        # A lost event only delays watchers until their next poll.
        try:
            self._client.publish(self._channel, _event(event, record))
        except (redis_exc.RedisError, OSError) as exc:
            logger.debug("%s: publishing %s failed: %s", self._who, event, map_redis_error(exc, self._url, "publishing"))


def _event(event: str, record: TeacherRecord) -> bytes:
    return json.dumps({"event": event, "teacher_id": record.teacher_id, "endpoint": record.endpoint}).encode()
