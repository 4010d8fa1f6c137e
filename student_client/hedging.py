"""Hedging: when to send a slow request to a second teacher (``PoolConfig.hedge_after_s``).

A teacher can freeze without its connection breaking (SIGSTOP, a hung
driver, a blackholed host); its calls then fail only at ``timeout_s``. The
pool's dispatcher therefore also sends a request that has waited longer than
the hedge threshold to one other teacher with a free slot. The first answer
settles the batch; the other call is cancelled and, if it comes anyway,
dropped as a late answer. The attempt that lost by being slow counts as a
failure of its teacher (``HEDGED``), which opens its breaker, so a frozen
teacher is not handed fresh batches. A failure of one of the two attempts
while the other still runs is recorded but not re-sent (the request may be
hedged again on the next tick).

The threshold: a number of seconds, None (never), or ``"auto"``:
max(``hedge_min_s``, ``_P99_FACTOR`` x that teacher's p99 latency). 4x the p99
is far outside a healthy teacher's tail, so hedges are rare unless a teacher
is stuck. The p99 needs ``_MIN_SAMPLES`` answers (the teacher's own, else the
slowest such threshold among the other teachers, so a merely slower model is
not hedged); with none anywhere nothing is hedged and ``timeout_s`` applies.
It is recomputed every ``_REFRESH`` answers (a sort of up to
``latency_samples`` floats), not per request.

This module only decides; the pool books and starts the attempts. Not
thread-safe: called under the pool's lock.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from .balancer import pick
from .config import PoolConfig
from .stats import percentile

__all__ = ["HedgePolicy"]

_P99_FACTOR = 4.0
_MIN_SAMPLES = 8
_REFRESH = 16


class HedgePolicy:
    """Which in-flight requests are due for a hedge, and to which teacher."""

    def __init__(self, config: PoolConfig) -> None:
        self._fixed = config.hedge_after_s
        self._min_s = config.hedge_min_s
        self._limit = config.max_in_flight_per_teacher

    @property
    def enabled(self) -> bool:
        return self._fixed is not None

    def threshold(self, t, teachers: Iterable) -> float | None:
        """Seconds after which a request on teacher ``t`` is hedged, or None."""
        if self._fixed != "auto":
            return self._fixed
        if t.successes - t.hedge_basis >= _REFRESH or t.hedge_basis < 0:
            t.hedge_basis = t.successes
            t.hedge_after_s = None
            if len(t.samples) >= _MIN_SAMPLES:
                p99 = percentile(sorted(t.samples), 99)
                t.hedge_after_s = max(self._min_s, _P99_FACTOR * p99)
        if t.hedge_after_s is not None:
            return t.hedge_after_s
        # Too few answers of its own (e.g. it froze on its first batches): compare with the others.
        known = [o.hedge_after_s for o in teachers if o.hedge_after_s is not None]
        return max(known) if known else None

    def due(self, now: float, teachers: dict) -> Iterator[tuple]:
        """Yield ``(request, slow attempt, target teacher, threshold_s)`` for each hedge to send now.

        The caller starts each hedge before asking for the next (the targets'
        free slots change). One hedge per request, to a different available
        teacher with a free slot, preferring teachers that have not failed it.
        """
        if self._fixed is None:
            return
        # Every threshold is at least this: most ticks end here, after one pass over the
        # attempts in flight, without computing thresholds or sorting.
        floor = self._min_s if self._fixed == "auto" else self._fixed
        oldest = min((a.started_at for t in teachers.values() for a in t.inflight), default=now)
        if now - oldest < floor:
            return
        for t in list(teachers.values()):
            if not t.inflight:
                continue
            after = self.threshold(t, teachers.values())
            if after is None:
                continue
            for a in sorted(t.inflight, key=lambda x: x.started_at):
                r = a.request
                if now - a.started_at < after:
                    break
                if r.hedged or r.settled or len(r.inflight) > 1:
                    continue
                cands = [o for o in teachers.values()
                         if o is not t and o.outstanding < self._limit and o.breaker.available(now)]
                if r.failed_on:
                    cands = [o for o in cands if o.endpoint not in r.failed_on] or cands
                if not cands:
                    return
                yield r, a, pick(cands), after
