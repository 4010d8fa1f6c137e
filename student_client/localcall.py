"""A call over the same-host transport: the future-like object the pool waits on.

:class:`LocalCall` has the part of the ``grpc.Future`` surface the pool's
scheduler uses; :class:`LocalRpcError` is shaped like ``grpc.RpcError``, so
:mod:`student_client.status` classifies local failures exactly like gRPC
ones. See :mod:`student_client.local` for the transport itself.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

import grpc

from protos.localwire import STATUS_NAMES

if TYPE_CHECKING:
    from .staging import Stager, Staging

__all__ = ["CODES", "LocalCall", "LocalRpcError"]

logger = logging.getLogger(__name__)


class LocalRpcError(Exception):
    """A failed local call, shaped like ``grpc.RpcError`` (``code()``, ``details()``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


#: status code number on the wire -> grpc.StatusCode (numbers from protos.localwire)
CODES = {n: grpc.StatusCode[name] for n, name in STATUS_NAMES.items()}


_CALL_LOCK = threading.Lock()  # state changes of every LocalCall (held for a few bytecodes)


class LocalCall:
    """One local Predict call, with the part of the ``grpc.Future`` surface the pool uses.

    ``add_done_callback``, ``cancel``, ``cancelled``, ``done``, ``result`` and
    ``exception`` (the last two only once done: the pool calls them from the
    done-callback), plus ``outcome`` (result, exception and cancelled in one
    call). Lighter than a ``concurrent.futures.Future`` (no condition
    variable per call), since nothing ever blocks on it. It also holds what
    must outlive the call: the input tensors whose memory the teacher reads.
    """

    __slots__ = ("call_id", "deadline", "_keep", "_state", "_result", "_exc", "_callbacks", "_staging",
                 "_stager")

    def __init__(self, call_id: int, deadline: float | None, keep: Any, staging: "Staging | None" = None,
                 stager: "Stager | None" = None, on_done: Callable[["LocalCall"], None] | None = None) -> None:
        self.call_id = call_id
        self.deadline = deadline
        self._keep = keep
        self._staging, self._stager = staging, stager
        self._state = 0  # 0 pending, 1 done, 2 cancelled
        self._result = None
        self._exc: BaseException | None = None
        self._callbacks: list = [] if on_done is None else [on_done]

    def done(self) -> bool:
        return self._state != 0

    def cancelled(self) -> bool:
        return self._state == 2

    def result(self, timeout: float | None = None):
        if self._state == 0:
            raise RuntimeError("LocalCall.result() before the call finished (the pool only reads it when done)")
        if self._state == 2:
            raise concurrent.futures.CancelledError()
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == 0:
            raise RuntimeError("LocalCall.exception() before the call finished")
        if self._state == 2:
            raise concurrent.futures.CancelledError()
        return self._exc

    def outcome(self) -> tuple[Any, BaseException | None, bool]:
        """``(result, exception, cancelled)`` of a finished call, in one call."""
        if self._state == 0:
            raise RuntimeError("LocalCall.outcome() before the call finished")
        return self._result, self._exc, self._state == 2

    def add_done_callback(self, fn: Callable[["LocalCall"], None]) -> None:
        with _CALL_LOCK:
            if self._state == 0:
                self._callbacks.append(fn)
                return
        fn(self)

    def cancel(self) -> bool:
        return self._finish(2, None, None)

    def _settle(self, result=None, exc: BaseException | None = None) -> None:
        self._finish(1, result, exc)

    def _finish(self, state: int, result, exc: BaseException | None) -> bool:
        with _CALL_LOCK:
            if self._state != 0:
                return False
            self._state, self._result, self._exc = state, result, exc
            callbacks, self._callbacks = self._callbacks, []
            staging, self._staging = self._staging, None
        self._keep = None
        if staging is not None:
            self._stager.give(staging)
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # like concurrent.futures: a failing callback must not stop the others
                logger.exception("a local call's done-callback failed")
        return True
