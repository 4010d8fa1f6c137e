"""The futures a teacher pool returns, and how waiting on them reads same-host answers.

Answers over the local transport (:mod:`student_client.local`) have no
receiver thread: the thread that waits for a batch reads them itself
(:func:`wait_local`, pumping the pool's :class:`~student_client.local.LocalHub`),
which saves a thread wakeup and a GIL handoff per batch. A thread that
settles a future outside the pump (a gRPC answer, a cancel) calls
:func:`wake_reader`, which writes the hub's pipe only while a reader is
blocked in its poll().
"""

from __future__ import annotations

import concurrent.futures
import time
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import TeacherPool

__all__ = ["PoolFuture", "settle", "wait_local", "wake_reader"]

_DONE_STATES = frozenset({"CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"})  # concurrent.futures' states


class PoolFuture(Future):
    """The future ``submit`` returns: waiting on it also reads same-host teachers' answers.

    Answers over the local transport are read by the waiting thread itself
    (:class:`~student_client.local.LocalHub`), so ``result()`` and
    ``exception()`` pump the pool's hub while this future is not done. A
    done-callback added to a pending future makes the pool's dispatcher read
    answers as they arrive until it is done (a composite source chains on
    it). ``done()`` and the result of a finished future skip the condition
    variable (one attribute read); cancelling withdraws the batch from the pool.
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
            timeout = wait_local(self._pool._localsetup.hub, self, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None):
        if self._state not in _DONE_STATES:
            timeout = wait_local(self._pool._localsetup.hub, self, timeout)
        return super().exception(timeout)

    def add_done_callback(self, fn) -> None:
        if self._state not in _DONE_STATES:
            self._pool._watch(self)
        super().add_done_callback(fn)

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._pool._on_cancel(self._seq)
        return True


def wait_local(hub, fut: Future, timeout: float | None) -> float | None:
    """Pump the local hub until ``fut`` is done or ``timeout`` passes; return the time left.

    Without same-host teachers this returns at once (the future is then
    settled by gRPC's callback thread). A gRPC answer that settles a future
    while this thread is in poll() wakes it (:func:`wake_reader`).
    """
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


def wake_reader(hub) -> None:
    """After settling a future outside the hub's pump: wake a thread blocked in its poll()."""
    if hub is not None and hub.selecting:
        hub.wake()


def settle(fut: Future, result=None, exc: BaseException | None = None) -> bool:
    """Resolve ``fut`` with ``exc`` or ``result``; False if it was already done (e.g. cancelled)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        return False
    return True
