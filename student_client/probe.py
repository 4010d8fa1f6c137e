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

from typing import Any, Callable

__all__ = ["HealthFactory", "PROBE_SERVICE", "default_health_factory", "probe_request", "probe_outcome"]

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
        code = getattr(exc, "code", None)
        details = getattr(exc, "details", None)
        try:
            name = code().name if callable(code) else type(exc).__name__
            text = details() if callable(details) else str(exc)
        except Exception:  # an odd exception type from a custom transport
            name, text = type(exc).__name__, str(exc)
        return False, f"{name}: {text or 'no details'}"
    from grpc_health.v1 import health_pb2

    status = call.result().status
    if status == health_pb2.HealthCheckResponse.SERVING:
        return True, "SERVING"
    return False, f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
