"""Health probes: a teacher is used only once it answers the standard gRPC health check.

A registry tells students where to send their data, so an endpoint it names
is not trusted until it proves itself (SECURITY.md, "Registry trust"): a
``grpc.health.v1.Health/Check`` for the teacher service
(``edistill.v1.Teacher``), sent on the teacher's own channel (so with the same
TLS verification and token as real calls), must answer SERVING within
``PoolConfig.probe_timeout_s``. Until then the pool sends it no batch.

* A closed port fails at once (UNAVAILABLE); a listener that never speaks
  HTTP/2 (or a blackholed address) costs one probe timeout
  (DEADLINE_EXCEEDED); a certificate from the wrong CA or with the wrong name
  fails the TLS handshake (UNAVAILABLE); a gRPC server that is not a teacher
  answers NOT_FOUND; a draining teacher answers NOT_SERVING.
* A failed probe is retried after the circuit breaker's jittered
  exponential backoff (:attr:`PoolConfig.backoff`), from the pool's
  dispatcher thread. Probes are gRPC futures: they never block the caller of
  ``set_endpoints`` nor the request path.

The probe's transport is a seam like the Predict stub: ``health_factory(channel)``
returns an object whose ``Check.future(HealthCheckRequest, timeout=s)``
returns a ``grpc.Future`` resolving to a ``HealthCheckResponse``; unit tests
inject a fake.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable

from .breaker import UNVERIFIED
from .status import code_and_details

__all__ = ["HealthFactory", "HealthProber", "PROBE_SERVICE", "default_health_factory", "probe_outcome",
           "probe_request"]

#: The health-check service name every teacher sets SERVING once it serves
#: (teacher_server.server.SERVICE_NAME); a generic gRPC server answers NOT_FOUND.
PROBE_SERVICE = "edistill.v1.Teacher"

#: ``health_factory(channel) -> stub`` with ``stub.Check.future(request, timeout=s)``.
HealthFactory = Callable[[Any], Any]


def default_health_factory(channel):
    """The generated ``grpc.health.v1`` stub on the teacher's channel."""
    from grpc_health.v1 import health_pb2_grpc

    return health_pb2_grpc.HealthStub(channel)


def probe_request():
    """The Check request sent to every new teacher."""
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest(service=PROBE_SERVICE)


def probe_outcome(call) -> tuple[bool, str]:
    """``(serving, reason)`` for a finished Check call; ``reason`` names why it failed."""
    if call.cancelled():
        return False, "CANCELLED: health check cancelled"
    exc = call.exception()
    if exc is not None:
        name, text = code_and_details(exc, default=type(exc).__name__)
        return False, f"{name}: {text or 'no details'}"
    from grpc_health.v1 import health_pb2

    status = call.result().status
    if status == health_pb2.HealthCheckResponse.SERVING:
        return True, "SERVING"
    return False, f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"


class _BrokenHealth:
    """Stands in for a health stub that could not be built: every Check fails, saying why."""

    def __init__(self, exc: Exception) -> None:
        self.Check = self
        self._exc = exc

    def future(self, request, timeout=None):
        raise RuntimeError(f"cannot health-check this channel ({self._exc}); pass health_factory= or "
                           "PoolConfig(probe_timeout_s=None)") from self._exc


class HealthProber:
    """Sends the health checks of a pool's teachers and reports each outcome.

    Args:
        factory: ``channel -> stub`` (default: the generated HealthStub).
        timeout_s: deadline of each check; None disables checking (teachers
            are then trusted as soon as they are added).
        on_result: ``(teacher, serving, reason)``, called from a gRPC callback
            thread (or the caller's, when a check cannot even be sent); the
            pool updates the teacher's breaker there.
    """

    def __init__(self, factory: HealthFactory | None, timeout_s: float | None,
                 on_result: Callable[[Any, bool, str], None]) -> None:
        self._factory = factory or default_health_factory
        self._timeout_s = timeout_s
        self._request = probe_request() if timeout_s is not None else None
        self._on_result = on_result

    @property
    def enabled(self) -> bool:
        return self._timeout_s is not None

    def stub(self, channel):
        """The health stub of a new teacher's channel (None when checks are off)."""
        if not self.enabled:
            return None
        try:
            return self._factory(channel)
        except Exception as exc:  # e.g. a custom channel without unary_unary: every probe fails, clearly
            return _BrokenHealth(exc)

    @staticmethod
    def due_locked(teachers: Iterable, now: float) -> list:
        """Unverified teachers whose next check is due, marked as probing (under the pool's lock)."""
        due = []
        for t in teachers:
            if t.breaker.state == UNVERIFIED and not t.probing and t.health is not None \
                    and t.breaker.health_check_due(now):
                t.probing = True
                due.append(t)
        return due

    def start(self, teachers: Iterable) -> None:
        """Send a check to each teacher; never called with the pool's lock held."""
        for t in teachers:
            try:
                call = t.health.Check.future(self._request, timeout=self._timeout_s)
            except Exception as exc:  # e.g. the channel was closed by a concurrent removal
                self._on_result(t, False, f"{type(exc).__name__}: {exc}")
                continue
            call.add_done_callback(partial(self._done, t))

    def _done(self, t, call) -> None:
        try:
            ok, reason = probe_outcome(call)
        except Exception as e:  # a response we cannot read is a failed check
            ok, reason = False, f"unreadable health answer: {e}"
        self._on_result(t, ok, reason)
