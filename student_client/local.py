"""Same-host transport: Predict over the teacher's Unix socket, tensors in shared memory.

Why: on a small machine a gRPC call costs the student about 1-3 ms of CPU
(several thread handoffs inside grpcio plus copying the batch into the
message), which a training loop pays on every step. A teacher on the same
machine (``DescribeResponse.local_socket`` set and ``host_id`` equal to ours)
also listens on a Unix socket (``protos/edistill/v1/local.proto``). Here the
request is a small frame, and the batch itself is not sent at all: the
student passes the file descriptor of the shared memory that holds it, and
the teacher maps it read-only.

* A tensor a DataLoader worker produced already lives in shared memory
  (PyTorch's ``file_descriptor`` sharing strategy): its storage's descriptor
  is passed as is, zero copies.
* Any other tensor or array is copied once into a reusable ``memfd``
  staging buffer (:class:`~student_client.staging.Stager`), whose descriptor is passed instead.

Answers are read by whichever thread pumps the pool's :class:`LocalHub`:
the training loop while it waits for a batch, and the pool's dispatcher on
every tick (there is no receiver thread, whose wakeup and GIL handoff would
cost as much again per batch). The pump completes calls, fails the calls of
a connection that breaks with UNAVAILABLE and expires calls past their
deadline with DEADLINE_EXCEEDED, so the pool treats local calls exactly like
gRPC ones. Calls are :class:`LocalCall` futures with the ``grpc.Future``
surface the pool uses.

Linux only (memfd, SCM_RIGHTS, SO_PEERCRED on the teacher); elsewhere
:func:`available` is False and the pool keeps to gRPC.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time
from functools import partial
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from protos.edistill.v1 import local_pb2 as lpb
from protos.localwire import MAX_FDS_PER_FRAME, PROTOCOL_VERSION, FrameBuffer, FrameError, encode_frame, host_id

from .localcall import CODES, LocalCall, LocalRpcError
from .staging import Stager, shared_fd, stage
from .wire import as_wire_array, torch_wire_dtype

__all__ = ["LocalCall", "LocalConnection", "LocalHub", "LocalRpcError", "available", "same_host"]

logger = logging.getLogger(__name__)

_RECV_BYTES = 1 << 20


def available() -> bool:
    """Whether this platform has what the local transport needs (Linux: memfd, SCM_RIGHTS)."""
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


_HOST_ID: str | None = None


def same_host(teacher_host_id: str) -> bool:
    """True if a teacher reporting ``teacher_host_id`` runs on this machine."""
    global _HOST_ID
    if _HOST_ID is None:
        _HOST_ID = host_id()
    return bool(teacher_host_id) and teacher_host_id == _HOST_ID


def _outcome(on_done: Callable[[Any, BaseException | None, bool], None], call: LocalCall) -> None:
    on_done(*call.outcome())


class LocalConnection:
    """One connection to one teacher's local socket (made by :meth:`LocalHub.connect`).

    It is a transport of the pool (:mod:`student_client.transports`):
    :meth:`start` sends one attempt of a pool request.
    """

    kind = "local"

    def __init__(self, hub: "LocalHub", sock: socket.socket, path: str, teacher_id: str,
                 max_frame_bytes: int, outputs_blob: bytes = b"") -> None:
        self._hub = hub
        self._outputs_blob = outputs_blob
        self.sock = sock
        self.path = path
        self.teacher_id = teacher_id
        self._frames = FrameBuffer(max_frame_bytes)
        self._pending: dict[int, LocalCall] = {}
        self._lock = threading.Lock()  # _pending, _next_id, closed
        self._send_lock = threading.Lock()  # whole frames, one sender at a time
        self._next_id = 1
        self.closed = False
        self.close_reason = ""

    def __repr__(self) -> str:
        return f"LocalConnection({self.path!r}, teacher_id={self.teacher_id!r}, closed={self.closed})"

    def start(self, r, timeout_s: float | None,
              on_done: Callable[[Any, BaseException | None, bool], None]) -> LocalCall:
        """Send one attempt of the pool request ``r``; ``on_done(response, exception, cancelled)``."""
        return self.predict(r.request_id, list(r.inputs.items()), self._outputs_blob, timeout_s,
                            partial(_outcome, on_done))

    def predict(self, request_id: str, inputs: Sequence[tuple[str, Any]], outputs_blob: bytes,
                timeout_s: float | None, on_done: Callable[[LocalCall], None] | None = None) -> LocalCall:
        """Send one request; the returned call resolves to a ``PredictResponse``.

        ``inputs`` are ``(name, tensor or ndarray)``; ``outputs_blob`` is the
        serialized ``LocalRequest`` field 4 (``repeated OutputRequest``).
        ``on_done`` is the call's first done-callback, registered before the
        request is sent. Never raises for a transport problem: the call fails
        instead.

        Raises:
            protos.codec.CodecError: an input of a dtype the wire cannot carry.
        """
        specs: list = []
        fds: list[int] = []
        staging = None
        copies: list[tuple[int, np.ndarray]] = []
        for name, value in inputs:
            wire = torch_wire_dtype(value)
            shared = shared_fd(value) if wire is not None else None
            if shared is not None:  # zero copy: the teacher maps this very memory
                fd, offset = shared
                if fd not in fds:
                    fds.append(fd)
                specs.append(lpb.SharedTensor(name=name, dtype=wire, shape=value.shape, fd_index=fds.index(fd),
                                              offset=offset))
            else:
                arr, wire = as_wire_array(value)
                copies.append((len(specs), arr))
                specs.append(lpb.SharedTensor(name=name, dtype=wire, shape=arr.shape))
        try:
            if copies:
                staging, offsets = stage(self._hub._stager, [a for _, a in copies])
                fds.append(staging.fd)
                for (i, _), off in zip(copies, offsets):
                    specs[i].fd_index, specs[i].offset = len(fds) - 1, off
            if len(fds) > MAX_FDS_PER_FRAME:
                raise ValueError(f"{len(fds)} shared buffers in one request; at most {MAX_FDS_PER_FRAME}")
            deadline = time.monotonic() + timeout_s if timeout_s else None
            with self._lock:
                call = LocalCall(self._next_id, deadline, inputs, staging, self._hub._stager, on_done)
                staging = None  # the call gives it back when it is over
                self._next_id += 1
                if not self.closed:
                    self._pending[call.call_id] = call
            if self.closed:
                call._settle(exc=LocalRpcError(grpc.StatusCode.UNAVAILABLE, self._closed_text()))
                return call
            msg = lpb.LocalRequest(call_id=call.call_id, request_id=request_id, inputs=specs, fd_count=len(fds),
                                   timeout_s=timeout_s or 0.0)
            frame = encode_frame(msg.SerializeToString() + outputs_blob)
            try:
                with self._send_lock:
                    sent = socket.send_fds(self.sock, (frame,), fds)
                    if sent < len(frame):
                        self.sock.sendall(memoryview(frame)[sent:])
            except OSError as exc:
                _settle_all(self._fail_all(f"sending to teacher {self.teacher_id} over {self.path} failed: {exc}"))
            return call
        finally:
            if staging is not None:  # failed before the call owned it
                self._hub._stager.give(staging)

    def _closed_text(self) -> str:
        return f"local connection to teacher {self.teacher_id} ({self.path}) is closed: {self.close_reason}"

    # reading (in whichever thread pumps the hub) -------------------------

    def _read(self, done: list) -> None:
        """Read what arrived; append ``(call, response, exception)`` settlements to ``done``."""
        try:
            n = self.sock.recv_into(self._hub._rbuf, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            done += self._fail_all(f"reading from teacher {self.teacher_id} over {self.path} failed: {exc}")
            return
        if not n:
            done += self._fail_all(f"teacher {self.teacher_id} closed its local socket {self.path} "
                                   "(it stopped or restarted)")
            return
        try:
            for frame in self._frames.split(self._hub._rview[:n]):
                reply = lpb.LocalReply.FromString(frame)
                with self._lock:
                    call = self._pending.pop(reply.call_id, None)
                if call is None:
                    continue  # expired or cancelled earlier
                if reply.code == 0:
                    done.append((call, reply.response, None))
                else:
                    code = CODES.get(reply.code, grpc.StatusCode.UNKNOWN)
                    done.append((call, None, LocalRpcError(code, reply.details)))
        except Exception as exc:  # FrameError, DecodeError: the stream is no longer trustworthy
            done += self._fail_all(f"teacher {self.teacher_id} sent an unreadable local frame ({exc})")

    def _expire(self, now: float, done: list) -> None:
        """Fail calls past their deadline (appended to ``done``); forget cancelled ones."""
        with self._lock:
            for cid, call in list(self._pending.items()):
                if call.done():  # cancelled by the pool: forget it
                    del self._pending[cid]
                elif call.deadline is not None and call.deadline <= now:
                    del self._pending[cid]
                    done.append((call, None, LocalRpcError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no answer from teacher {self.teacher_id} within the deadline")))

    def _fail_all(self, reason: str) -> list:
        """Mark the connection closed; the settlements failing its unfinished calls (UNAVAILABLE)."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self.close_reason = reason
                logger.info("%s", reason)
            calls, self._pending = list(self._pending.values()), {}
        self._hub._forget(self)
        err = LocalRpcError(grpc.StatusCode.UNAVAILABLE, reason)
        return [(call, None, err) for call in calls]

    def close(self, reason: str = "closed by the student") -> None:
        """Close the connection; unfinished calls fail with UNAVAILABLE."""
        _settle_all(self._fail_all(reason))


def _settle_all(done: list) -> None:
    for call, result, exc in done:
        call._finish(1, result, exc)


class LocalHub:
    """Connections to same-host teachers, and the pump that reads their answers.

    There is no receiver thread: answers are read by whichever thread calls
    :meth:`pump`, which is the thread waiting for a batch (the pool's futures
    pump in ``result()``, see :class:`~student_client.pool.TeacherPool`) and
    the pool's dispatcher on every tick. A waiting training loop is thus woken
    directly by the teacher's answer (one thread wakeup per batch, or none
    when the answer came during the training step), where a receiver thread
    would cost a second wakeup and a GIL handoff per batch. One thread reads
    at a time (``_role``); done-callbacks run after it is released, so a
    callback may itself wait on another batch.
    """

    _PUMP_SLICE_S = 0.05  # longest single poll(); waiters re-check their future in between
    _EXPIRE_EVERY_S = 0.05  # how often a pump checks call deadlines

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._by_fd: dict[int, LocalConnection] = {}  # the open connections, by socket descriptor
        self._lock = threading.Lock()
        self._role = threading.Lock()  # held by the one thread reading the sockets
        self._stager = Stager()
        self._rbuf = bytearray(_RECV_BYTES)
        self._rview = memoryview(self._rbuf)
        self._closed = False
        self._next_expiry = 0.0
        #: True while the reading thread may be blocked in poll(): a thread that settles a
        #: future the reader may be waiting for (a gRPC answer) must then :meth:`wake` it.
        self.selecting = False

    @property
    def connections(self) -> int:
        return len(self._by_fd)

    def connect(self, path: str, *, teacher_id: str, token: str | None, timeout_s: float,
                max_frame_bytes: int, outputs_blob: bytes = b"") -> LocalConnection:
        """Connect and handshake; raises ``OSError``/``ConnectionError`` saying what failed."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(encode_frame(lpb.LocalHello(version=PROTOCOL_VERSION, token=token or "")
                                      .SerializeToString()))
            frames = FrameBuffer(64 * 1024)
            welcome = None
            while welcome is None:
                data = sock.recv(64 * 1024)
                if not data:
                    raise ConnectionError(f"teacher closed {path} during the handshake")
                frames.feed(data)
                for frame in frames.frames():
                    welcome = lpb.LocalWelcome.FromString(frame)
                    break
            if welcome.code:
                name = CODES.get(welcome.code, grpc.StatusCode.UNKNOWN).name
                raise ConnectionError(f"teacher refused the local connection on {path}: {name}: {welcome.details}")
            if welcome.teacher_id != teacher_id:
                raise ConnectionError(f"{path} is teacher {welcome.teacher_id!r}, not {teacher_id!r} "
                                      "(the one that answered over gRPC)")
            sock.settimeout(None)
            conn = LocalConnection(self, sock, path, teacher_id, max_frame_bytes, outputs_blob)
        except (OSError, FrameError, ValueError) as exc:
            sock.close()
            if isinstance(exc, (ConnectionError, FrameError)):
                raise ConnectionError(str(exc)) from None
            raise
        except BaseException:
            sock.close()
            raise
        with self._lock:
            if self._closed:
                sock.close()
                raise ConnectionError("the teacher pool is closed")
            self._by_fd[sock.fileno()] = conn
            self._ep.register(sock.fileno(), select.EPOLLIN)
        return conn

    def _forget(self, conn: LocalConnection) -> None:
        with self._lock:
            fd = conn.sock.fileno()  # -1 once closed (below, only here)
            if fd < 0 or self._by_fd.get(fd) is not conn:
                return
            del self._by_fd[fd]
            try:
                self._ep.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass
            try:  # closed under the hub's lock: its descriptor number cannot be reused by a
                conn.sock.close()  # new connection while it is still mapped to this one
            except OSError:
                pass

    def wake(self) -> None:
        """Make a pump that is blocked in poll() return (e.g. a gRPC answer settled its future)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # already woken (pipe full) or closing

    def pump(self, timeout_s: float, *, until: Callable[[], bool] | None = None) -> bool:
        """Read and settle answers for up to ``timeout_s`` (0: only what already arrived).

        Returns once answers were read and settled, once ``until()`` is true
        (checked before each wait), or after the timeout. Returns False at
        once if another thread is reading (its answers settle the futures),
        True otherwise.
        """
        if not self._role.acquire(blocking=False):
            return False
        done: list = []
        try:
            if self._closed:
                return True
            by_fd = self._by_fd
            deadline = time.monotonic() + timeout_s
            while True:
                now = time.monotonic()
                if now >= self._next_expiry:
                    self._next_expiry = now + self._EXPIRE_EVERY_S
                    for c in list(self._by_fd.values()):
                        c._expire(now, done)
                    if done:
                        break
                remaining = deadline - now
                self.selecting = True  # before until(): a settle after that check wakes us
                if until is not None and until():
                    break
                try:
                    events = self._ep.poll(min(max(remaining, 0.0), self._PUMP_SLICE_S))  # < 0 blocks forever
                except (OSError, ValueError):  # closed under us
                    return True
                finally:
                    self.selecting = False
                for fd, _ in events:
                    conn = by_fd.get(fd)
                    if conn is not None:
                        conn._read(done)
                    elif fd == self._wake_r:
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except OSError:
                            pass
                if done or events or remaining <= 0:
                    break
        finally:
            self.selecting = False
            self._role.release()
            _settle_all(done)
        return True

    def close(self) -> None:
        """Close every connection (their calls fail UNAVAILABLE). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._by_fd.values())
        for c in conns:
            c.close("the teacher pool is closing")
        self.wake()
        self._stager.close()
        with self._role:  # no pump is inside poll() any more
            self._ep.close()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
