"""TeacherPool: remote teachers as one knowledge source; this module is its per-request scheduler.

Each batch goes to the teacher with the smallest expected completion time
(:mod:`.balancer`), at most ``max_in_flight_per_teacher`` per teacher, each
call with a deadline; a failing teacher is taken out of rotation by its
circuit breaker (:mod:`.breaker`) and its batches are re-sent to another.
Around the scheduler: failure classification (:mod:`.status`), hedging
(:mod:`.hedging`), transports, gRPC or the same-host socket
(:mod:`.transports`), health checks before a teacher is trusted
(:mod:`.probe`), attempt outcomes (:mod:`._pool_outcomes`), membership and
the "no teacher" watchdog (:mod:`._pool_members`), registry discovery
(:mod:`.discovery`, :meth:`TeacherPool.from_registry`).

Liveness: whenever batches are waiting and no teacher has answered anything
for ``wait_timeout_s``, every waiting batch fails with NoTeacherAvailableError
naming each endpoint and its last error. Nothing waits forever.

Concurrency (read before changing anything here):

* One lock (``self._lock``; ``self._cond`` is the dispatcher's condition on it) guards all
  mutable state: the queue, the live request table, teachers, counters,
  breakers. It is never held while calling into a transport (starting,
  cancelling a call, closing a channel) or while resolving a user future: a
  transport may run a done-callback synchronously in the calling thread, and
  future callbacks may call back into the pool; both would deadlock on a held lock.
* Work is therefore decided under the lock (a slot reserved, an ``Attempt``
  created) and carried out after releasing it (``Work``).
* Every ``Request`` is settled (its future resolved) exactly once, guarded by
  ``request.settled`` under the lock. ``request.inflight`` lists its
  unfinished attempts (two only while a hedge races the original); settling
  a request withdraws the others, and a request is re-queued only when its
  last attempt failed, so a hedge never makes a batch be sent in parallel
  more than twice or delivered twice. Every ``Attempt`` finishes exactly once
  (``attempt.finished``), which frees its teacher slot; an answer for a
  finished attempt is a late answer and is dropped.
* Sends happen in the thread that makes a slot free: the submitting thread,
  a transport callback thread, or the dispatcher thread, which also fires
  breaker timers and the ``wait_timeout_s`` watchdog. The success path never
  wakes the dispatcher, to keep per-request overhead low.
* Same-host answers are read by whichever thread pumps the local hub: the
  thread waiting in a future's ``result()``, or the dispatcher, which pumps
  (instead of sleeping) while some pending future has a done-callback, so
  a source chained on a pool future gets its answer at once.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any, Iterable

from protos import codec
from protos.edistill.v1 import local_pb2 as lpb
from protos.edistill.v1 import teacher_pb2 as pb

from . import local as _local
from ._pool_members import MembershipMixin, MembershipState
from ._pool_outcomes import OutcomeMixin
from ._poolstate import Attempt, Request, Teacher, Work
from .balancer import pick
from .breaker import CLOSED, OPEN
from .config import PoolConfig
from .errors import ConfigError, SourceClosedError
from .futures import PoolFuture, settle, wake_reader
from .hedging import HedgePolicy
from .inputs import batch_rows
from .outputs import OutputSpec, TeacherValue, normalize_outputs, output_requests
from .probe import HealthFactory, HealthProber
from .sources import KnowledgeSource, SourceRequest, check_request
from .transports import ChannelFactory, LocalSetup, StubFactory, channel_setup, default_stub_factory
from .wire import fast_nbytes

if TYPE_CHECKING:
    from .discovery import RegistryFollower

__all__ = ["ChannelFactory", "StubFactory", "TeacherPool"]

logger = logging.getLogger(__name__)

# The dispatcher wakes at least this often to fire breaker timers and the
# wait_timeout_s watchdog (10 wakeups/s cost well under 0.1% of a core).
_TICK_S = 0.1


class TeacherPool(MembershipMixin, OutcomeMixin, KnowledgeSource):
    """Remote teachers behind one :class:`KnowledgeSource` ("the online class").

    Args:
        endpoints: initial ``host:port`` addresses (may be empty; see
            :meth:`set_endpoints` and :meth:`from_registry`).
        outputs: the teacher outputs every request asks for (names,
            :class:`OutputSpec`, or a loss that says what it needs).
        config: timeouts, limits and backoff (:class:`PoolConfig`); None:
            the defaults, with ``trust_env`` the environment's settings.
        credentials: token and TLS for the channels
            (:class:`~student_client.credentials.TeacherCredentials`); None:
            with ``trust_env`` from ``EDISTILL_AUTH_TOKEN``/``EDISTILL_TLS_*``,
            else plaintext without a token.
        channel_factory: ``(endpoint, options) -> channel`` instead of the
            credentials' (fakes in unit tests, a custom secure channel).
        stub_factory: ``channel -> stub`` with ``stub.Predict.future``.
        health_factory: ``channel -> stub`` with ``stub.Check.future`` (the
            grpc.health.v1 probe, see :mod:`.probe`). Unused when
            ``config.probe_timeout_s`` is None.
        trust_env: read unset settings from the environment
            (:mod:`student_client.env` lists the variables).

    Raises:
        ConfigError: bad endpoints, outputs or arguments.
    """

    def __init__(self, endpoints: Iterable[str] = (), outputs: Any = ("logits",), *,
                 config: PoolConfig | None = None, credentials=None,
                 channel_factory: ChannelFactory | None = None, stub_factory: StubFactory | None = None,
                 health_factory: HealthFactory | None = None, trust_env: bool = True) -> None:
        if config is None:
            config = PoolConfig.from_env() if trust_env else PoolConfig()
        elif not isinstance(config, PoolConfig):
            raise ConfigError(f"config must be a PoolConfig, got {type(config).__name__}")
        self._config = config
        self._specs = normalize_outputs(outputs)
        self._channel_factory, token = channel_setup(credentials, channel_factory, trust_env)
        self._stub_factory = stub_factory or default_stub_factory
        self._outputs_blob = pb.PredictRequest(outputs=output_requests(self._specs)).SerializeToString()
        self._prober = HealthProber(health_factory, config.probe_timeout_s, self._on_probe_result)
        self._hedger = HedgePolicy(config)
        self._channel_options = config.channel_options()
        self._id = uuid.uuid4().hex[:8]  # distinguishes request ids of pools in one job
        self._seq = itertools.count(1)  # next() is atomic under the GIL
        self._follower: RegistryFollower | None = None
        self._membership = MembershipState()  # Describe answers, float64 casts, waiting lines (_pool_members)

        # The lock guards all state; the dispatcher waits on _cond, wait_for_teachers on
        # _ready. Hot paths take the plain lock (`with` on a Condition runs Python code twice).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ready = threading.Condition(self._lock)
        self._closed = False
        self._kick = False  # dispatcher has something to do now
        self._pumping = False  # the dispatcher is reading the hub (a kick must wake it there)
        self._watched: list[Future] = []  # pending futures with done-callbacks (see PoolFuture)
        self._teachers: dict[str, Teacher] = {}
        self._retired: list[Teacher] = []
        self._queue: list[Request] = []  # heap by seq: retries of older batches go first
        self._live: dict[int, Request] = {}  # unsettled requests by seq
        self._stall_since = time.monotonic()  # last answer, or when work started waiting
        self._pick_seq = 0
        self._n = collections.Counter()  # pool-wide counters, see PoolStats
        # Same-host teachers (see .local and .transports): the hub is made with the first connection.
        self._local_enabled = config.local_transport == "auto" and _local.available()
        self._localsetup = LocalSetup(
            self._lock, lambda: not self._closed,
            token,
            lpb.LocalRequest(outputs=output_requests(self._specs)).SerializeToString(),
            config.probe_timeout_s or 2.0, config.max_message_bytes)

        self.set_endpoints(endpoints)
        self._thread = threading.Thread(target=self._dispatch_loop, name=f"edistill-pool-{self._id}",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def from_registry(cls, url: str, service: str, outputs: Any = ("logits",), *, poll_s: float | None = None,
                      **kwargs: Any) -> "TeacherPool":
        """A pool that follows the live teachers of ``service`` in the registry at ``url``.

        It owns its watcher (:mod:`.discovery`), which is closed with the pool,
        and its "no teacher" errors say what the registry knows (unreachable,
        or no live teacher of that service). ``kwargs`` are the constructor's.

        Raises:
            ConfigError: a bad registry URL, service name or refused credentials.
        """
        from .discovery import RegistryFollower

        pool = cls((), outputs, **kwargs)
        try:
            follower = RegistryFollower(url, service, pool.set_endpoints, poll_s=poll_s)
            pool._follower = follower
            follower.start(pool._config.wait_timeout_s)
        except BaseException:
            pool.close()
            raise
        return pool

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

    def submit(self, request: SourceRequest) -> "Future[dict[str, TeacherValue]]":
        """Send one batch to a teacher; see :class:`KnowledgeSource`.

        Raises:
            ConfigError: an input that cannot be encoded or is over the message limit.
            SourceClosedError: the pool is closed.
        """
        if type(request) is not SourceRequest:
            request = check_request(request)
        inputs, batch_id = request[0], request[1]
        seq = next(self._seq)
        request_id = f"{self._id}-{seq}"
        payload, kept = None, None
        try:
            size = fast_nbytes(inputs)
            if size is None:  # not plain wire-dtype tensors/arrays: float64 is cast, the rest goes to the codec
                inputs, payload, size = self._odd_inputs(inputs, batch_id, request_id, seq)
                kept = None if payload is not None else inputs
            else:  # serialized at the first gRPC attempt, if any (see transports.GrpcTransport)
                kept = dict(inputs)
        except (codec.CodecError, AttributeError) as exc:
            raise ConfigError(f"cannot send batch {batch_id} to a teacher: {exc}") from exc
        if size > self._config.max_message_bytes:
            raise ConfigError(
                f"batch {batch_id} encodes to {size / 2**20:.1f} MiB, over max_message_bytes="
                f"{self._config.max_message_bytes / 2**20:.0f} MiB; send smaller batches or raise "
                "PoolConfig.max_message_bytes (and the teachers' limit)")
        fut: Future = PoolFuture(self, seq)
        # Rows sent (the batch dimension shared by all inputs), checked against the answer.
        req = Request(seq, batch_id, request_id, payload, fut, batch_rows(inputs), kept)
        work = Work()
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

    def describe(self, timeout_s: float = 5.0) -> dict:
        """``{endpoint: DescribeResponse}`` of the verified teachers: the model name and version each serves."""
        from .describe import describe_channels

        with self._lock:
            channels = {e: t.grpc.channel for e, t in self._teachers.items()
                        if t.live and t.breaker.state != "unverified"}
        return describe_channels(channels, timeout_s)

    def close(self) -> None:
        """Stop the pool: pending batches fail with SourceClosedError, channels close. Idempotent."""
        if self._follower is not None:
            self._follower.close()  # no more set_endpoints from the watcher
        work = Work()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for t in self._teachers.values():
                t.live = False
                for a in list(t.inflight):
                    self._abandon_locked(a, work)
                work.close += t.transports()
            for r in list(self._live.values()):
                self._settle_locked(r, None, SourceClosedError(
                    f"TeacherPool closed while batch {r.batch_id} was waiting for a teacher"), work)
            self._cond.notify_all()
            self._ready.notify_all()
        self._do(work)
        self._localsetup.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    # ------------------------------------------------------- under the lock

    def _kick_locked(self) -> None:
        self._kick = True
        self._cond.notify()
        if self._pumping:  # the dispatcher is in the hub's poll(), not on the condition
            self._localsetup.hub.wake()

    def _assign_locked(self, now: float, work: Work) -> None:
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

    def _start_attempt_locked(self, r: Request, t: Teacher, now: float, work: Work) -> None:
        """Book an attempt of ``r`` on ``t``; the call itself starts outside the lock (``work.starts``)."""
        self._pick_seq += 1
        t.last_pick = self._pick_seq
        a = Attempt(r, t, now, t.breaker.on_send(now))
        if r.attempts:  # a re-send or a hedge
            t.retries += 1
        r.attempts += 1
        r.inflight.append(a)
        t.outstanding += 1
        t.requests += 1
        t.inflight.add(a)
        work.starts.append(a)

    def _hedge_locked(self, now: float, work: Work) -> None:
        """Send hedges that are due (dispatcher only); queued requests go first (:mod:`.hedging`)."""
        if self._queue:
            return
        for r, slow, target, after in self._hedger.due(now, self._teachers):
            r.hedged = True
            self._n["hedges"] += 1
            logger.warning("teacher %s has not answered batch %s for %.1f s (hedge_after_s %.2f s); "
                           "sending it to %s as well", slow.teacher.endpoint, r.batch_id, now - slow.started_at,
                           after, target.endpoint)
            self._start_attempt_locked(r, target, now, work)


    def _abandon_locked(self, a: Attempt, work: Work) -> None:
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

    def _requeue_locked(self, r: Request) -> None:
        if not r.settled:
            self._n["retries"] += 1
            heapq.heappush(self._queue, r)

    def _settle_locked(self, r: Request, result, exc: BaseException | None, work: Work) -> None:
        if r.settled:
            return
        r.settled = True
        r.release()
        del self._live[r.seq]
        if exc is not None:
            self._n["failed"] += 1
        work.settle.append((r, result, exc))



    def _next_wakeup_locked(self, now: float) -> float:
        if not self._live:
            return _TICK_S
        due = self._stall_since + self._config.wait_timeout_s - now
        if self._queue:
            for t in self._teachers.values():
                if t.breaker.state == OPEN:
                    due = min(due, t.breaker.open_until - now)
        return max(0.0, min(_TICK_S, due))

    # ------------------------------------------------------- outside the lock

    def _do(self, work: Work) -> None:
        """Carry out decided side effects; never called with the lock held."""
        for call in work.cancel:
            call.cancel()
        for transport in work.close:
            try:
                transport.close()
            except Exception:  # closing is best effort; the transport is dropped anyway
                logger.debug("closing a teacher transport failed", exc_info=True)
        for a in work.starts:
            self._start(a)
        if work.settle:
            for r, result, exc in work.settle:
                settle(r.future, result, exc)  # False: the caller cancelled it meanwhile
            wake_reader(self._localsetup.hub)

    def _start(self, a: Attempt) -> None:
        r, t = a.request, a.teacher
        transport = t.local
        try:
            if r.inputs is None and r.payload is None:  # settled (released) meanwhile
                raise LookupError(f"batch {r.batch_id} was settled before this attempt started")
            if transport is None or transport.closed or r.inputs is None:
                transport = t.grpc
            else:
                t.used_local = True
            call = transport.start(r, self._config.timeout_s, partial(self._finish, a))
        except Exception as exc:  # e.g. the channel was closed by a concurrent removal
            self._finish(a, None, exc, False)
            return
        with self._lock:
            a.call = call
            cancel_now = a.finished  # abandoned before the call existed
        if cancel_now:
            call.cancel()








    def _watch(self, fut: Future) -> None:
        """A pending future (:class:`~student_client.futures.PoolFuture`) got a done-callback: the dispatcher reads answers until it is done."""
        with self._lock:
            self._watched.append(fut)
            if not self._pumping:
                self._kick_locked()

    def _on_cancel(self, seq: int) -> None:
        """The caller cancelled a batch's future: withdraw it (its answer is no longer wanted)."""
        work = Work()
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
        wake_reader(self._localsetup.hub)  # a thread may be waiting for this very future in the hub's poll()


    # ------------------------------------------------------------ dispatcher

    def _dispatch_loop(self) -> None:
        """Fire breaker timers, send queued work, hedge, and run the wait_timeout_s watchdog."""
        while True:
            pump_s = None
            with self._lock:
                if self._closed:
                    return
                if not self._kick:
                    wait_s = self._next_wakeup_locked(time.monotonic())
                    if self._watched:
                        self._watched = [f for f in self._watched if not f.done()]
                    hub = self._localsetup.hub
                    if self._watched and hub is not None and hub.connections:
                        pump_s, self._pumping = wait_s, True
                    else:
                        self._cond.wait(wait_s)
            if pump_s is not None:
                read = hub.pump(pump_s)  # returns when answers were read, on a kick, or after pump_s
                with self._lock:
                    self._pumping = False
                    if not read and not self._kick and not self._closed:  # another thread reads the hub
                        self._cond.wait(pump_s)
            work = Work()
            with self._lock:
                if self._closed:
                    return
                self._kick = False
                now = time.monotonic()
                self._assign_locked(now, work)
                self._hedge_locked(now, work)
                self._expire_locked(now, work)
                probes = self._prober.due_locked(self._teachers.values(), now)
            try:
                self._do(work)
                self._prober.start(probes)
                hub = self._localsetup.hub
                if hub is not None:  # answers nobody is waiting for yet, broken sockets, deadlines
                    hub.pump(0.0)
            except Exception:  # keep the watchdog alive whatever a callback did
                logger.exception("teacher pool dispatcher step failed")
