"""The teacher pool's bookkeeping records: one batch, one attempt, one teacher.

Plain slot classes, mutated only under the pool's lock (see the concurrency
notes in :mod:`student_client.pool`); nothing here does I/O.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future
from typing import Any, Mapping

from .balancer import LatencyEwma
from .breaker import CircuitBreaker
from .config import PoolConfig
from .stats import TeacherStats, percentile

__all__ = ["Attempt", "Request", "Teacher", "Work"]


class Request:
    """One batch, from submit() until its future is settled."""

    __slots__ = ("seq", "batch_id", "request_id", "payload", "future", "inflight", "attempts", "failed_on",
                 "server_errors", "settled", "hedged", "rows", "inputs")

    def __init__(self, seq: int, batch_id: Any, request_id: str, payload: bytes | None, future: Future,
                 rows: int | None = None, inputs: Mapping[str, Any] | None = None) -> None:
        self.rows = rows  # samples sent; every answer must have as many rows
        self.seq = seq
        self.batch_id = batch_id
        self.request_id = request_id
        # Serialized PredictRequest, reused unchanged by every gRPC attempt; None until
        # the first one (a batch that only goes over the local transport is never serialized).
        self.payload = payload
        # The input tensors: kept for the local transport (and lazy serialization) when
        # they are tensors/arrays the fast paths carry; None otherwise.
        self.inputs = inputs
        self.future = future
        # Unfinished attempts: usually 0 or 1; 2 while a hedge races a slow attempt.
        self.inflight: list[Attempt] = []
        self.attempts = 0
        self.failed_on: set[str] = set()  # endpoints that failed it: prefer others
        self.server_errors = 0
        self.settled = False
        self.hedged = False  # a hedge was sent (at most one per request)

    def __lt__(self, other: "Request") -> bool:  # heap order: oldest batch first
        return self.seq < other.seq

    def release(self) -> None:
        """Drop the batch once settled (the caller's future still refers to this request)."""
        self.inputs = self.payload = None


class Attempt:
    """One Predict call of one request on one teacher."""

    __slots__ = ("request", "teacher", "started_at", "probe", "call", "finished")

    def __init__(self, request: Request, teacher: "Teacher", started_at: float, probe: bool) -> None:
        self.request = request
        self.teacher = teacher
        self.started_at = started_at
        self.probe = probe
        self.call = None  # the transport's call, once started
        self.finished = False


class Teacher:
    """One endpoint: its transports, breaker, load and counters.

    Args:
        grpc: the teacher's :class:`~student_client.transports.GrpcTransport`.
        health: its health stub; with one the teacher starts UNVERIFIED and
            gets no batch before a SERVING health check (:mod:`.probe`).
    """

    def __init__(self, endpoint: str, grpc, config: PoolConfig, health=None) -> None:
        self.endpoint = endpoint
        self.grpc = grpc
        self.health = health
        self.breaker = CircuitBreaker(config.backoff, verified=health is None)
        self.probing = False  # a health check is in flight
        self.probe_reason: str | None = None  # why the last health check failed
        self.latency = LatencyEwma(config.latency_ewma_alpha)
        self.samples: collections.deque[float] = collections.deque(maxlen=config.latency_samples)
        self.outstanding = 0
        self.last_pick = 0
        self.inflight: set[Attempt] = set()
        self.live = True
        self.requests = 0
        self.successes = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.retries = 0
        self.failovers = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.hedge_after_s: float | None = None  # auto threshold (student_client.hedging)
        self.hedge_basis = -1  # self.successes when hedge_after_s was computed
        self.local = None  # LocalConnection to its same-host socket, once connected
        self.used_local = False  # some attempt went over the local socket (kept after it left)
        self.local_pending = False  # a Describe/connect for the local transport is under way
        self.local_retry_at = 0.0  # no new local attempt before this (monotonic)

    def transports(self) -> list:
        """Everything to close when the teacher leaves the pool."""
        return [self.grpc] if self.local is None else [self.grpc, self.local]

    def describe(self, now: float) -> str:
        err = "no errors"
        if self.last_error is not None:
            err = f"last error {self.last_error} ({now - (self.last_error_at or now):.1f} s ago)"
        return f"{self.breaker.describe(now)}, {self.outstanding} in flight, {err}"

    def snapshot(self, now: float) -> TeacherStats:
        s = sorted(self.samples)
        if self.live:
            transport = "local" if self.local is not None and not self.local.closed else "grpc"
        else:  # a teacher that left keeps the transport it was used over
            transport = "local" if self.used_local else "grpc"
        return TeacherStats(
            endpoint=self.endpoint, live=self.live, state=self.breaker.describe(now),
            outstanding=self.outstanding, requests=self.requests, successes=self.successes,
            failures=dict(self.failures), retries=self.retries, failovers=self.failovers,
            last_error=self.last_error, latency_ewma_s=self.latency.value_s,
            latency_p50_s=percentile(s, 50), latency_p90_s=percentile(s, 90), latency_p99_s=percentile(s, 99),
            transport=transport, breaker=self.breaker.state,
        )


class Work:
    """Side effects decided under the lock, carried out after releasing it."""

    __slots__ = ("starts", "settle", "cancel", "close")

    def __init__(self) -> None:
        self.starts: list[Attempt] = []
        self.settle: list = []  # (request, result, exception)
        self.cancel: list = []  # transport calls
        self.close: list = []  # transports
