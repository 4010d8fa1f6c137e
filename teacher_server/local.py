"""Teacher side of the same-host transport (``protos/edistill/v1/local.proto``).

A student on the same machine can skip gRPC: it connects to the teacher's
Unix stream socket, sends a ``LocalHello``, then ``LocalRequest`` frames
whose tensor bytes stay in shared memory -- it passes the descriptors with
SCM_RIGHTS and the teacher maps them read-only, so no tensor byte is copied
through a socket. Answers are ``LocalReply`` frames holding the very
``PredictResponse`` the gRPC path gives (both paths run
:meth:`TeacherServicer.predict <teacher_server.servicer.TeacherServicer.predict>`),
in completion order.

:class:`LocalListener` runs on the server's asyncio loop. asyncio streams
cannot receive descriptors, so it drives non-blocking sockets itself:
``loop.add_reader`` + ``recvmsg`` in, a per-connection write buffer flushed
with ``sendmsg`` (``loop.add_writer`` when the socket is full) out. Nothing
here ever blocks the loop, and a reply is always queued whole, so frames
never interleave.

Who may connect (SECURITY.md, "Same-host transport"): the socket file is
0600 in a 0700 directory of the teacher's user; every accepted connection's
peer uid (SO_PEERCRED) must be the teacher's; with tokens configured,
``LocalHello.token`` is checked by the same :class:`~teacher_server.auth.TokenSet`
as the gRPC metadata.

Per connection (:mod:`teacher_server.localconn`): a ``LocalHello`` within :data:`HELLO_TIMEOUT_S`, then at most
``max_queued_per_peer`` requests in flight (RESOURCE_EXHAUSTED beyond it, as
on gRPC). A frame that is not a valid message, is over
``max_message_bytes``, or whose descriptors do not match its ``fd_count``
ends that connection only (one log line); the server keeps serving. A
connection that closes cancels its queued work (like a gRPC client going
away). Every received descriptor is closed: at once when unused, right after
``mmap`` otherwise.

Memory lifetime (:mod:`teacher_server.localinputs`): an input tensor is a zero-copy ``torch.frombuffer`` view of
an ``mmap``; torch holds a reference to the ``mmap`` object (not a buffer
export), so the mapping lives exactly as long as some tensor still views it
-- the batcher's concatenated batch is a copy, and the last views die after
the forward pass. The code never calls ``mmap.close()``, which would unmap
under live views. Python's ``mmap`` keeps a duplicate of the descriptor while
mapped, so a queued request holds one descriptor per shared-memory input;
:meth:`LocalListener.start` raises the soft RLIMIT_NOFILE (to at most the
hard limit) so a full queue cannot run the process out of descriptors.

Modules: this one is the listener (accepting, serving requests, draining);
:mod:`teacher_server.localpaths` the socket's directory and path,
:mod:`teacher_server.localconn` one connection's protocol,
:mod:`teacher_server.localinputs` the shared-memory inputs, and
:mod:`protos.localwire` what both ends share (version, framing, status numbers).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import struct
from typing import TYPE_CHECKING

import grpc

from protos.edistill.v1 import local_pb2
from protos.localwire import MAX_FDS_PER_FRAME, PROTOCOL_VERSION
from teacher_server.config import TeacherConfig
from teacher_server.errors import ConfigError, InvalidRequest, RequestError
from teacher_server.localconn import Connection, reply_parts
from teacher_server.localinputs import SharedInputs, close_all
from teacher_server.localpaths import RUNTIME_DIR_ENV, claim_path, raise_fd_limit, resolve_socket_path, runtime_dir
from teacher_server.servicer import peer_limit_message

if TYPE_CHECKING:
    from teacher_server.auth import TokenSet
    from teacher_server.metrics import TeacherMetrics
    from teacher_server.servicer import TeacherServicer

# PROTOCOL_VERSION, RUNTIME_DIR_ENV, resolve_socket_path and runtime_dir are
# re-exported: this module is where the teacher's local transport is imported from.
__all__ = ["HELLO_TIMEOUT_S", "LOCAL_METHOD", "PROTOCOL_VERSION", "RUNTIME_DIR_ENV", "LocalListener",
           "resolve_socket_path", "runtime_dir"]

log = logging.getLogger(__name__)

#: Seconds a new connection has to send its ``LocalHello``.
HELLO_TIMEOUT_S = 5.0

#: ``method`` label of local requests in ``edistill_teacher_requests_total``.
LOCAL_METHOD = "LocalPredict"

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class LocalListener:
    """The teacher's Unix socket for same-host students (see the module docstring).

    Args:
        path: absolute socket path (see :func:`resolve_socket_path`).
        servicer: answers requests (:meth:`TeacherServicer.predict`); its
            config gives the limits (``max_message_bytes``,
            ``max_queued_per_peer``).
        tokens: the accepted tokens when the server requires one, else None.
        metrics: counts requests (method ``LocalPredict``) when given.
        hello_timeout_s: how long a new connection may take to say hello
            (default :data:`HELLO_TIMEOUT_S`, read when constructed).

    Use on the server's running loop: :meth:`start`, then :meth:`stop_accepting`
    and ``await`` :meth:`drain` on shutdown.
    """

    def __init__(self, path: str, servicer: "TeacherServicer", *, tokens: "TokenSet | None" = None,
                 metrics: "TeacherMetrics | None" = None, hello_timeout_s: float | None = None) -> None:
        self.path = path
        self.servicer = servicer
        self.config: TeacherConfig = servicer.config
        self.teacher_id = servicer.teacher_id
        self.tokens = tokens
        self.metrics = metrics
        self.hello_timeout_s = HELLO_TIMEOUT_S if hello_timeout_s is None else hello_timeout_s
        # Peers must run as this uid (SO_PEERCRED): the teacher's own. An attribute, like
        # hello_timeout_s, so a test can play "another user's student" without root.
        self.peer_uid = os.geteuid()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self._sock: socket.socket | None = None
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._conns: set[Connection] = set()
        self._accept_paused: asyncio.TimerHandle | None = None

    @property
    def connections(self) -> int:
        """Open student connections."""
        return len(self._conns)

    @property
    def in_flight(self) -> int:
        """Local requests received and not yet answered."""
        return sum(c.held for c in self._conns)

    def start(self) -> None:
        """Bind (0600), listen and accept on the running loop.

        Raises:
            ConfigError: the path is taken by a live server or by something
                that is not a socket, or cannot be bound.
        """
        self.loop = asyncio.get_running_loop()
        cfg = self.config
        raise_fd_limit(1024 + (cfg.max_queue_size + 2 * cfg.max_batch_size) * MAX_FDS_PER_FRAME)
        claim_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.setblocking(False)
            sock.bind(self.path)
            bound = True
            # Between bind and chmod the file has the umask's mode; the 0700
            # directory and the SO_PEERCRED check cover that window.
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._file_id = (st.st_dev, st.st_ino)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if bound:
                _unlink_quietly(self.path)
            raise ConfigError(f"cannot listen on local socket {self.path}: {exc.strerror or exc}; choose another "
                              "--local-socket path, or 'off'") from None
        self._sock = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)

    # ------------------------------------------------------------ accepting

    def _on_accept(self) -> None:
        assert self._sock is not None and self.loop is not None
        for _ in range(16):  # a few per wake-up, so a connect storm cannot starve the loop
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: back off instead of spinning on a readable socket
                log.warning("local socket %s: accept failed (%s); not accepting for 1 s", self.path, exc)
                self.loop.remove_reader(self._sock.fileno())
                self._accept_paused = self.loop.call_later(1.0, self._resume_accept)
                return
            self._on_connection(sock)

    def _resume_accept(self) -> None:
        self._accept_paused = None
        if self._sock is not None and self.loop is not None:
            self.loop.add_reader(self._sock.fileno(), self._on_accept)

    def _on_connection(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              _PEERCRED.size))
        except OSError as exc:
            log.debug("local socket: no peer credentials (%s); closing", exc)
            sock.close()
            return
        # SO_PEERCRED reports the peer's effective uid at connect(), which is
        # what file permissions were checked against: compare with ours.
        if uid != self.peer_uid:
            log.warning("local socket %s: refused pid %d running as uid %d (this teacher runs as uid %d)",
                        self.path, pid, uid, self.peer_uid)
            sock.close()
            return
        conn = Connection(self, sock, pid)
        self._conns.add(conn)
        conn.start()

    def forget(self, conn: Connection) -> None:
        """Called by a connection when it closes."""
        self._conns.discard(conn)

    # ------------------------------------------------------------- requests

    def on_request(self, conn: Connection, req: local_pb2.LocalRequest, fds: list[int]) -> None:
        """A complete LocalRequest and its descriptors (now ours): answer it or start serving it."""
        if self.draining:
            close_all(fds)
            self._answer(conn, req.call_id, grpc.StatusCode.UNAVAILABLE,
                         "teacher is shutting down; send the request to another teacher")
            return
        limit = self.config.max_queued_per_peer
        if conn.held >= limit:
            close_all(fds)
            self._answer(conn, req.call_id, grpc.StatusCode.RESOURCE_EXHAUSTED, peer_limit_message(conn.held, limit))
            return
        conn.held += 1
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        shared = SharedInputs(fds)
        task = self.loop.create_task(self._serve(conn, req, shared))
        conn.tasks.add(task)
        task.add_done_callback(lambda t: self._served(conn, t, shared))

    async def _serve(self, conn: Connection, req: local_pb2.LocalRequest, shared: SharedInputs) -> None:
        code, details, response = grpc.StatusCode.OK, "", None
        try:
            timeout = req.timeout_s
            if not (math.isfinite(timeout) and timeout >= 0):
                raise InvalidRequest(f"timeout_s must be a finite number of seconds >= 0 (0: no deadline), "
                                     f"got {timeout}")
            work = self.servicer.predict(req.request_id, req.inputs, req.outputs, decode=shared.decode,
                                         method=LOCAL_METHOD)
            if timeout > 0:
                # On expiry wait_for cancels the request's batcher future, so
                # work still queued is skipped (as grpc.aio does for Predict).
                try:
                    response = await asyncio.wait_for(work, timeout)
                except asyncio.TimeoutError:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    details = f"deadline of {timeout:g} s (LocalRequest.timeout_s) passed before the teacher answered"
            else:
                response = await work
        except RequestError as exc:
            code, details = exc.code, str(exc)
        except Exception as exc:  # a bug: answered like grpc.aio answers a handler that raised
            log.exception("LocalPredict %r failed", req.request_id[:64])
            code, details = grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}"
        finally:
            # Closes unmapped descriptors; tensors still viewing a mapping
            # (a batch the batcher has not dropped yet) keep it alive.
            shared.close()
        data = None
        if response is not None:
            data = response.SerializeToString()
            del response
        conn.held -= 1
        self._answer(conn, req.call_id, code, details, data, counted=True)

    def _served(self, conn: Connection, task: asyncio.Task, shared: SharedInputs) -> None:
        # A task cancelled before it first ran never entered _serve's
        # `finally`: its descriptors are closed here.
        shared.close()
        conn.tasks.discard(task)
        if task.cancelled():  # the connection closed, or the drain ran out of time: no answer to send
            conn.held -= 1
            self._count(grpc.StatusCode.CANCELLED, in_flight=True)
        elif task.exception() is not None:  # not expected: _serve answers every error
            log.error("local request task failed", exc_info=task.exception())

    def _answer(self, conn: Connection, call_id: int, code: grpc.StatusCode, details: str,
                response: bytes | None = None, *, counted: bool = False) -> None:
        self._count(code, in_flight=counted)
        conn.write(reply_parts(call_id, code, details, response))

    def _count(self, code: grpc.StatusCode, *, in_flight: bool) -> None:
        m = self.metrics
        if m is not None:
            m.requests.labels(LOCAL_METHOD, code.name).inc()
            if in_flight:
                m.in_flight.dec()

    # ------------------------------------------------------------- shutdown

    def stop_accepting(self) -> None:
        """No new connections: the socket closes and its file goes away. Open connections still serve."""
        if self._accept_paused is not None:
            self._accept_paused.cancel()
            self._accept_paused = None
        if self._sock is not None:
            if self.loop is not None:
                self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._unlink()

    async def drain(self, grace_s: float) -> None:
        """Answer new requests UNAVAILABLE, let in-flight ones finish and their replies go out
        (at most ``grace_s`` in all), then close every connection."""
        self.stop_accepting()
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        tasks = [t for c in self._conns for t in c.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("local socket: %d request(s) still running after the %.1f s grace period; cancelled",
                            len(pending), grace_s)
                await asyncio.wait(pending)
        flushes = [loop.create_task(c.flushed.wait()) for c in self._conns if not c.flushed.is_set()]
        if flushes:
            _, pending = await asyncio.wait(flushes, timeout=max(0.0, deadline - loop.time()))
            for t in pending:
                t.cancel()
        for conn in list(self._conns):
            conn.close("teacher stopped")

    async def close(self, grace_s: float = 0.0) -> None:
        """:meth:`stop_accepting` and :meth:`drain` in one call (idempotent)."""
        await self.drain(grace_s)

    def _unlink(self) -> None:
        """Remove the socket file if it is still ours (not a successor's)."""
        if self._file_id is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._file_id:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove local socket %s: %s", self.path, exc)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
