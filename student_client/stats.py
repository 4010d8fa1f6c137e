"""Snapshots of the counters kept by the teacher pool and the reader.

These are plain immutable values, taken under the owner's lock, so users can
log or compare them freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["PoolStats", "ReaderStats", "SourceStats", "TeacherStats", "percentile"]


def percentile(sorted_samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` in [0, 100] of already sorted samples (None if empty)."""
    if not sorted_samples:
        return None
    i = min(len(sorted_samples) - 1, max(0, round(q / 100.0 * (len(sorted_samples) - 1))))
    return float(sorted_samples[i])


@dataclass(frozen=True)
class TeacherStats:
    """Counters of one teacher endpoint (live or removed).

    Attributes:
        requests: Predict calls sent to it (retries included).
        successes: calls it answered with outputs.
        failures: failed calls by gRPC code name.
        retries: calls to it that were re-sends of a batch first sent elsewhere.
        failovers: batches taken away from it and re-sent (it failed or was removed).
        latency_*_s: answer latency, EWMA and percentiles of recent samples.
        transport: ``"local"`` while batches go over the teacher's same-host
            socket (shared memory), else ``"grpc"``; a teacher that left keeps
            the one it was used over.
        state: its circuit breaker in words: ``"healthy"``,
            ``"failing (retry in 1.2 s)"``, ``"probing (one trial batch)"``,
            ``"checking health"`` or ``"not ready (health check failed ...)"``.
        breaker: the same, machine-readable: ``"closed"`` (healthy),
            ``"open"``, ``"half_open"`` or ``"unverified"``.
    """

    endpoint: str
    live: bool
    state: str
    outstanding: int
    requests: int
    successes: int
    failures: dict[str, int]
    retries: int
    failovers: int
    last_error: str | None
    latency_ewma_s: float | None
    latency_p50_s: float | None
    latency_p90_s: float | None
    latency_p99_s: float | None
    transport: str = "grpc"
    breaker: str = "closed"


@dataclass(frozen=True)
class SourceStats:
    """What a knowledge source did so far (every source returns one from ``stats()``).

    Attributes:
        kind: what the source is (``"pool"``, ``"in-process"``, ``"fallback"``,
            ``"ensemble"``, ...).
        submitted: batches submitted.
        completed: batches answered with outputs.
        failed: batches that resolved with an error (not counting cancellations).
        cancelled: batches whose caller withdrew them.
        retries: re-sends after a failure or a removed teacher (remote sources).
        late_answers_dropped: answers that arrived after their batch had been
            re-sent or withdrawn (never delivered twice).
        hedges: requests also sent to a second teacher because the first had
            not answered within ``PoolConfig.hedge_after_s`` (first answer wins).
        teachers: per-endpoint counters, removed endpoints included (remote
            sources; a composite source merges its parts').
        parts: the stats of the sources a composite source is made of, by name.
    """

    kind: str = ""
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    retries: int = 0
    late_answers_dropped: int = 0
    hedges: int = 0
    teachers: dict[str, TeacherStats] = field(default_factory=dict)
    parts: dict[str, "SourceStats"] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: batches answered, failed, and (remote sources) retries and teachers."""
        line = f"{self.kind or 'source'}: {self.completed}/{self.submitted} batches answered, {self.failed} failed"
        if self.teachers:
            line += f", {self.retries} retries, {len(self.teachers)} teacher(s) seen"
        return line

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class PoolStats(SourceStats):
    """A :class:`~student_client.pool.TeacherPool`'s counters (``kind="pool"``)."""

    kind: str = "pool"


@dataclass(frozen=True)
class ReaderStats:
    """What a DistillReader did so far.

    Attributes:
        batches: batches delivered to the training loop.
        epochs: epochs started.
        wait_s: time the training loop spent blocked on teacher outputs; a
            large share of the training time means more teachers would help.
        source: the knowledge source's own :class:`SourceStats` (a
            :class:`PoolStats` for remote teachers).
        samples: samples delivered (the first dimension of each batch's
            teacher input).
        wall_s: time spent inside epochs (from the first ``next()`` of an
            epoch until it ends), i.e. training steps plus waiting; time
            between epochs (evaluation, checkpoints) is not counted.
        cpu_s: CPU time the training loop's thread spent inside the reader
            (picking inputs, ``submit``, reading answers, moving them to the
            device), the loader's own ``next()`` excluded: what the service
            costs the training loop, beside ``wall_s / batches`` when steps
            are tiny. Background threads (the pool's dispatcher, gRPC's) are
            not included.

    ``wait_fraction`` (= ``wait_s / wall_s``) is the number to watch: near 0
    the teachers keep up; above ~0.1 the training loop is starved and more
    teachers (or a larger ``window``) would speed training up.
    """

    batches: int
    epochs: int
    wait_s: float
    source: SourceStats = field(default_factory=SourceStats)
    samples: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def wait_fraction(self) -> float:
        """Share of ``wall_s`` spent waiting on teacher outputs, in [0, 1] (0 before any batch)."""
        return min(1.0, self.wait_s / self.wall_s) if self.wall_s > 0 else 0.0

    @property
    def cpu_ms_per_batch(self) -> float:
        """``cpu_s`` per delivered batch, in milliseconds (0 before any batch)."""
        return 1e3 * self.cpu_s / self.batches if self.batches else 0.0

    @property
    def samples_per_s(self) -> float:
        """Samples delivered per second of ``wall_s`` (0 before any batch)."""
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def teachers(self) -> dict[str, TeacherStats]:
        """Per-teacher counters by endpoint (removed teachers included; empty for other sources)."""
        return dict(self.source.teachers)

    @property
    def live_teachers(self) -> int:
        """Teachers in the pool now that are healthy (breaker closed: answering, not failing or on probation)."""
        return sum(1 for t in self.teachers.values() if t.live and t.breaker == "closed")

    @property
    def retries(self) -> int:
        """Batches re-sent after a failure or a removed teacher (0 for sources without retries)."""
        return self.source.retries

    @property
    def failovers(self) -> int:
        """Batches taken away from a failing or removed teacher, summed over teachers."""
        return sum(t.failovers for t in self.source.teachers.values())

    def as_dict(self) -> dict[str, Any]:
        """A flat summary for logs and reports (per-teacher details stay in ``source``)."""
        return {"batches": self.batches, "epochs": self.epochs, "samples": self.samples,
                "wall_s": self.wall_s, "wait_s": self.wait_s, "wait_fraction": self.wait_fraction,
                "cpu_s": self.cpu_s, "cpu_ms_per_batch": self.cpu_ms_per_batch,
                "samples_per_s": self.samples_per_s, "retries": self.retries, "failovers": self.failovers,
                "late_answers_dropped": self.source.late_answers_dropped,
                "teachers": len(self.teachers), "live_teachers": self.live_teachers}

    def summary(self) -> str:
        """One human-readable line: throughput, live teachers, waiting share, the reader's CPU, retries."""
        remote = bool(self.source.teachers) or self.source.kind == "pool"
        where = f"{self.live_teachers} live teacher(s)" if remote else f"source {self.source.kind or 'custom'}"
        return (f"{self.batches} batches, {self.samples_per_s:.0f} samples/s, {where}, "
                f"waiting on teachers {self.wait_fraction:.0%} of the time, "
                f"reader CPU {self.cpu_ms_per_batch:.2f} ms/batch, {self.retries} retries, "
                f"{self.failovers} failovers")

    def __str__(self) -> str:
        """The one-line :meth:`summary` (``repr`` stays complete)."""
        return self.summary()

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access to :meth:`as_dict`'s summary."""
        return self.as_dict().get(key, default)
