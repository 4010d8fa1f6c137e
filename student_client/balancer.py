"""Load-aware choice of a teacher for the next request.

Each candidate's expected completion time is estimated as
``(outstanding + 1) * latency_s``: the requests it already holds plus this one,
each taking about its measured (EWMA) latency. The teacher with the smallest
estimate wins, so a fast teacher takes more requests than a slow one and a
teacher that just joined (no outstanding requests) is used at once.
A teacher with no latency sample yet is assumed to be as fast as the fastest
known one (optimistic, so it gets tried); ties go to the teacher picked least
recently, which spreads a cold start round-robin.

Not thread-safe: called under the pool's lock.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

__all__ = ["Candidate", "LatencyEwma", "pick"]


class Candidate(Protocol):
    """What the balancer needs to know about a teacher."""

    outstanding: int  # requests sent and not yet answered
    latency: "LatencyEwma"
    last_pick: int  # pick sequence number of the last time it was chosen


C = TypeVar("C", bound=Candidate)


class LatencyEwma:
    """Exponentially weighted moving average of a teacher's answer latency.

    ``alpha`` is the weight of the newest sample: 0.2 follows a change in load
    within ~5 answers while smoothing out single slow batches.
    """

    __slots__ = ("alpha", "value_s")

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.value_s: float | None = None  # None until the first sample

    def add(self, sample_s: float) -> None:
        """Fold one latency sample (seconds) into the average."""
        v = self.value_s
        self.value_s = sample_s if v is None else v + self.alpha * (sample_s - v)


def pick(candidates: Sequence[C]) -> C | None:
    """The candidate with the smallest expected completion time, or None if empty."""
    # Optimistic prior for teachers never measured: the fastest known latency; 1 ms when
    # nothing is known (then only the outstanding count and the tie-break decide).
    prior = None
    for c in candidates:
        lat = c.latency.value_s
        if lat is not None and (prior is None or lat < prior):
            prior = lat
    if prior is None:
        prior = 1e-3
    best = None
    best_cost = best_last = 0.0
    for c in candidates:  # runs per request: plain comparisons, no key tuples
        lat = c.latency.value_s
        cost = (c.outstanding + 1) * (prior if lat is None else lat)
        if best is None or cost < best_cost or (cost == best_cost and c.last_pick < best_last):
            best, best_cost, best_last = c, cost, c.last_pick
    return best
