"""Which teachers a pool has and trusts (a mixin of :class:`~student_client.pool.TeacherPool`).

Endpoints come and go (:meth:`set_endpoints`, fed by a registry through
:mod:`student_client.discovery`); each new one is used only after its
health check (:mod:`student_client.probe`) and its ``Describe`` answer: a
teacher without the outputs this pool asks for (or with fewer values than
``top_k``) gets no batch, and while no teacher fits, the waiting batches
fail with a ConfigError that says so (:mod:`student_client.signature`). The
first teacher's declared input dtypes decide how float64 batches are cast.
While batches wait and no teacher is ready, a "waiting for teachers of ..."
WARNING is logged after a second and then every few seconds;
:meth:`wait_for_teachers` and the ``wait_timeout_s`` watchdog explain an
empty or dead pool in words that fit how it was set up. The concurrency
rules are the pool's (:mod:`student_client.pool`).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb

from ._poolstate import Teacher, Work
from .breaker import CLOSED
from .describe import describe_call
from .errors import ConfigError, NoTeacherAvailableError, SourceClosedError
from .signature import TeacherSignature, cast_float64
from .stats import PoolStats
from .status import code_and_details
from .transports import GrpcTransport
from .wire import fast_nbytes, serialize_request

__all__ = ["MembershipMixin", "MembershipState"]

logger = logging.getLogger("student_client.pool")

# While batches wait and no teacher is ready: the first "waiting for teachers" line after
# this long without an answer, then one every _WAITING_LOG_S (wait_for_teachers too).
_FIRST_WAITING_LOG_S = 1.0
_WAITING_LOG_S = 5.0


class MembershipState:
    """What the pool learned from its teachers' ``Describe`` answers, and when it last said it waits.

    Guarded by the pool's lock (``signature`` is also read without it: one reference, set once).
    """

    __slots__ = ("signature", "refusal", "default_cast", "cast_logged", "waiting_log_at")

    def __init__(self) -> None:
        self.signature: TeacherSignature | None = None  # the first teacher that fits
        self.refusal: ConfigError | None = None  # why no teacher fits (until one does)
        self.default_cast: dict[int, list[str]] = {}  # seq -> inputs cast to float32 before a signature
        self.cast_logged = False
        self.waiting_log_at: float | None = None  # next "waiting for teachers" line


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
                if not ready and self._membership.refusal is not None:
                    raise self._membership.refusal
                if len(ready) >= n or now - start >= timeout:
                    break
                if now >= next_log:
                    next_log = now + _WAITING_LOG_S
                    logger.warning("%s", self._waiting_line_locked(
                        now, f"{len(ready)} of {n} ready after {now - start:.0f} s (gives up after {timeout:g} s)"))
                self._ready.wait(min(0.5, next_log - now, timeout - (now - start)))
            if len(ready) >= n:
                return ready
            message = self._no_teacher_message_locked(
                now, f"{len(ready)} of the {n} teacher(s) waited for answered their health check within "
                     f"{timeout:g} s")
            endpoints = {e: t.describe(now) for e, t in self._teachers.items()}
        raise NoTeacherAvailableError(message, endpoints=endpoints, wait_timeout_s=timeout)

    def _on_probe_result(self, t: Teacher, ok: bool, reason: str) -> None:
        """A health check finished (any thread): ask for the teacher's Describe, or back off."""
        now = time.monotonic()
        with self._lock:
            t.probing = False
            if self._closed or not t.live:
                return
            if ok:
                t.probing = True  # until its Describe answer is checked (_on_describe)
            else:
                t.breaker.on_health_failed(now)
                t.last_error, t.last_error_at = f"health check failed ({reason})", now
                # One warning per distinct reason: a dead registry entry must not flood the log.
                log = logger.debug if reason == t.probe_reason else logger.warning
                log("teacher %s failed its health check (%s); it gets no batches, checking again in %.1f s",
                    t.endpoint, reason, max(0.0, t.breaker.open_until - now))
                t.probe_reason = reason
        if ok:
            self._describe(t)

    def _describe(self, t: Teacher) -> None:
        """Send ``Describe`` on the teacher's verified channel; :meth:`_on_describe` gets the outcome."""
        try:
            call = describe_call(t.grpc.channel, self._config.probe_timeout_s or 5.0)
        except Exception as exc:  # a custom channel without Describe: trusted on its health check alone
            self._on_describe(t, None, f"{type(exc).__name__}: {exc}")
            return
        call.add_done_callback(lambda c: self._on_describe(t, c, None))

    def _on_describe(self, t: Teacher, call, failed: str | None) -> None:
        """Describe answered (any thread): use the teacher if it can answer this pool's requests."""
        signature = resp = None
        if call is not None:
            try:
                resp = call.result()
                signature = TeacherSignature.from_describe(t.endpoint, resp)
            except Exception as exc:  # timed out, not a teacher's answer: the health check vouches for it
                failed = "{}: {}".format(*code_and_details(exc, default=type(exc).__name__))
        problem = signature.output_problem(self._specs) if signature is not None else None
        now = time.monotonic()
        work = Work()
        local_setup = False
        with self._lock:
            t.probing = False
            if self._closed or not t.live:
                return
            if problem is not None:
                self._refuse_locked(t, problem, now, work)
            else:
                if signature is None:
                    logger.debug("teacher %s: no Describe answer (%s); used on its health check alone",
                                 t.endpoint, failed)
                elif self._membership.signature is None:
                    self._learn_locked(signature, work)
                t.breaker.on_health_ok()
                t.probe_reason = None
                logger.info("teacher %s passed its health check; sending it batches", t.endpoint)
                self._assign_locked(now, work)
                local_setup = self._local_enabled and self._localsetup.due_locked(t, now)
                self._ready.notify_all()
        self._do(work)
        if local_setup:  # its answer says whether it offers a local socket: no second Describe
            self._localsetup.start(t, resp if signature is not None else None)

    def _refuse_locked(self, t: Teacher, problem: str, now: float, work: Work) -> None:
        """``t`` cannot answer this pool's requests: no batches for it; fail the waiting ones if none fits."""
        t.breaker.on_health_failed(now)  # stays unverified; asked again after the backoff
        t.last_error, t.last_error_at = f"refused: {problem}", now
        (logger.debug if t.probe_reason == problem else logger.warning)(
            "teacher %s gets no batches: %s", t.endpoint, problem)
        t.probe_reason = problem
        if self._membership.signature is None:  # no teacher fits so far: the pool's outputs are wrong
            error = self._membership.refusal = ConfigError(problem)
            for r in list(self._live.values()):
                self._settle_locked(r, None, error, work)
            self._ready.notify_all()

    def _learn_locked(self, signature: TeacherSignature, work: Work) -> None:
        """The first teacher that fits: its input dtypes apply to the batches still queued."""
        state = self._membership
        state.signature, state.refusal = signature, None
        for r in self._queue:
            if r.settled or r.inputs is None:
                continue
            # Cast to float32 before any teacher had said; a float16/bfloat16 input gets its declared dtype now
            # (an integer one is refused just below). A copy of at most a window of batches, once.
            for n in state.default_cast.get(r.seq, ()):
                wire = signature.declared(n)
                if wire in (pb.FLOAT16, pb.BFLOAT16):  # float32 -> it: the same values as through float64
                    r.inputs[n] = r.inputs[n].to(codec.torch_dtype_maps()[0][wire])
            problem = signature.input_problem(r.inputs, r.batch_id)
            if problem is not None:
                self._settle_locked(r, None, ConfigError(problem), work)
        state.default_cast.clear()

    def _odd_inputs(self, inputs, batch_id, request_id: str, seq: int):
        """Submit's slow path, for inputs that are not plain wire-dtype tensors/arrays.

        float64 (numpy's default) is cast to the teacher's declared float
        dtype (float32 before any teacher has said); anything else goes
        through the codec, which names what it cannot send. Returns
        ``(inputs, payload or None, size)``.

        Raises:
            ConfigError: a cast that would change the values' meaning, or an
                input the teacher does not take (its dtype and shape named).
            protos.codec.CodecError: an input the codec cannot send.
        """
        signature = self._membership.signature  # one reference read; set once, under the lock
        cast_inputs, names = cast_float64(inputs, signature, batch_id)
        size = fast_nbytes(cast_inputs) if names else None
        if size is not None:
            with self._lock:
                if signature is None:
                    self._membership.default_cast[seq] = names
                first, self._membership.cast_logged = not self._membership.cast_logged, True
            if first:
                target = "the teacher's declared dtype" if signature is not None else "float32 (no teacher has " \
                    "described its inputs yet; the declared dtype applies once one has)"
                logger.warning("batch %s: casting float64 input(s) %s to %s; logged once. Make them float32 in "
                               "your dataset to save this copy", batch_id, ", ".join(map(repr, names)), target)
            return cast_inputs, None, size
        problem = signature.input_problem(cast_inputs, batch_id) if signature is not None else None
        if problem is not None:
            raise ConfigError(problem)
        payload, size = serialize_request(request_id, cast_inputs, self._outputs_blob)
        return cast_inputs, payload, size

    def _input_advice_locked(self, r, code: str) -> str:
        """For a teacher's INVALID_ARGUMENT: what the first teacher's signature says is wrong with the batch."""
        signature = self._membership.signature
        if code != "INVALID_ARGUMENT" or signature is None or not r.inputs:
            return ""
        problem = signature.input_problem(r.inputs, r.batch_id)
        return f". {problem}" if problem else ""

    def _waiting_line_locked(self, now: float, what: str) -> str:
        """``"waiting for teachers of service 'x' at URL: <what>. <why, from the registry>"``."""
        if self._follower is not None:
            where = self._follower.waiting_for
            why = self._follower.explain(bool(self._teachers))
        else:
            where = f"teachers {', '.join(self._teachers) or '(none given)'}"
            why = "; ".join(f"{e}: {t.describe(now)}" for e, t in list(self._teachers.items())[:5]) or None
        return f"waiting for {where}: {what}" + (f". {why}" if why else "")

    def _waiting_log_locked(self, now: float) -> None:
        """Dispatcher tick: while batches wait and no teacher is ready, say so (after 1 s, then every 5 s)."""
        state = self._membership
        if now - self._stall_since < _FIRST_WAITING_LOG_S or not self._live:  # answers flow: nothing to say
            state.waiting_log_at = None
            return
        if any(t.breaker.state == CLOSED for t in self._teachers.values()):
            return  # teachers are there, only slow: hedging and timeouts deal with that
        if state.waiting_log_at is None:
            state.waiting_log_at = now
        if now < state.waiting_log_at:
            return
        state.waiting_log_at = now + _WAITING_LOG_S
        logger.warning("%s", self._waiting_line_locked(
            now, f"{len(self._live)} batch(es) waiting, no teacher ready for {now - self._stall_since:.0f} s "
                 f"(they fail after wait_timeout_s={self._config.wait_timeout_s:g} s)"))

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
        extra = self._follower.explain(bool(self._teachers)) if self._follower is not None else None
        if extra and not self._teachers:  # the registry's explanation carries its own advice
            return f"{what}; teachers: {where}. {extra}"
        message = f"{what}; teachers: {where}. What to do: {hint}."
        return f"{message} {extra}" if extra else message

    def _expire_locked(self, now: float, work: Work) -> None:
        """Fail everything waiting if no teacher has answered for wait_timeout_s."""
        waited = now - self._stall_since
        if not self._live or waited < self._config.wait_timeout_s:
            self._waiting_log_locked(now)
            return
        endpoints = {e: t.describe(now) for e, t in self._teachers.items()}
        where = self._follower.waiting_for if self._follower is not None else "teachers"
        message = self._no_teacher_message_locked(
            now, f"gave up waiting for {where}: no teacher answered for {waited:.1f} s "
                 f"(wait_timeout_s={self._config.wait_timeout_s:g}) while {len(self._live)} batch(es) waited")
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
