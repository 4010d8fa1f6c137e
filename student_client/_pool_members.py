"""Which teachers a pool has and trusts (a mixin of :class:`~student_client.pool.TeacherPool`).

Endpoints come and go (:meth:`set_endpoints`, fed by a registry through
:mod:`student_client.discovery`); each new one is used only after its
health check (:mod:`student_client.probe`). :meth:`wait_for_teachers` and
the ``wait_timeout_s`` watchdog explain an empty or dead pool in words that
fit how it was set up. The concurrency rules are the pool's
(:mod:`student_client.pool`).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

from ._poolstate import Teacher, Work
from .breaker import CLOSED
from .errors import ConfigError, NoTeacherAvailableError, SourceClosedError
from .stats import PoolStats
from .transports import GrpcTransport

__all__ = ["MembershipMixin"]

logger = logging.getLogger("student_client.pool")

# wait_for_teachers logs that it is still waiting this often.
_WAITING_LOG_S = 5.0


class MembershipMixin:
    """Endpoints, their verification and stats, and the "no teacher" watchdog and messages."""

    def set_endpoints(self, endpoints: Iterable[str]) -> None:
        """Make the pool's teachers exactly ``endpoints``.

        New endpoints get a channel and a health check (started at once, in
        the background: this call never waits for it) and are used as soon as
        it answers SERVING; removed ones stop getting requests, the batches
        they hold are re-sent elsewhere, and their late answers are dropped.
        Safe to call from any thread (e.g. a registry watcher's callback).
        """
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        wanted: list[str] = []
        for e in endpoints:
            if not isinstance(e, str) or not e.strip() or any(c.isspace() for c in e.strip()):
                raise ConfigError(f"teacher endpoints must be 'host:port' strings, got {e!r}")
            if e.strip() not in wanted:
                wanted.append(e.strip())
        work = Work()
        probes: list[Teacher] = []
        with self._lock:
            if self._closed:
                raise SourceClosedError("TeacherPool is closed")
            now = time.monotonic()
            for endpoint in [e for e in self._teachers if e not in wanted]:
                t = self._teachers.pop(endpoint)
                t.live = False
                self._retired.append(t)
                for a in list(t.inflight):
                    self._abandon_locked(a, work)
                    t.failovers += 1
                    if not a.request.inflight:  # else its hedge on another teacher carries on
                        self._requeue_locked(a.request)
                work.close += t.transports()
                logger.info("teacher %s removed (%d batches re-sent)", endpoint, t.failovers)
            for endpoint in wanted:
                if endpoint not in self._teachers:
                    channel = self._channel_factory(endpoint, self._channel_options)
                    grpc = GrpcTransport(channel, self._stub_factory(channel), self._outputs_blob)
                    t = Teacher(endpoint, grpc, self._config, self._prober.stub(channel))
                    self._teachers[endpoint] = t
                    if t.health is not None:
                        t.probing = True
                        probes.append(t)
                    logger.info("teacher %s added%s", endpoint, "" if t.health is None else ", health check started")
            self._assign_locked(now, work)
            self._kick_locked()
        self._do(work)
        self._prober.start(probes)

    def wait_for_teachers(self, n: int = 1, timeout_s: float | None = None) -> list[str]:
        """Block until ``n`` teachers have passed their health check and answer; return their endpoints.

        While it waits it logs (every few seconds) what it waits for, and the
        error at the deadline says what each endpoint is doing and, for a
        registry pool, what the registry knows.

        Args:
            n: teachers to wait for.
            timeout_s: how long; default ``PoolConfig.wait_timeout_s``.

        Raises:
            NoTeacherAvailableError: fewer than ``n`` teachers by the deadline.
            SourceClosedError: the pool was closed meanwhile.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be an int >= 1, got {n!r}")
        timeout = self._config.wait_timeout_s if timeout_s is None else float(timeout_s)
        start = time.monotonic()
        next_log = start + _WAITING_LOG_S
        with self._lock:
            while True:
                if self._closed:
                    raise SourceClosedError("TeacherPool was closed while waiting for teachers")
                ready = [e for e, t in self._teachers.items() if t.breaker.state == CLOSED]
                now = time.monotonic()
                if len(ready) >= n or now - start >= timeout:
                    break
                if now >= next_log:
                    next_log = now + _WAITING_LOG_S
                    where = self._follower.where if self._follower is not None else "the pool's endpoints"
                    logger.info("waiting for teachers of %s: %d of %d ready after %.0f s (gives up after %.0f s)",
                                where, len(ready), n, now - start, timeout)
                self._ready.wait(min(0.5, next_log - now, timeout - (now - start)))
            if len(ready) >= n:
                return ready
            message = self._no_teacher_message_locked(
                now, f"{len(ready)} of the {n} teacher(s) waited for answered their health check within "
                     f"{timeout:g} s")
            endpoints = {e: t.describe(now) for e, t in self._teachers.items()}
        raise NoTeacherAvailableError(message, endpoints=endpoints, wait_timeout_s=timeout)

    def _on_probe_result(self, t: Teacher, ok: bool, reason: str) -> None:
        """A health check finished (any thread): verify the teacher or back off."""
        now = time.monotonic()
        work = Work()
        local_setup = False
        with self._lock:
            t.probing = False
            if self._closed or not t.live:
                return
            if ok:
                t.breaker.on_health_ok()
                t.probe_reason = None
                logger.info("teacher %s passed its health check; sending it batches", t.endpoint)
                self._assign_locked(now, work)
                local_setup = self._local_enabled and self._localsetup.due_locked(t, now)
                self._ready.notify_all()
            else:
                t.breaker.on_health_failed(now)
                t.last_error, t.last_error_at = f"health check failed ({reason})", now
                # One warning per distinct reason: a dead registry entry must not flood the log.
                log = logger.debug if reason == t.probe_reason else logger.warning
                log("teacher %s failed its health check (%s); it gets no batches, checking again in %.1f s",
                    t.endpoint, reason, max(0.0, t.breaker.open_until - now))
                t.probe_reason = reason
        self._do(work)
        if local_setup:
            self._localsetup.start(t)

    def _no_teacher_message_locked(self, now: float, what: str) -> str:
        """``what`` happened; then each endpoint's state, and advice that fits how the pool was set up."""
        if self._teachers:
            where = "; ".join(f"{e}: {t.describe(now)}" for e, t in self._teachers.items())
            hint = "check that the teacher servers are running and reachable from this host, or raise wait_timeout_s"
        else:
            where = "the pool has no teacher endpoints"
            if self._retired:
                where += f" (removed: {', '.join(t.endpoint for t in self._retired[-5:])})"
            hint = ("start teachers with --registry and --service for it" if self._follower is not None
                    else "pass teachers=['host:port', ...] or use TeacherPool.from_registry(url, service)")
        message = f"{what}; teachers: {where}. What to do: {hint}."
        extra = self._follower.explain(bool(self._teachers)) if self._follower is not None else None
        return f"{message} {extra}" if extra else message

    def _expire_locked(self, now: float, work: Work) -> None:
        """Fail everything waiting if no teacher has answered for wait_timeout_s."""
        waited = now - self._stall_since
        if not self._live or waited < self._config.wait_timeout_s:
            return
        endpoints = {e: t.describe(now) for e, t in self._teachers.items()}
        message = self._no_teacher_message_locked(
            now, f"no teacher answered for {waited:.1f} s (wait_timeout_s={self._config.wait_timeout_s:g}) "
                 f"while {len(self._live)} batch(es) waited")
        logger.error("%s", message)
        for t in self._teachers.values():
            for a in list(t.inflight):
                self._abandon_locked(a, work)
        for r in list(self._live.values()):
            self._settle_locked(r, None, NoTeacherAvailableError(
                message, endpoints=endpoints, wait_timeout_s=self._config.wait_timeout_s), work)
        self._stall_since = now

    def stats(self) -> PoolStats:
        """A snapshot of the pool's and every teacher's counters."""
        with self._lock:
            now = time.monotonic()
            teachers = {}
            for t in self._retired + list(self._teachers.values()):
                teachers[t.endpoint if t.endpoint not in teachers else f"{t.endpoint}#{len(teachers)}"] = \
                    t.snapshot(now)
            n = self._n
            return PoolStats(submitted=n["submitted"], completed=n["completed"], failed=n["failed"],
                             cancelled=n["cancelled"], retries=n["retries"],
                             late_answers_dropped=n["late"], hedges=n["hedges"], teachers=teachers)
