"""What a failed teacher call means: the one place gRPC status codes are classified.

Every transport (gRPC, the same-host socket) and the health probe report
failures as exceptions shaped like ``grpc.RpcError`` (``code()``,
``details()``); :func:`code_and_details` reads them and :func:`classify`
decides what the pool does:

* ``"retry"`` — teacher trouble, re-sent elsewhere and counted against the
  teacher's breaker: UNAVAILABLE (down, restarting, unreachable),
  DEADLINE_EXCEEDED (hung or overloaded), RESOURCE_EXHAUSTED (its queue is
  full), ABORTED, CANCELLED by the server (e.g. it is shutting down), and any
  code not listed below.
* ``"server_error"`` — maybe the batch's fault: INTERNAL and UNKNOWN (a crash
  in the model or the server) are re-sent to another teacher, at most
  ``PoolConfig.max_server_error_attempts`` times per batch, then surface as
  TeacherRequestError, so a batch that crashes every teacher is not retried
  forever.
* ``"fatal"`` — the user's fault, never retried, surfaced at once with the
  teacher's message: INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE,
  NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, UNAUTHENTICATED,
  UNIMPLEMENTED, DATA_LOSS.
"""

from __future__ import annotations

__all__ = ["FATAL", "SERVER_ERROR", "classify", "code_and_details"]

FATAL = frozenset({
    "INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED", "DATA_LOSS",
})
SERVER_ERROR = frozenset({"INTERNAL", "UNKNOWN"})


def classify(code_name: str) -> str:
    """``"fatal"``, ``"server_error"`` or ``"retry"`` for a gRPC status code name."""
    if code_name in FATAL:
        return "fatal"
    if code_name in SERVER_ERROR:
        return "server_error"
    return "retry"


def code_and_details(exc: BaseException, *, default: str = "UNKNOWN") -> tuple[str, str]:
    """Status code name and message of a gRPC-shaped error.

    Any other exception gives ``default`` (pass ``type(exc).__name__`` to name
    it instead) and ``str(exc)``; this never raises.
    """
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    try:
        name = code().name if callable(code) else default
    except Exception:  # a non-grpc exception with an odd code attribute
        name = default
    try:
        text = details() if callable(details) else str(exc)
    except Exception:
        text = str(exc)
    return name, (text or "")
