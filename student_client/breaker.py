"""A per-teacher circuit breaker.

States::

    CLOSED --failure--> OPEN --(open_until reached)--> HALF_OPEN --probe ok--> CLOSED
                          ^                                |
                          +-------- probe failed ----------+  (longer backoff)

Users read the states in other words (:meth:`CircuitBreaker.describe`, the
``state`` of :class:`~student_client.stats.TeacherStats`): closed is
"healthy", open "failing (retry in ...)", half-open "probing", unverified
"checking health" / "not ready"; ``TeacherStats.breaker`` keeps the names below.

* CLOSED: the teacher takes requests up to its in-flight limit.
* OPEN: no requests until ``open_until`` (jittered exponential backoff in the
  number of consecutive failed probes).
* HALF_OPEN: exactly one request (the probe) may be in flight; its outcome
  closes or re-opens the breaker.
* UNVERIFIED: a new teacher that has not yet answered its health check
  (:mod:`.probe`): no requests at all. A passed check closes the breaker; a
  failed one schedules the next health check after the backoff
  (``open_until``), without ever sending it a batch.

Failures of requests that were already in flight when the breaker opened do
not lengthen the backoff: one teacher dying with 4 requests in flight is one
failure, not four.

Not thread-safe: the owning :class:`~student_client.pool.TeacherPool` calls it
under its lock.
"""

from __future__ import annotations

from .backoff import ExponentialBackoff

__all__ = ["CircuitBreaker"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
UNVERIFIED = "unverified"


class CircuitBreaker:
    """Decides whether a teacher may take a request now."""

    def __init__(self, backoff: ExponentialBackoff, *, verified: bool = True) -> None:
        self._backoff = backoff
        self.state = CLOSED if verified else UNVERIFIED
        self.failures = 0  # consecutive failures (first failure + failed probes)
        self.open_until = 0.0  # monotonic seconds; meaningful when OPEN
        self.probe_in_flight = False

    def available(self, now: float) -> bool:
        """Whether a request may be sent now (does not change state)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now >= self.open_until
        if self.state == UNVERIFIED:
            return False
        return not self.probe_in_flight

    def on_send(self, now: float) -> bool:
        """Record that a request is being sent; returns True if it is the probe."""
        if self.state == OPEN and now >= self.open_until:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            self.probe_in_flight = True
            return True
        return False

    def on_success(self) -> None:
        """An answer arrived: the teacher is healthy."""
        self.state = CLOSED
        self.failures = 0
        self.probe_in_flight = False

    def on_failure(self, now: float, *, probe: bool) -> None:
        """A request failed in a way that blames the teacher."""
        if self.state == CLOSED or (self.state == HALF_OPEN and probe):
            self.failures += 1
            self.state = OPEN
            self.open_until = now + self._backoff.delay_s(self.failures)
            self.probe_in_flight = False
        # OPEN, or a non-probe straggler in HALF_OPEN: already accounted for

    def on_health_ok(self) -> None:
        """The teacher answered its health check with SERVING: it may take requests."""
        if self.state == UNVERIFIED:
            self.state = CLOSED
            self.failures = 0

    def on_health_failed(self, now: float) -> None:
        """The health check failed: check again after the backoff (``open_until``)."""
        self.failures += 1
        self.open_until = now + self._backoff.delay_s(self.failures)

    def health_check_due(self, now: float) -> bool:
        """Whether an unverified teacher's next health check is due."""
        return self.state == UNVERIFIED and now >= self.open_until

    def on_abandon(self, *, probe: bool) -> None:
        """A request was withdrawn before it had an outcome (cancelled, teacher removed)."""
        if probe:
            self.probe_in_flight = False

    def describe(self, now: float) -> str:
        """The state in a user's words (``state`` is the machine-readable name).

        ``"healthy"`` (closed), ``"failing (retry in 1.2 s)"`` (open),
        ``"probing (one trial batch)"`` (half-open), ``"checking health"`` /
        ``"not ready (health check failed 2x, next in 1.2 s)"`` (unverified).
        """
        if self.state == OPEN:
            left = self.open_until - now
            return f"failing (retry in {left:.1f} s)" if left > 0 else "failing (retry due)"
        if self.state == UNVERIFIED:
            if self.failures == 0:
                return "checking health"
            left = self.open_until - now
            return (f"not ready (health check failed {self.failures}x, next in {left:.1f} s)" if left > 0
                    else f"not ready (health check failed {self.failures}x, checking again)")
        return "probing (one trial batch)" if self.state == HALF_OPEN else "healthy"
