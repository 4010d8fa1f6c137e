"""TeacherPool: remote teachers over gRPC as one knowledge source.

One channel per teacher endpoint; each batch goes to the teacher with the
smallest expected completion time (:mod:`.balancer`), at most
``max_in_flight_per_teacher`` per teacher, each call with a deadline. A
failing teacher is taken out of rotation by its circuit breaker
(:mod:`.breaker`) and probed again after a jittered exponential backoff; its
batches are re-sent to another teacher. Endpoints can be added and removed
live with :meth:`TeacherPool.set_endpoints`.

Trust before use (:mod:`.probe`): every new teacher, whether from
``teachers=[...]`` or a registry, starts *unverified* and gets no batch until
a ``grpc.health.v1`` Check on its own channel (same TLS and token as the real
calls) answers SERVING within ``PoolConfig.probe_timeout_s``. The first probe
starts at once; a failed one is repeated after the breaker's jittered
backoff by the dispatcher thread. Once verified, a teacher that later fails
is handled by its circuit breaker as before (a half-open request is the
probe); a removed and re-added endpoint is checked again.

Which gRPC codes are retried (decided here, see ``_classify``):

* Teacher trouble, re-sent elsewhere and counted against the teacher's
  breaker: UNAVAILABLE (down, restarting, unreachable), DEADLINE_EXCEEDED
  (hung or overloaded), RESOURCE_EXHAUSTED (its queue is full), ABORTED, and
  CANCELLED by the server (e.g. it is shutting down).
* Maybe the batch's fault: INTERNAL and UNKNOWN (a crash in the model or the
  server) are re-sent to another teacher, at most
  ``max_server_error_attempts`` times per batch, then surface as
  TeacherRequestError so a batch that crashes every teacher is not retried
  forever.
* The user's fault, never retried, surfaced at once with the teacher's message:
  INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, NOT_FOUND,
  ALREADY_EXISTS, PERMISSION_DENIED, UNAUTHENTICATED, UNIMPLEMENTED, DATA_LOSS.

Hedging (``PoolConfig.hedge_after_s``): a teacher can freeze without its
connection breaking (SIGSTOP, a hung driver, a blackholed host); its calls
then fail only at ``timeout_s``. The dispatcher therefore also sends a
request that has waited longer than the hedge threshold (by default
max(``hedge_min_s``, 4 x that teacher's p99 latency)) to one other teacher
with a free slot. The first answer settles the batch; the other call is
cancelled and, if it comes anyway, dropped as a late answer. The attempt that
lost by being slow counts as a failure of its teacher (``HEDGED``), which
opens its breaker, so a frozen teacher is not handed fresh batches. A
failure of one of the two attempts while the other still runs is recorded
but not re-sent (the request may be hedged again on the next tick).

Liveness: whenever batches are waiting and no teacher has answered anything
for ``wait_timeout_s``, every waiting batch fails with NoTeacherAvailableError
naming each endpoint and its last error. Nothing waits forever.

Concurrency (read before changing anything here):

* One lock (``self._lock``; ``self._cond`` is the dispatcher's condition on it) guards all
  mutable state: the queue, the live request table, teachers, counters,
  breakers. It is never held while calling into gRPC (starting, cancelling a
  call, closing a channel) or while resolving a user future: gRPC may run a
  done-callback synchronously in the calling thread, and future callbacks may
  call back into the pool; both would deadlock on a held lock.
* Work is therefore decided under the lock (a slot reserved, an ``_Attempt``
  created) and carried out after releasing it.
* Every ``_Request`` is settled (its future resolved) exactly once, guarded by
  ``request.settled`` under the lock. ``request.inflight`` lists its
  unfinished attempts (two only while a hedge races the original); settling
  a request withdraws the others, and a request is re-queued only when its
  last attempt failed, so a hedge never makes a batch be sent in parallel
  more than twice or delivered twice. Every ``_Attempt`` finishes exactly once
  (``attempt.finished``), which frees its teacher slot; an answer for a
  finished attempt is a late answer and is dropped.
* Sends happen in the thread that makes a slot free: the submitting thread,
  a gRPC callback thread, or the dispatcher thread, which also fires breaker
  timers and the ``wait_timeout_s`` watchdog. The success path never wakes the
  dispatcher, to keep per-request overhead low.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from protos import codec
from protos.edistill.v1 import local_pb2 as lpb
from protos.edistill.v1 import teacher_pb2 as pb

from . import local as _local

from .balancer import LatencyEwma, pick
from .breaker import CLOSED, UNVERIFIED, CircuitBreaker
from .config import PoolConfig
from .errors import (
    ConfigError,
    NoTeacherAvailableError,
    SourceClosedError,
    StudentError,
    TeacherRequestError,
    TeacherResponseError,
)
from .inputs import batch_rows
from .outputs import OutputSpec, TeacherValue, decode_response, normalize_outputs, output_requests
from .probe import HealthFactory, default_health_factory, probe_outcome, probe_request
from .sources import KnowledgeSource
from .stats import PoolStats, TeacherStats, percentile
from .wire import fast_nbytes, serialize_request

if TYPE_CHECKING:
    import torch

__all__ = ["ChannelFactory", "StubFactory", "TeacherPool"]

logger = logging.getLogger(__name__)

#: ``channel_factory(endpoint, options) -> grpc.Channel``-like object with ``close()``.
ChannelFactory = Callable[[str, Sequence[tuple[str, Any]]], Any]
#: ``stub_factory(channel) -> stub`` whose ``Predict.future(request_bytes, timeout=s)``
#: takes a serialized PredictRequest and returns a ``grpc.Future`` that is also a
#: ``grpc.Call`` resolving to a PredictResponse.
StubFactory = Callable[[Any], Any]

_FATAL = frozenset({
    "INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED", "DATA_LOSS",
})
_SERVER_ERROR = frozenset({"INTERNAL", "UNKNOWN"})
# everything else (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED,
# CANCELLED) is teacher trouble: retry elsewhere.

# The dispatcher wakes at least this often to fire breaker timers and the
# wait_timeout_s watchdog (10 wakeups/s cost well under 0.1% of a core).
_TICK_S = 0.1

# Auto hedging (PoolConfig.hedge_after_s="auto"): a request is hedged once it has
# waited max(hedge_min_s, _HEDGE_P99_FACTOR x p99) of its teacher's latency. 4x
# the p99 is far outside a healthy teacher's tail, so hedges are rare unless a
# teacher is stuck. The p99 needs _HEDGE_MIN_SAMPLES answers (the teacher's own,
# else the slowest such threshold among the other teachers); with none anywhere
# nothing is hedged and timeout_s applies. Recomputed every _HEDGE_REFRESH
# answers (a sort of up to latency_samples floats), not per request.
_HEDGE_P99_FACTOR = 4.0
_HEDGE_MIN_SAMPLES = 8
_HEDGE_REFRESH = 16

# Local transport (PoolConfig.local_transport): after a teacher offered no usable
# local socket (another host, another user, refused), ask it again only this much
# later; after a local connection broke, wait this long before a new one (the
# teacher may be restarting; gRPC carries its batches meanwhile).
_LOCAL_RETRY_S = 60.0
_LOCAL_RECONNECT_S = 2.0


def _classify(code_name: str) -> str:
    """``"fatal"``, ``"server_error"`` or ``"retry"`` for a gRPC status code name."""
    if code_name in _FATAL:
        return "fatal"
    if code_name in _SERVER_ERROR:
        return "server_error"
    return "retry"


def _default_channel_factory(endpoint: str, options: Sequence[tuple[str, Any]]):
    import grpc

    return grpc.insecure_channel(endpoint, options=list(options))


class _PredictStub:
    """Like the generated TeacherStub, but Predict takes pre-serialized bytes (see :mod:`.wire`)."""

    def __init__(self, channel) -> None:
        self.Predict = channel.unary_unary(
            "/edistill.v1.Teacher/Predict",
            request_serializer=None,  # the request is already bytes, serialized once per batch
            response_deserializer=pb.PredictResponse.FromString,
        )


def _default_stub_factory(channel):
    return _PredictStub(channel)


def _rpc_code_and_details(exc: BaseException) -> tuple[str, str]:
    """Status code name and message of a gRPC error (or of any exception)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    try:
        name = code().name if callable(code) else "UNKNOWN"
    except Exception:  # a non-grpc exception with an odd code attribute
        name = "UNKNOWN"
    try:
        text = details() if callable(details) else str(exc)
    except Exception:
        text = str(exc)
    return name, (text or "")


_DONE_STATES = frozenset({"CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"})  # concurrent.futures' states


class _PoolFuture(Future):
    """The future ``submit`` returns: waiting on it also reads same-host teachers' answers.

    Answers over the local transport are read by the waiting thread itself
    (:class:`~student_client.local.LocalHub`), so ``result()`` and
    ``exception()`` pump the pool's hub while this future is not done. Code
    that only polls ``done()`` or waits through ``concurrent.futures.wait``
    still gets every answer, read by the pool's dispatcher within its tick.
    ``done()`` and the result of a finished future skip the condition variable
    (one attribute read); cancelling withdraws the batch from the pool.
    """

    def __init__(self, pool: "TeacherPool", seq: int) -> None:
        super().__init__()
        self._pool = pool
        self._seq = seq

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def result(self, timeout: float | None = None):
        if self._state == "FINISHED" and self._exception is None:
            return self._result
        if self._state not in _DONE_STATES:
            timeout = self._pool._wait(self, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None):
        if self._state not in _DONE_STATES:
            timeout = self._pool._wait(self, timeout)
        return super().exception(timeout)

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._pool._on_cancel(self._seq)
        return True


class _Request:
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
        self.inflight: list[_Attempt] = []
        self.attempts = 0
        self.failed_on: set[str] = set()  # endpoints that failed it: prefer others
        self.server_errors = 0
        self.settled = False
        self.hedged = False  # a hedge was sent (at most one per request)

    def __lt__(self, other: "_Request") -> bool:  # heap order: oldest batch first
        return self.seq < other.seq

    def release(self) -> None:
        """Drop the batch once settled (the caller's future still refers to this request)."""
        self.inputs = self.payload = None


class _Attempt:
    """One Predict call of one request on one teacher."""

    __slots__ = ("request", "teacher", "started_at", "probe", "call", "finished")

    def __init__(self, request: _Request, teacher: "_Teacher", started_at: float, probe: bool) -> None:
        self.request = request
        self.teacher = teacher
        self.started_at = started_at
        self.probe = probe
        self.call = None  # the grpc future, once started
        self.finished = False


class _Teacher:
    """One endpoint: its channel, breaker, load and counters."""

    def __init__(self, endpoint: str, channel, stub, config: PoolConfig, health=None) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.predict = stub.Predict
        # With a health stub the teacher starts UNVERIFIED: no batch before a SERVING health check.
        self.health = health
        self.breaker = CircuitBreaker(config.backoff, verified=health is None)
        self.probing = False  # a health check is in flight (set under the pool lock)
        self.probe_reason: str | None = None  # why the last health check failed
        self.latency = LatencyEwma(config.latency_ewma_alpha)
        self.samples: collections.deque[float] = collections.deque(maxlen=config.latency_samples)
        self.outstanding = 0
        self.last_pick = 0
        self.inflight: set[_Attempt] = set()
        self.live = True
        self.requests = 0
        self.successes = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.retries = 0
        self.failovers = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.hedge_after_s: float | None = None  # auto threshold, recomputed every _HEDGE_REFRESH answers
        self.hedge_basis = -1  # self.successes when hedge_after_s was computed
        self.local: _local.LocalConnection | None = None  # same-host socket, once connected
        self.local_pending = False  # a Describe/connect for the local transport is under way
        self.local_retry_at = 0.0  # no new local attempt before this (monotonic)

    def describe(self, now: float) -> str:
        err = "no errors"
        if self.last_error is not None:
            err = f"last error {self.last_error} ({now - (self.last_error_at or now):.1f} s ago)"
        return f"{self.breaker.describe(now)}, {self.outstanding} in flight, {err}"

    def snapshot(self, now: float) -> TeacherStats:
        s = sorted(self.samples)
        return TeacherStats(
            endpoint=self.endpoint, live=self.live, state=self.breaker.describe(now),
            outstanding=self.outstanding, requests=self.requests, successes=self.successes,
            failures=dict(self.failures), retries=self.retries, failovers=self.failovers,
            last_error=self.last_error, latency_ewma_s=self.latency.value_s,
            latency_p50_s=percentile(s, 50), latency_p90_s=percentile(s, 90), latency_p99_s=percentile(s, 99),
            transport="local" if self.local is not None and not self.local.closed else "grpc",
        )


class _BrokenHealth:
    """Stands in for a health stub that could not be built: every Check fails, saying why."""

    def __init__(self, exc: Exception) -> None:
        self.Check = self
        self._exc = exc

    def future(self, request, timeout=None):
        raise RuntimeError(f"cannot health-check this channel ({self._exc}); pass health_factory= or "
                           "PoolConfig(probe_timeout_s=None)") from self._exc


class _Work:
    """Side effects decided under the lock, carried out after releasing it."""

    __slots__ = ("starts", "settle", "cancel", "close")

    def __init__(self) -> None:
        self.starts: list[_Attempt] = []
        self.settle: list = []  # (request, result, exception)
        self.cancel: list = []  # grpc calls
        self.close: list = []  # channels


class TeacherPool(KnowledgeSource):
    """Remote teachers behind one :class:`KnowledgeSource`.

    Args:
        endpoints: initial ``host:port`` addresses (may be empty when a
            registry fills them in later via :meth:`set_endpoints`).
        outputs: the teacher outputs every request asks for.
        config: timeouts, limits and backoff (:class:`PoolConfig`).
        channel_factory: ``(endpoint, options) -> channel``; default
            ``grpc.insecure_channel``. Inject fakes in unit tests, or a secure
            channel builder.
        stub_factory: ``channel -> stub`` with ``stub.Predict.future``; default
            the generated ``TeacherStub``.
        health_factory: ``channel -> stub`` with ``stub.Check.future`` (the
            grpc.health.v1 probe, see :mod:`.probe`); default the generated
            ``HealthStub``. Unused when ``config.probe_timeout_s`` is None.
        credentials: token and TLS for the default channel factory
            (:class:`~student_client.credentials.TeacherCredentials`); None
            reads ``EDISTILL_AUTH_TOKEN``/``EDISTILL_TLS_*`` from the environment.

    Raises:
        ConfigError: bad endpoints or outputs.
    """

    def __init__(self, endpoints: Iterable[str] = (), outputs: Sequence[str | OutputSpec] | str = ("logits",),
                 *, config: PoolConfig | None = None, channel_factory: ChannelFactory | None = None,
                 stub_factory: StubFactory | None = None, credentials=None,
                 health_factory: HealthFactory | None = None) -> None:
        self._config = config if config is not None else PoolConfig()
        if not isinstance(self._config, PoolConfig):
            raise ConfigError(f"config must be a PoolConfig, got {type(self._config).__name__}")
        self._specs = normalize_outputs(outputs)
        # field 3 of every PredictRequest, serialized once
        self._outputs_blob = pb.PredictRequest(outputs=output_requests(self._specs)).SerializeToString()
        creds = None
        if channel_factory is None:
            from .credentials import TeacherCredentials

            creds = credentials if credentials is not None else TeacherCredentials.from_env()
            channel_factory = creds.channel_factory() if creds is not None else _default_channel_factory
        elif credentials is not None:
            raise ConfigError("pass credentials= or channel_factory=, not both")
        # Same-host teachers (see .local): the hub is made with the first local connection.
        self._local_enabled = self._config.local_transport == "auto" and _local.available()
        self._local_token = creds.token_getter() if creds is not None else (lambda: None)
        self._local_outputs_blob = lpb.LocalRequest(outputs=output_requests(self._specs)).SerializeToString()
        self._hub: _local.LocalHub | None = None
        self._channel_factory = channel_factory
        self._stub_factory = stub_factory or _default_stub_factory
        self._health_factory = health_factory or default_health_factory
        self._probe_request = probe_request() if self._config.probe_timeout_s is not None else None
        self._channel_options = self._config.channel_options()
        self._id = uuid.uuid4().hex[:8]  # distinguishes request ids of pools in one job
        self._seq = itertools.count(1)  # next() is atomic under the GIL

        # The lock guards all state; the dispatcher waits on the condition. Hot paths take the
        # plain lock (`with` on a Condition runs Python code, twice per use).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._kick = False  # dispatcher has something to do now
        self._teachers: dict[str, _Teacher] = {}
        self._retired: list[_Teacher] = []
        self._queue: list[_Request] = []  # heap by seq: retries of older batches go first
        self._live: dict[int, _Request] = {}  # unsettled requests by seq
        self._stall_since = time.monotonic()  # last answer, or when work started waiting
        self._pick_seq = 0
        self._n = collections.Counter()  # pool-wide counters, see PoolStats

        self.set_endpoints(endpoints)
        self._thread = threading.Thread(target=self._dispatch_loop, name=f"edistill-pool-{self._id}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API

    @property
    def outputs(self) -> tuple[OutputSpec, ...]:
        """The output specs every request asks for."""
        return self._specs

    @property
    def config(self) -> PoolConfig:
        """The pool's configuration."""
        return self._config

    @property
    def endpoints(self) -> list[str]:
        """The current teacher endpoints."""
        with self._lock:
            return list(self._teachers)

    def submit(self, inputs: Mapping[str, "torch.Tensor"], *, batch_id: Any) -> "Future[dict[str, TeacherValue]]":
        """Send one batch to a teacher; see :class:`KnowledgeSource`.

        Raises:
            ConfigError: an input that cannot be encoded or is over the message limit.
            SourceClosedError: the pool is closed.
        """
        seq = next(self._seq)
        request_id = f"{self._id}-{seq}"
        payload, kept = None, None
        try:
            size = fast_nbytes(inputs)
            if size is None:  # not plain tensors/arrays: the codec builds (and checks) the message now
                payload, size = serialize_request(request_id, inputs, self._outputs_blob)
            else:  # serialized at the first gRPC attempt, if any (see _start)
                kept = dict(inputs)
        except (codec.CodecError, AttributeError) as exc:
            raise ConfigError(f"cannot send batch {batch_id} to a teacher: {exc}") from exc
        if size > self._config.max_message_bytes:
            raise ConfigError(
                f"batch {batch_id} encodes to {size / 2**20:.1f} MiB, over max_message_bytes="
                f"{self._config.max_message_bytes / 2**20:.0f} MiB; send smaller batches or raise "
                "PoolConfig.max_message_bytes (and the teachers' limit)")
        fut: Future = _PoolFuture(self, seq)
        # Rows sent (the batch dimension shared by all inputs), checked against the answer.
        req = _Request(seq, batch_id, request_id, payload, fut, batch_rows(inputs), kept)
        work = _Work()
        with self._lock:
            if self._closed:
                raise SourceClosedError("TeacherPool is closed; create a new one to submit more batches")
            now = time.monotonic()
            if not self._live:
                self._stall_since = now  # the wait for an answer starts now
            self._live[seq] = req
            self._n["submitted"] += 1
            heapq.heappush(self._queue, req)
            self._assign_locked(now, work)
            if self._queue:  # no teacher free: let the dispatcher time it
                self._kick_locked()
        self._do(work)
        return fut

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
        work = _Work()
        probes: list[_Teacher] = []
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
                work.close.append(t.channel)
                if t.local is not None:
                    work.close.append(t.local)
                logger.info("teacher %s removed (%d batches re-sent)", endpoint, t.failovers)
            for endpoint in wanted:
                if endpoint not in self._teachers:
                    channel = self._channel_factory(endpoint, self._channel_options)
                    health = self._make_health(channel) if self._probe_request is not None else None
                    t = _Teacher(endpoint, channel, self._stub_factory(channel), self._config, health)
                    self._teachers[endpoint] = t
                    if health is not None:
                        t.probing = True
                        probes.append(t)
                    logger.info("teacher %s added%s", endpoint, "" if health is None else ", health check started")
            self._assign_locked(now, work)
            self._kick_locked()
        self._do(work)
        self._start_probes(probes)

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

    def close(self) -> None:
        """Stop the pool: pending batches fail with SourceClosedError, channels close. Idempotent."""
        work = _Work()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for t in self._teachers.values():
                t.live = False
                for a in list(t.inflight):
                    self._abandon_locked(a, work)
                work.close.append(t.channel)
                if t.local is not None:
                    work.close.append(t.local)
            for r in list(self._live.values()):
                self._settle_locked(r, None, SourceClosedError(
                    f"TeacherPool closed while batch {r.batch_id} was waiting for a teacher"), work)
            self._cond.notify_all()
        self._do(work)
        if self._hub is not None:
            self._hub.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    # ------------------------------------------------------- under the lock

    def _kick_locked(self) -> None:
        self._kick = True
        self._cond.notify()

    def _assign_locked(self, now: float, work: _Work) -> None:
        """Give queued requests (oldest first) to free teachers."""
        limit = self._config.max_in_flight_per_teacher
        queue = self._queue
        while queue:
            r = queue[0]
            if r.settled:  # cancelled or expired while queued
                heapq.heappop(queue)
                continue
            cands = [t for t in self._teachers.values()
                     if t.outstanding < limit and (t.breaker.state == CLOSED or t.breaker.available(now))]
            if not cands:
                return
            if r.failed_on:
                fresh = [t for t in cands if t.endpoint not in r.failed_on]
                cands = fresh or cands
            t = pick(cands)
            heapq.heappop(queue)
            self._start_attempt_locked(r, t, now, work)

    def _start_attempt_locked(self, r: _Request, t: _Teacher, now: float, work: _Work) -> None:
        """Book attempt of ``r`` on ``t``; the call itself starts outside the lock (``work.starts``)."""
        self._pick_seq += 1
        t.last_pick = self._pick_seq
        a = _Attempt(r, t, now, t.breaker.on_send(now))
        if r.attempts:  # a re-send or a hedge
            t.retries += 1
        r.attempts += 1
        r.inflight.append(a)
        t.outstanding += 1
        t.requests += 1
        t.inflight.add(a)
        work.starts.append(a)

    def _hedge_threshold_locked(self, t: _Teacher) -> float | None:
        """Seconds after which a request on ``t`` is hedged, or None (see _HEDGE_P99_FACTOR)."""
        fixed = self._config.hedge_after_s
        if fixed != "auto":
            return fixed
        if t.successes - t.hedge_basis >= _HEDGE_REFRESH or t.hedge_basis < 0:
            t.hedge_basis = t.successes
            t.hedge_after_s = None
            if len(t.samples) >= _HEDGE_MIN_SAMPLES:
                p99 = percentile(sorted(t.samples), 99)
                t.hedge_after_s = max(self._config.hedge_min_s, _HEDGE_P99_FACTOR * p99)
        if t.hedge_after_s is not None:
            return t.hedge_after_s
        # A teacher with too few answers (e.g. one that froze on its first batches): compare
        # with the others; the slowest reference avoids hedging a merely slower model.
        known = [o.hedge_after_s for o in self._teachers.values() if o.hedge_after_s is not None]
        return max(known) if known else None

    def _hedge_locked(self, now: float, work: _Work) -> None:
        """Send a second copy of requests outstanding for longer than the hedge threshold.

        Runs in the dispatcher (every _TICK_S at most). One hedge per request, to a
        different available teacher with a free slot; the first answer settles the
        request, the other attempt is withdrawn (_drop_siblings_locked). Queued
        requests go first: hedges only use slots nobody is waiting for.
        """
        fixed = self._config.hedge_after_s
        if fixed is None or self._queue:
            return
        # Every threshold is at least this (auto: hedge_min_s): most ticks end here, after one
        # pass over the attempts in flight instead of a threshold and a sort per teacher.
        floor = self._config.hedge_min_s if fixed == "auto" else fixed
        oldest = min((a.started_at for t in self._teachers.values() for a in t.inflight), default=now)
        if now - oldest < floor:
            return
        limit = self._config.max_in_flight_per_teacher
        for t in list(self._teachers.values()):
            if not t.inflight:
                continue
            after = self._hedge_threshold_locked(t)
            if after is None:
                continue
            for a in sorted(t.inflight, key=lambda x: x.started_at):
                r = a.request
                if now - a.started_at < after:
                    break
                if r.hedged or r.settled or len(r.inflight) > 1:
                    continue
                cands = [o for o in self._teachers.values()
                         if o is not t and o.outstanding < limit and o.breaker.available(now)]
                if r.failed_on:
                    cands = [o for o in cands if o.endpoint not in r.failed_on] or cands
                if not cands:
                    return
                o = pick(cands)
                r.hedged = True
                self._n["hedges"] += 1
                logger.warning("teacher %s has not answered batch %s for %.1f s (hedge_after_s %.2f s); "
                               "sending it to %s as well", t.endpoint, r.batch_id, now - a.started_at, after,
                               o.endpoint)
                self._start_attempt_locked(r, o, now, work)

    def _drop_siblings_locked(self, r: _Request, winner: _Attempt, now: float, work: _Work) -> None:
        """``winner`` answered ``r``: withdraw the other attempt of a hedged request.

        An older attempt that lost the race is counted as a failure of its teacher
        (it did not answer within the hedge threshold while another teacher did),
        so a frozen teacher's breaker opens instead of it getting fresh batches that
        each wait for a hedge; a younger one (the hedge itself) is simply dropped.
        """
        for other in list(r.inflight):
            slow = other.started_at < winner.started_at
            self._abandon_locked(other, work)
            if slow:
                t = other.teacher
                t.failures["HEDGED"] += 1
                t.failovers += 1
                t.last_error = f"HEDGED: no answer to batch {r.batch_id} in {now - other.started_at:.1f} s"
                t.last_error_at = now
                t.breaker.on_failure(now, probe=other.probe)

    def _abandon_locked(self, a: _Attempt, work: _Work) -> None:
        """Withdraw an in-flight attempt: free its slot; its answer will be dropped."""
        if a.finished:
            return
        a.finished = True
        t = a.teacher
        t.outstanding -= 1
        t.inflight.discard(a)
        a.request.inflight.remove(a)
        t.breaker.on_abandon(probe=a.probe)
        if a.call is not None:
            work.cancel.append(a.call)

    def _requeue_locked(self, r: _Request) -> None:
        if not r.settled:
            self._n["retries"] += 1
            heapq.heappush(self._queue, r)

    def _settle_locked(self, r: _Request, result, exc: BaseException | None, work: _Work) -> None:
        if r.settled:
            return
        r.settled = True
        r.release()
        del self._live[r.seq]
        if exc is not None:
            self._n["failed"] += 1
        work.settle.append((r, result, exc))

    def _expire_locked(self, now: float, work: _Work) -> None:
        """Fail everything waiting if no teacher has answered for wait_timeout_s."""
        waited = now - self._stall_since
        if not self._live or waited < self._config.wait_timeout_s:
            return
        endpoints = {e: t.describe(now) for e, t in self._teachers.items()}
        if endpoints:
            where = "; ".join(f"{e}: {d}" for e, d in endpoints.items())
            hint = "check that the teacher servers are running and reachable from this host, or raise wait_timeout_s"
        else:
            where = "the pool has no teacher endpoints"
            if self._retired:
                where += f" (removed: {', '.join(t.endpoint for t in self._retired[-5:])})"
            hint = "pass teachers=['host:port', ...] or check that the registry lists live teachers for the service"
        message = (f"no teacher answered for {waited:.1f} s (wait_timeout_s={self._config.wait_timeout_s:g}) "
                   f"while {len(self._live)} batch(es) waited; teachers: {where}. What to do: {hint}.")
        logger.error("%s", message)
        for t in self._teachers.values():
            for a in list(t.inflight):
                self._abandon_locked(a, work)
        for r in list(self._live.values()):
            self._settle_locked(r, None, NoTeacherAvailableError(
                message, endpoints=endpoints, wait_timeout_s=self._config.wait_timeout_s), work)
        self._stall_since = now

    def _next_wakeup_locked(self, now: float) -> float:
        if not self._live:
            return _TICK_S
        due = self._stall_since + self._config.wait_timeout_s - now
        if self._queue:
            for t in self._teachers.values():
                if t.breaker.state == "open":
                    due = min(due, t.breaker.open_until - now)
        return max(0.0, min(_TICK_S, due))

    # ------------------------------------------------------- outside the lock

    def _do(self, work: _Work) -> None:
        """Carry out decided side effects; never called with the lock held."""
        for call in work.cancel:
            call.cancel()
        for channel in work.close:
            try:
                channel.close()
            except Exception:  # closing is best effort; the channel is dropped anyway
                logger.debug("closing a teacher channel failed", exc_info=True)
        for a in work.starts:
            self._start(a)
        if work.settle:
            for r, result, exc in work.settle:
                try:
                    if exc is not None:
                        r.future.set_exception(exc)
                    else:
                        r.future.set_result(result)
                except InvalidStateError:  # the caller cancelled it meanwhile
                    pass
            self._wake_reader()

    def _start(self, a: _Attempt) -> None:
        r, local = a.request, a.teacher.local
        try:
            inputs, payload = r.inputs, r.payload  # None, None: settled (released) meanwhile
            if inputs is None and payload is None:
                raise LookupError(f"batch {r.batch_id} was settled before this attempt started")
            if local is not None and not local.closed and inputs is not None:
                call = local.predict(r.request_id, list(inputs.items()), self._local_outputs_blob,
                                     self._config.timeout_s, partial(self._on_local_done, a))
            else:
                if payload is None:  # first gRPC attempt of this batch (a hedge may race: same bytes)
                    payload = r.payload = serialize_request(r.request_id, inputs, self._outputs_blob)[0]
                call = a.teacher.predict.future(payload, timeout=self._config.timeout_s)
                local = None
        except Exception as exc:  # e.g. the channel was closed by a concurrent removal
            self._finish(a, None, exc)
            return
        with self._lock:
            a.call = call
            cancel_now = a.finished  # abandoned before the call existed
        if cancel_now:
            call.cancel()
        if local is None:
            call.add_done_callback(partial(self._on_call_done, a))

    def _on_local_done(self, a: _Attempt, call: _local.LocalCall) -> None:
        """The hub's reading thread: a local attempt has an outcome (as _on_call_done, fewer calls)."""
        result, exc, cancelled = call.outcome()
        self._finish(a, result, exc, cancelled=cancelled)

    def _on_call_done(self, a: _Attempt, call) -> None:
        """gRPC callback thread: one attempt has an outcome."""
        if call.cancelled():
            self._finish(a, None, None, cancelled=True)
            return
        exc = call.exception()
        self._finish(a, call.result() if exc is None else None, exc)

    def _finish(self, a: _Attempt, resp, exc: BaseException | None, *, cancelled: bool = False) -> None:
        now = time.monotonic()
        work = _Work()
        decode = local_setup = False
        with self._lock:
            if a.finished:  # re-sent or withdrawn meanwhile: drop the late outcome
                if resp is not None:
                    self._n["late"] += 1
                return
            a.finished = True
            t, r = a.teacher, a.request
            t.outstanding -= 1
            t.inflight.discard(a)
            r.inflight.remove(a)
            if exc is None and not cancelled:
                if t.breaker.state != CLOSED:
                    t.breaker.on_success()
                local_setup = (self._local_enabled and (t.local is None or t.local.closed)
                               and self._local_due_locked(t, now))
                latency = now - a.started_at
                t.latency.add(latency)
                t.samples.append(latency)
                t.successes += 1
                self._stall_since = now
                if r.settled:
                    self._n["late"] += 1
                else:
                    decode = True
                    r.settled = True  # decoded and resolved below, outside the lock
                    r.inputs = r.payload = None  # r.release(), inlined: this is the per-batch path
                    del self._live[r.seq]
                    if r.inflight:
                        self._drop_siblings_locked(r, a, now, work)
            else:
                code, details = ("CANCELLED", "cancelled") if cancelled else _rpc_code_and_details(exc)
                t.failures[code] += 1
                t.last_error, t.last_error_at = f"{code}: {details}", now
                kind = _classify(code)
                if kind == "fatal":
                    # The teacher is alive and answered: not its failure.
                    if a.probe:
                        t.breaker.on_success()
                    self._stall_since = now
                    self._settle_locked(r, None, self._request_error(
                        f"teacher {t.endpoint} rejected batch {r.batch_id} with {code}: {details}",
                        code, details, t, r, exc), work)
                    for other in list(r.inflight):
                        self._abandon_locked(other, work)
                else:
                    t.breaker.on_failure(now, probe=a.probe)
                    logger.warning("teacher %s failed batch %s with %s: %s; re-sending it", t.endpoint,
                                   r.batch_id, code, details)
                    if kind == "server_error":
                        r.server_errors += 1
                    if kind == "server_error" and r.server_errors >= self._config.max_server_error_attempts:
                        self._settle_locked(r, None, self._request_error(
                            f"batch {r.batch_id} failed with a teacher-side error {r.server_errors} times "
                            f"(last: teacher {t.endpoint}, {code}: {details}); the batch may crash the "
                            "teacher model, see the teacher's log", code, details, t, r, exc), work)
                        for other in list(r.inflight):
                            self._abandon_locked(other, work)
                    elif r.inflight or r.settled:  # its other attempt (hedge) still runs: wait for that
                        r.failed_on.add(t.endpoint)
                        t.failovers += 1
                        r.hedged = False  # the next dispatcher tick may hedge it again elsewhere
                    else:
                        r.failed_on.add(t.endpoint)
                        t.failovers += 1
                        self._requeue_locked(r)
                        self._kick_locked()
            if self._queue:
                self._assign_locked(now, work)
        self._do(work)
        if decode:
            self._deliver(r, resp, t.endpoint)
            if local_setup:
                self._start_local(t)

    @staticmethod
    def _request_error(message: str, code: str, details: str, t: _Teacher, r: _Request,
                       exc: BaseException | None) -> TeacherRequestError:
        err = TeacherRequestError(message, code=code, details=details, endpoint=t.endpoint, batch_id=r.batch_id)
        err.__cause__ = exc  # the grpc.RpcError, as `raise ... from exc` would
        return err

    def _deliver(self, r: _Request, resp: pb.PredictResponse, endpoint: str) -> None:
        try:
            if resp.request_id != r.request_id:
                raise TeacherResponseError(
                    f"teacher {endpoint} answered request {r.request_id} with the id "
                    f"{resp.request_id!r}", endpoint=endpoint, batch_id=r.batch_id)
            result = decode_response(resp, self._specs, endpoint=endpoint, batch_id=r.batch_id,
                                     batch_size=r.rows)
        except StudentError as exc:
            with self._lock:
                self._n["failed"] += 1
            self._set(r.future, None, exc)
            return
        with self._lock:
            self._n["completed"] += 1
        self._set(r.future, result, None)

    def _set(self, fut: Future, result, exc) -> None:
        try:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        except InvalidStateError:
            pass
        self._wake_reader()

    def _wait(self, fut: Future, timeout: float | None) -> float | None:
        """Pump the local hub until ``fut`` is done or ``timeout`` passes; return the time left.

        Without same-host teachers this returns at once (the future is then
        settled by gRPC's callback thread). A gRPC answer that settles a future
        while this thread is in poll() wakes it (:meth:`_wake_reader`).
        """
        hub = self._hub
        if hub is None or not hub.connections:
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        done = fut.done
        while not done():
            slice_s = 0.05
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return 0.0
                slice_s = min(left, slice_s)
            if not hub.pump(slice_s, until=done):
                # Another thread is reading; its answers settle this future.
                concurrent.futures.wait([fut], timeout=min(slice_s, 0.002))
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _wake_reader(self) -> None:
        """After settling a future outside the hub's pump: wake a thread blocked in its poll()."""
        hub = self._hub
        if hub is not None and hub.selecting:
            hub.wake()

    def _on_cancel(self, seq: int) -> None:
        """The caller cancelled a batch's future: withdraw it (its answer is no longer wanted)."""
        work = _Work()
        with self._lock:
            r = self._live.get(seq)
            if r is None or r.settled:
                return
            self._n["cancelled"] += 1
            r.settled = True
            r.release()
            del self._live[r.seq]
            for a in list(r.inflight):
                self._abandon_locked(a, work)
            if not self._closed:
                self._assign_locked(time.monotonic(), work)
        self._do(work)
        self._wake_reader()  # a thread may be waiting for this very future in the hub's poll()

    # ---------------------------------------------------------- health probes

    def _make_health(self, channel):
        try:
            return self._health_factory(channel)
        except Exception as exc:  # e.g. a custom channel without unary_unary: every probe fails, clearly
            return _BrokenHealth(exc)

    def _due_probes_locked(self, now: float) -> list[_Teacher]:
        """Unverified teachers whose next health check is due (marked as probing)."""
        due = []
        for t in self._teachers.values():
            if t.breaker.state == UNVERIFIED and not t.probing and t.health is not None \
                    and t.breaker.health_check_due(now):
                t.probing = True
                due.append(t)
        return due

    def _start_probes(self, teachers: list[_Teacher]) -> None:
        """Send a health check to each teacher; never called with the lock held."""
        for t in teachers:
            try:
                call = t.health.Check.future(self._probe_request, timeout=self._config.probe_timeout_s)
            except Exception as exc:  # e.g. the channel was closed by a concurrent removal
                self._on_probe_done(t, None, exc)
                continue
            call.add_done_callback(partial(self._on_probe_done, t))

    def _on_probe_done(self, t: _Teacher, call, exc: BaseException | None = None) -> None:
        """gRPC callback thread: a health check finished; verify the teacher or back off."""
        if call is not None:
            try:
                ok, reason = probe_outcome(call)
            except Exception as e:  # a response we cannot read is a failed check
                ok, reason = False, f"unreadable health answer: {e}"
        else:
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        work = _Work()
        with self._lock:
            t.probing = False
            if self._closed or not t.live:
                return
            local_setup = False
            if ok:
                t.breaker.on_health_ok()
                t.probe_reason = None
                logger.info("teacher %s passed its health check; sending it batches", t.endpoint)
                self._assign_locked(now, work)
                local_setup = self._local_enabled and self._local_due_locked(t, now)
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
            self._start_local(t)

    # ------------------------------------------------------- local transport

    def _local_due_locked(self, t: _Teacher, now: float) -> bool:
        """Whether to (re)try the local transport with ``t`` now; marks it pending if so."""
        if self._closed or not t.live or t.local_pending or now < t.local_retry_at:
            return False
        if t.local is not None:
            if not t.local.closed:
                return False
            t.local = None  # it broke (teacher stopped or restarted): gRPC meanwhile
            t.local_retry_at = now + _LOCAL_RECONNECT_S
            return False
        t.local_pending = True
        return True

    def _start_local(self, t: _Teacher) -> None:
        """Ask ``t`` (over its verified channel) whether it offers a local socket; connect if so."""
        try:
            describe = t.channel.unary_unary("/edistill.v1.Teacher/Describe",
                                             request_serializer=pb.DescribeRequest.SerializeToString,
                                             response_deserializer=pb.DescribeResponse.FromString)
            call = describe.future(pb.DescribeRequest(), timeout=self._config.probe_timeout_s or 2.0)
        except Exception as exc:  # a custom channel without Describe: gRPC only
            self._local_failed(t, f"Describe could not be sent ({exc})")
            return
        call.add_done_callback(partial(self._on_describe_done, t))

    def _on_describe_done(self, t: _Teacher, call) -> None:
        try:
            resp = call.result()
        except Exception as exc:
            code, details = _rpc_code_and_details(exc)
            self._local_failed(t, f"Describe failed ({code}: {details})")
            return
        if not isinstance(resp, pb.DescribeResponse) or not resp.local_socket:
            self._local_failed(t, "it offers no local socket")
            return
        if not _local.same_host(resp.host_id):
            self._local_failed(t, "it runs on another host")
            return
        try:
            with self._lock:
                if self._closed:
                    raise ConnectionError("the pool is closed")
                if self._hub is None:
                    self._hub = _local.LocalHub()
                hub = self._hub
            conn = hub.connect(resp.local_socket, teacher_id=resp.teacher_id, token=self._local_token(),
                               timeout_s=self._config.probe_timeout_s or 2.0,
                               max_frame_bytes=self._config.max_message_bytes)
        except Exception as exc:  # another user's socket (EACCES), refused token, teacher gone...
            self._local_failed(t, f"cannot use its local socket {resp.local_socket} ({exc})", info=True)
            return
        with self._lock:
            t.local_pending = False
            keep = not self._closed and t.live
            if keep:
                t.local = conn
        if not keep:
            conn.close()
            return
        logger.info("teacher %s runs on this host: sending it batches over %s (shared memory, no copy "
                    "through gRPC)", t.endpoint, resp.local_socket)

    def _local_failed(self, t: _Teacher, why: str, *, info: bool = False) -> None:
        with self._lock:
            t.local_pending = False
            t.local_retry_at = time.monotonic() + _LOCAL_RETRY_S
        (logger.info if info else logger.debug)(
            "teacher %s: local transport not used, %s; batches go over gRPC", t.endpoint, why)

    # ------------------------------------------------------------ dispatcher

    def _dispatch_loop(self) -> None:
        """Fire breaker timers, send queued work and run the wait_timeout_s watchdog."""
        while True:
            work = _Work()
            with self._lock:
                if self._closed:
                    return
                if not self._kick:
                    self._cond.wait(self._next_wakeup_locked(time.monotonic()))
                self._kick = False
                if self._closed:
                    return
                now = time.monotonic()
                self._assign_locked(now, work)
                self._hedge_locked(now, work)
                self._expire_locked(now, work)
                probes = self._due_probes_locked(now)
            try:
                self._do(work)
                self._start_probes(probes)
                if self._hub is not None:  # answers nobody is waiting for yet, broken sockets, deadlines
                    self._hub.pump(0.0)
            except Exception:  # keep the watchdog alive whatever a callback did
                logger.exception("teacher pool dispatcher step failed")
