"""``TeacherWatcher``: a student's live view of a service's teachers.

One daemon thread subscribes to the service's event channel and re-reads the
service (:func:`registry.discovery.fetch_service`) on every event *and* every
``poll_s`` (pub/sub is lossy: messages sent while a subscriber reconnects are
gone). A join therefore shows up within one heartbeat while pub/sub works,
and within ``poll_s`` when it does not (e.g. an ACL user without pub/sub
permission, or events lost during a reconnect).

While Redis is unreachable the watcher keeps the last known set (a warning
is logged once), keeps retrying every ``poll_s``, and resubscribes when Redis
returns. Malformed records are skipped with one warning per teacher id.

While the service has no live teacher, each read also lists the services
that do have some (:attr:`TeacherWatcher.other_services`), so a student can
say "no teacher of 'imagenet-r10'; services with live teachers: imagenet-r101"
without a Redis call of its own (it asks from under its own lock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Mapping

import redis
from redis import exceptions as redis_exc

from registry import keys
from registry._outage import OutageLog
from registry.connection import connect, map_redis_error
from registry.discovery import fetch_service, list_services
from registry.errors import RegistryAuthError, RegistryConfigError, RegistryError
from registry.record import TeacherRecord

__all__ = ["Snapshot", "TeacherWatcher"]

logger = logging.getLogger(__name__)

Snapshot = dict[str, TeacherRecord]
"""Live teachers by endpoint (``host:port``)."""

# Longest blocking read on the pub/sub socket: bounds how long close() waits.
_MAX_BLOCK_S = 0.2
# While the subscription is down (Redis outage), try to restore it this often,
# so a watcher with a long poll_s still recovers within a heartbeat or so.
_RESUBSCRIBE_S = 0.25
# Re-read this long after the earliest member expiry, so the expired member
# is certainly out of the range read (expiry is in whole server milliseconds).
_EXPIRY_MARGIN_S = 0.01


def _is_permission_error(exc: BaseException) -> bool:
    """NOPERM: the ACL user may not SUBSCRIBE (bad credentials are a different error)."""
    return isinstance(exc, redis_exc.NoPermissionError) or (
        isinstance(exc, redis_exc.ResponseError) and str(exc).startswith("NOPERM")
    )


def _content(snapshot: Mapping[str, TeacherRecord]) -> dict[str, TeacherRecord]:
    """A snapshot without heartbeat timestamps: what counts as a change."""
    return {endpoint: record.replace(updated_at=0.0) for endpoint, record in snapshot.items()}


class TeacherWatcher:
    """Watches a service and reports its live teachers.

    Args:
        url: Redis URL (never logged unredacted).
        service: service name.
        on_change: called as ``on_change(snapshot)`` from the watcher's thread
            with the full live set (endpoint -> record): once after
            :meth:`start`, then whenever a teacher joins or leaves or its
            record changes (load, version, ...; heartbeat timestamps alone do
            not count). Exceptions it raises are logged, not propagated.
        poll_s: seconds between full re-reads (the fallback for lost events).
        outage_grace_s: after Redis comes back from an outage it may be empty
            (restarted without persistence) until teachers re-register, which
            takes up to one heartbeat. For this long after recovery, teachers
            known before the outage stay in the snapshot unless their fresh
            record shows up; so students do not drop every teacher at once.
            Default: the default ``ttl_s``.
        use_pubsub: subscribe to join/leave events (disable to poll only).

    Raises:
        RegistryConfigError: bad service name, URL or poll_s.
    """

    def __init__(
        self,
        url: str,
        service: str,
        *,
        on_change: Callable[[Snapshot], object] | None = None,
        poll_s: float = 1.0,
        outage_grace_s: float = 3.0,
        use_pubsub: bool = True,
    ) -> None:
        keys.validate_name(service, "service")
        if not poll_s > 0:
            raise RegistryConfigError(f"poll_s must be > 0, got {poll_s}")
        if outage_grace_s < 0:
            raise RegistryConfigError(f"outage_grace_s must be >= 0, got {outage_grace_s}")
        self._url = url
        self._service = service
        self._on_change = on_change
        self._poll_s = poll_s
        self._outage_grace_s = outage_grace_s
        self._use_pubsub = use_pubsub
        self._client = connect(url)
        self._channel = keys.channel(service)
        self._who = f"watcher of {service!r}"
        self._outage = OutageLog(logger, url, self._who)
        self._lock = threading.Lock()  # guards _snapshot (read by snapshot() from any thread)
        self._snapshot: Snapshot = {}
        # Below: touched only by the watcher thread (and start() before it runs).
        self._delivered: dict[str, TeacherRecord] | None = None
        self._warned_bad: dict[str, str] = {}
        self._refresh_failing = False  # an unexpected (non-Redis) read error was logged
        # Written by the watcher thread (and start()), read by any thread: one reference swap.
        self._other_services: tuple[str, ...] | None = None
        self._grace_until = 0.0
        self._grace_set: Snapshot = {}
        self._expiry_at: float | None = None  # monotonic time of the next member expiry
        self._pubsub: redis.client.PubSub | None = None
        self._pubsub_denied = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public -----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """A copy of the current live set, endpoint -> record."""
        with self._lock:
            return dict(self._snapshot)

    @property
    def last_error(self) -> RegistryError | None:
        """Why the last read failed while Redis is still failing, else None.

        Lets a student explain "no live teacher" by "registry unreachable".
        """
        error = self._outage.last_error
        return error if isinstance(error, RegistryError) else None

    @property
    def other_services(self) -> tuple[str, ...] | None:
        """Services with live teachers, as read the last time this service had none (None: not read).

        Refreshed with every read while this service is empty; kept as it was
        once teachers show up or while Redis is unreachable.
        """
        return self._other_services

    def start(self) -> "TeacherWatcher":
        """Subscribe, read the service once, and start the watcher thread.

        An unreachable Redis is not an error here (the watcher keeps trying
        and :attr:`last_error` says why the set is empty).

        Raises:
            RegistryAuthError: Redis refused the URL's credentials.
        """
        if self._thread is not None:
            raise RegistryError(f"{self._who} was already started")
        # Subscribe before the first read, so no join between them is missed.
        self._ensure_subscribed()
        self._refresh()
        if isinstance(self._outage.last_error, RegistryAuthError):
            error = self._outage.last_error
            self._close_clients()
            raise error
        self._thread = threading.Thread(target=self._run, name=f"edistill-watcher-{self._service}", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and close connections. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._close_clients()

    def __enter__(self) -> "TeacherWatcher":
        """Start (unless already started); :meth:`close` on exit."""
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- watcher thread ---------------------------------------------------

    def _run(self) -> None:
        next_poll = time.monotonic() + self._poll_s
        self._deliver()
        while not self._stop.is_set():
            try:
                # A SIGKILLed teacher leaves silently when its entry expires: re-read at
                # that moment too, so departures take effect within one TTL, not TTL + poll_s.
                wake_at = next_poll if self._expiry_at is None else min(next_poll, self._expiry_at)
                event = self._wait_for_event(wake_at)
                if self._stop.is_set():
                    return
                if event or time.monotonic() >= wake_at:
                    next_poll = time.monotonic() + self._poll_s
                    self._refresh()
                    self._deliver()
            except Exception:  # a dead watcher thread would freeze discovery silently
                logger.exception("%s: unexpected error; continuing", self._who)
                self._stop.wait(self._poll_s)

    def _ensure_subscribed(self) -> bool:
        """Subscribe if wanted and not yet subscribed; True if this call subscribed."""
        if self._pubsub is not None or not self._use_pubsub or self._pubsub_denied:
            return False
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._channel)
        except (redis_exc.RedisError, OSError) as exc:
            pubsub.close()
            error = map_redis_error(exc, self._url, "subscribing to events")
            if _is_permission_error(exc):
                self._pubsub_denied = True
                logger.warning("%s: %s; polling every %gs instead", self._who, error, self._poll_s)
            # Unreachable Redis: the reads report it; retried every _RESUBSCRIBE_S.
            return False
        self._pubsub = pubsub
        return True

    def _wait_for_event(self, next_poll: float) -> bool:
        """Block until an event arrives (True) or the next poll is due (False).

        Also True right after a lost subscription is restored: events may
        have been missed meanwhile, so the caller re-reads at once.
        """
        while not self._stop.is_set():
            remaining = next_poll - time.monotonic()
            if remaining <= 0:
                return False
            if self._pubsub is None:
                if self._ensure_subscribed():
                    return True
                self._stop.wait(min(remaining, _RESUBSCRIBE_S))
                continue
            try:
                message = self._pubsub.get_message(timeout=min(remaining, _MAX_BLOCK_S))
                if message is None:
                    continue
                # Drain what else is queued: one re-read covers a burst of events.
                while self._pubsub.get_message(timeout=0.0) is not None:
                    pass
                return True
            except (redis_exc.RedisError, OSError, ValueError) as exc:
                # ValueError: redis-py may raise it on a socket closed under it.
                self._drop_pubsub()
                error = map_redis_error(exc, self._url, "subscribing to events")
                if _is_permission_error(exc):
                    # SUBSCRIBE's reply (e.g. NOPERM) arrives here, not in subscribe().
                    self._pubsub_denied = True
                    logger.warning("%s: %s; polling every %gs instead", self._who, error, self._poll_s)
                    return False
                logger.debug("%s: event subscription lost (%s); resubscribing", self._who, error)
                return True  # re-read now: the read reports (or clears) the outage
        return False

    def _refresh(self) -> None:
        try:
            view = fetch_service(self._client, self._service)
        except (redis_exc.RedisError, OSError) as exc:
            error = map_redis_error(exc, self._url, "reading teachers")
            if self._thread is None and isinstance(error, RegistryAuthError):
                # start() raises this: no "retrying" warning for a watcher that will not retry.
                self._outage.last_error = error
                return
            self._outage.failed(exc, "reading teachers", "keeping the last known teachers, retrying")
            self._expiry_at = None  # unknown while Redis is away: poll_s paces the retries
            self._drop_pubsub()
            return
        except Exception as exc:  # noqa: BLE001 - any bug below fetch_service
            # Not a Redis error: a bug, or data in Redis that something below
            # fetch_service did not expect. Raising would make start() fail and
            # freeze discovery for good; keep the last known teachers instead,
            # log once (with the traceback) and retry with the next poll.
            if not self._refresh_failing:
                logger.warning("%s: reading teachers failed unexpectedly (%s); keeping the last known "
                               "teachers, retrying every %gs (logged once until a read succeeds)",
                               self._who, type(exc).__name__, self._poll_s, exc_info=True)
            else:
                logger.debug("%s: reading teachers still fails: %r", self._who, exc)
            self._refresh_failing = True
            self._expiry_at = None
            return
        self._refresh_failing = False
        self._expiry_at = None if view.next_expiry_s is None else (
            time.monotonic() + max(0.0, view.next_expiry_s - view.server_time_s) + _EXPIRY_MARGIN_S)
        teachers = view.teachers
        if not teachers:
            try:
                self._other_services = tuple(list_services(self._client))
            except (redis_exc.RedisError, OSError) as exc:  # the next read reports an outage
                logger.debug("%s: listing services failed: %s", self._who, map_redis_error(exc, self._url, "listing"))
        if self._outage.ok() and self._outage_grace_s > 0:
            self._grace_until = time.monotonic() + self._outage_grace_s
            self._grace_set = self.snapshot()
        if self._grace_set:
            if time.monotonic() < self._grace_until:
                kept = {e: r for e, r in self._grace_set.items() if e not in teachers}
                teachers = {**kept, **teachers}
                if not kept:
                    self._grace_set = {}  # everyone is back
            else:
                self._grace_set = {}
        for teacher_id, error in view.bad.items():
            if self._warned_bad.get(teacher_id) != str(error):
                logger.warning("%s: skipping teacher %r: %s", self._who, teacher_id, error)
        self._warned_bad = {teacher_id: str(error) for teacher_id, error in view.bad.items()}
        with self._lock:
            self._snapshot = teachers

    def _deliver(self) -> None:
        current = self.snapshot()
        content = _content(current)
        if content == self._delivered:
            return
        previous, self._delivered = self._delivered or {}, content
        joined = sorted(content.keys() - previous.keys())
        left = sorted(previous.keys() - content.keys())
        if joined or left:
            # DEBUG: the student's RegistryFollower logs the same change at INFO, in its words.
            logger.debug("%s: %d live teacher(s); joined %s, left %s", self._who, len(current), joined, left)
        if self._on_change is None:
            return
        try:
            self._on_change(current)
        except Exception:
            logger.exception("%s: on_change callback failed", self._who)

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis_exc.RedisError, OSError):
                pass

    def _close_clients(self) -> None:
        self._drop_pubsub()
        self._client.close()
