"""What the teacher pool does when an attempt ends (a mixin of :class:`~student_client.pool.TeacherPool`).

Success: the request is settled once and its answer decoded outside the
lock; a hedged twin is withdrawn, the slower of the two counted as a
``HEDGED`` failure of its teacher. Failure: :mod:`student_client.status`
decides whether the teacher or the batch is to blame; the batch is re-sent
elsewhere, or settled with a :class:`~student_client.errors.TeacherRequestError`.
The concurrency rules are the pool's (:mod:`student_client.pool`).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

from protos.edistill.v1 import teacher_pb2 as pb

from ._poolstate import Attempt, Request, Teacher, Work
from .breaker import CLOSED
from .errors import StudentError, TeacherRequestError, TeacherResponseError
from .futures import settle, wake_reader
from .outputs import decode_response
from .status import classify, code_and_details

__all__ = ["OutcomeMixin"]

logger = logging.getLogger("student_client.pool")


class OutcomeMixin:
    """Attempt outcomes: ``_finish`` is every transport's ``on_done``."""

    def _finish(self, a: Attempt, resp, exc: BaseException | None, cancelled: bool) -> None:
        """A transport's ``on_done``: one attempt has an outcome (any thread)."""
        now = time.monotonic()
        work = Work()
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
                    self._ready.notify_all()
                local_setup = (self._local_enabled and (t.local is None or t.local.closed)
                               and self._localsetup.due_locked(t, now))
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
                self._failed_locked(a, exc, cancelled, now, work)
            if self._queue:
                self._assign_locked(now, work)
        self._do(work)
        if decode:
            self._deliver(r, resp, t.endpoint)
            if local_setup:
                self._localsetup.start(t)

    def _failed_locked(self, a: Attempt, exc: BaseException | None, cancelled: bool, now: float,
                       work: Work) -> None:
        """Attempt ``a`` failed: blame the teacher or the batch (:mod:`.status`), re-send or settle."""
        t, r = a.teacher, a.request
        code, details = ("CANCELLED", "cancelled") if cancelled else code_and_details(exc)
        t.failures[code] += 1
        t.last_error, t.last_error_at = f"{code}: {details}", now
        kind = classify(code)
        if kind == "fatal":
            # The teacher is alive and answered: not its failure.
            if a.probe:
                t.breaker.on_success()
            self._stall_since = now
            self._settle_locked(r, None, self._request_error(
                f"teacher {t.endpoint} rejected batch {r.batch_id} with {code}: {details}"
                f"{self._input_advice_locked(r, code)}", code, details, t, r, exc), work)
            for other in list(r.inflight):
                self._abandon_locked(other, work)
            return
        t.breaker.on_failure(now, probe=a.probe)
        logger.warning("teacher %s failed batch %s with %s: %s; re-sending it", t.endpoint, r.batch_id, code,
                       details)
        if kind == "server_error":
            r.server_errors += 1
            if r.server_errors >= self._config.max_server_error_attempts:
                self._settle_locked(r, None, self._request_error(
                    f"batch {r.batch_id} failed with a teacher-side error {r.server_errors} times "
                    f"(last: teacher {t.endpoint}, {code}: {details}); the batch may crash the "
                    "teacher model, see the teacher's log", code, details, t, r, exc), work)
                for other in list(r.inflight):
                    self._abandon_locked(other, work)
                return
        r.failed_on.add(t.endpoint)
        t.failovers += 1
        if r.inflight or r.settled:  # its other attempt (hedge) still runs: wait for that
            r.hedged = False  # the next dispatcher tick may hedge it again elsewhere
        else:
            self._requeue_locked(r)
            self._kick_locked()

    @staticmethod
    def _request_error(message: str, code: str, details: str, t: Teacher, r: Request,
                       exc: BaseException | None) -> TeacherRequestError:
        err = TeacherRequestError(message, code=code, details=details, endpoint=t.endpoint, batch_id=r.batch_id)
        err.__cause__ = exc  # the grpc.RpcError, as `raise ... from exc` would
        return err

    def _deliver(self, r: Request, resp: pb.PredictResponse, endpoint: str) -> None:
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
        settle(fut, result, exc)
        wake_reader(self._localsetup.hub)

    def _drop_siblings_locked(self, r: Request, winner: Attempt, now: float, work: Work) -> None:
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
