"""One same-host student connection on the teacher: hello, requests in, replies out.

:class:`Connection` drives a non-blocking Unix socket on the server's asyncio
loop (asyncio streams cannot receive descriptors): ``loop.add_reader`` +
``recvmsg`` in, a write buffer flushed with ``sendmsg`` (``loop.add_writer``
when the socket is full) out. It never blocks the loop, and a reply is always
queued whole, so frames never interleave. The protocol itself (a
``LocalHello`` within the listener's ``hello_timeout_s``, then ``LocalRequest``
frames with their descriptors) is checked here; a broken frame closes this
connection only. Serving a request is the listener's business
(:meth:`teacher_server.local.LocalListener.on_request`).
"""

from __future__ import annotations

import array
import asyncio
import collections
import itertools
import logging
import socket
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from protos.codec import varint
from protos.edistill.v1 import local_pb2
from protos.localwire import (HEADER, MAX_FDS_PER_FRAME, PROTOCOL_VERSION, STATUS_NAMES, FrameBuffer, FrameError,
                              frame_parts)
from teacher_server.localinputs import close_fd, fds_of

if TYPE_CHECKING:
    from teacher_server.local import LocalListener

__all__ = ["STATUS_NUMBER", "Connection", "reply_parts"]

log = logging.getLogger(__name__)

#: ``grpc.StatusCode`` -> the number a ``code`` field carries (from :data:`protos.localwire.STATUS_NAMES`).
STATUS_NUMBER: dict[grpc.StatusCode, int] = {grpc.StatusCode[name]: n for n, name in STATUS_NAMES.items()}

# Frames are small (no tensor bytes): one recvmsg usually holds several.
_RECV_BYTES = 64 * 1024
# One recvmsg returns at most one sendmsg's descriptors (Linux stops a stream
# read after a message that carried them), so room for a frame's maximum is
# enough; more sets MSG_CTRUNC and the kernel closes the surplus.
_ANC_BYTES = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)
# Unsent reply bytes above which a connection's reading pauses until its
# replies drain: a student that sends but never reads cannot grow our memory.
_OUT_HIGH_WATER = 8 * 1024 * 1024
# iovecs per sendmsg (well under IOV_MAX 1024).
_MAX_IOV = 64


# LocalReply.response is field 4, length-delimited: tag (4 << 3) | 2.
_RESPONSE_TAG = bytes([(4 << 3) | 2])


def reply_parts(call_id: int, code: grpc.StatusCode, details: str, response_bytes: bytes | None) -> list[bytes]:
    """One LocalReply frame as buffers for sendmsg, without copying the response.

    A serialized message followed by a serialized field is the message with
    that field set (protobuf concatenation merges), so the PredictResponse,
    already serialized once, is framed as field 4 behind the small head
    instead of being copied into a LocalReply and serialized again.
    """
    head = local_pb2.LocalReply(call_id=call_id, code=STATUS_NUMBER[code], details=details).SerializeToString()
    if response_bytes is None:
        return frame_parts(head)
    return frame_parts(head, _RESPONSE_TAG + varint(len(response_bytes)), response_bytes)


class Connection:
    """One student connection: hello, requests, replies. Event-loop thread only."""

    def __init__(self, listener: "LocalListener", sock: socket.socket, peer_pid: int) -> None:
        self.listener = listener
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_pid = peer_pid
        self.loop = listener.loop
        self.frames = FrameBuffer(listener.config.max_message_bytes)
        # Bookkeeping FrameBuffer does not expose: descriptors received and
        # not yet claimed by a frame, and bytes fed but not yet part of a
        # complete frame. Descriptors left over when no partial frame is
        # buffered were sent beyond some frame's fd_count.
        self.fds_pending = 0
        self.bytes_pending = 0
        self.ready = False  # LocalHello accepted
        self.closed = False
        self.held = 0  # requests received and not yet answered (max_queued_per_peer)
        self.tasks: set[asyncio.Task] = set()
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_bytes = 0
        self._reading = False
        self._writing = False
        self._close_when_flushed = False
        self.flushed = asyncio.Event()
        self.flushed.set()
        self._hello_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._hello_timer = self.loop.call_later(self.listener.hello_timeout_s, self._hello_expired)
        self._resume_reading()

    # ---------------------------------------------------------------- input

    def _resume_reading(self) -> None:
        if not self._reading and not self.closed and not self._close_when_flushed:
            self.loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(_RECV_BYTES, _ANC_BYTES, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        fds = fds_of(ancdata)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                close_fd(fd)
            self.protocol_error(f"more than {MAX_FDS_PER_FRAME} descriptors in one message (MAX_FDS_PER_FRAME)")
            return
        if not data:
            for fd in fds:
                close_fd(fd)
            self.close("the student closed the connection")
            return
        self.frames.feed(data, fds)  # from here on the FrameBuffer owns (and on close, closes) them
        self.fds_pending += len(fds)
        self.bytes_pending += len(data)
        try:
            for payload in self.frames.frames():
                self.bytes_pending -= HEADER.size + len(payload)
                self._on_frame(payload)
                if self.closed or self._close_when_flushed:
                    return
            if self.fds_pending and not self.bytes_pending:
                raise FrameError(f"{self.fds_pending} descriptor(s) arrived beyond the frames' fd_count")
            if self.fds_pending > MAX_FDS_PER_FRAME:
                raise FrameError(f"{self.fds_pending} descriptors are waiting for one incomplete frame "
                                 f"(at most {MAX_FDS_PER_FRAME})")
        except FrameError as exc:
            self.protocol_error(str(exc))

    def _on_frame(self, payload: bytes) -> None:
        if not self.ready:
            # Descriptors already queued may be the next request's (a recv
            # can hold the hello and a pipelined request): left over ones
            # are caught at the end of the read.
            self._on_hello(_parse(local_pb2.LocalHello, payload))
            return
        req = _parse(local_pb2.LocalRequest, payload)
        if req.fd_count > MAX_FDS_PER_FRAME:
            raise FrameError(f"LocalRequest declares fd_count {req.fd_count}, over MAX_FDS_PER_FRAME "
                             f"{MAX_FDS_PER_FRAME}")
        fds = self.frames.take_fds(req.fd_count)  # FrameError when fewer arrived
        self.fds_pending -= len(fds)
        self.listener.on_request(self, req, fds)

    def _on_hello(self, hello: local_pb2.LocalHello) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        listener = self.listener
        code, details = grpc.StatusCode.OK, ""
        if hello.version != PROTOCOL_VERSION:
            code = grpc.StatusCode.UNIMPLEMENTED
            details = (f"this teacher speaks local transport version {PROTOCOL_VERSION}, the student sent version "
                       f"{hello.version}; use gRPC, or run the same edistill version on both sides")
        elif listener.tokens is not None:
            # Same TokenSet as the gRPC AuthInterceptor: constant-time check, file rotation included.
            if not hello.token:
                code = grpc.StatusCode.UNAUTHENTICATED
                details = ("LocalHello carries no token; this teacher requires one: set EDISTILL_AUTH_TOKEN or "
                           "pass auth_token=/auth_token_file= to the student")
            elif not listener.tokens.check(hello.token):
                code = grpc.StatusCode.UNAUTHENTICATED
                details = "the token is not accepted by this teacher; check the student's token"
        welcome = local_pb2.LocalWelcome(teacher_id=listener.teacher_id, version=PROTOCOL_VERSION,
                                         code=STATUS_NUMBER[code], details=details)
        self.write(frame_parts(welcome.SerializeToString()))
        if code != grpc.StatusCode.OK:
            log.debug("local socket: refused pid %d: %s", self.peer_pid, details)
            self.close_after_flush()
            return
        self.ready = True

    def _hello_expired(self) -> None:
        self._hello_timer = None
        if not self.ready and not self.closed:
            self.protocol_error(f"no LocalHello within {self.listener.hello_timeout_s:g} s")

    # --------------------------------------------------------------- output

    def write(self, parts: list[bytes]) -> None:
        """Queue one whole frame (as buffers) for sending; never blocks."""
        if self.closed:
            return
        views = [memoryview(p) for p in parts if len(p)]
        if not self._out:
            sent = self._send(views)
            if sent is None:
                return
            views = _advance(views, sent)
            if not views:
                return
        self._out.extend(views)
        self._out_bytes += sum(len(v) for v in views)
        self.flushed.clear()
        if not self._writing:
            self.loop.add_writer(self.fd, self._on_writable)
            self._writing = True
        if self._out_bytes > _OUT_HIGH_WATER:
            self._pause_reading()  # resumed when the replies have drained

    def _send(self, views: list[memoryview]) -> int | None:
        """Bytes sent now (0 when the socket is full); None after closing on an error."""
        try:
            return self.sock.sendmsg(views, [], socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self.close(f"send failed: {exc}")
            return None

    def _on_writable(self) -> None:
        while self._out:
            sent = self._send(list(itertools.islice(self._out, _MAX_IOV)))
            if not sent:  # socket full (wait for the next call) or closed on an error
                return
            self._out_bytes -= sent
            while sent:
                head = self._out[0]
                if len(head) <= sent:
                    sent -= len(head)
                    self._out.popleft()
                else:
                    self._out[0] = head[sent:]
                    sent = 0
        self.loop.remove_writer(self.fd)
        self._writing = False
        self.flushed.set()
        if self._close_when_flushed:
            self.close()
        else:
            self._resume_reading()

    # ------------------------------------------------------------- lifecycle

    def close_after_flush(self) -> None:
        """Read nothing more; close once everything queued is sent."""
        self._close_when_flushed = True
        self._pause_reading()
        if not self._out:
            self.close()

    def protocol_error(self, why: str) -> None:
        """The student broke the protocol: one warning, then this connection (only) is closed."""
        log.warning("local socket: closing the connection of pid %d: %s", self.peer_pid, why)
        self.close()

    def close(self, why: str = "") -> None:
        """Close now: cancel this connection's queued work, close its descriptors and socket."""
        if self.closed:
            return
        self.closed = True
        if why:
            log.debug("local socket: connection of pid %d closed: %s", self.peer_pid, why)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._pause_reading()
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
        for task in self.tasks:
            task.cancel()  # a queued request's batcher future is cancelled: the batcher skips it
        self.frames.close_fds()
        self._out.clear()
        self._out_bytes = 0
        self.flushed.set()
        self.sock.close()
        self.listener.forget(self)


def _advance(views: list[memoryview], sent: int) -> list[memoryview]:
    out = []
    for v in views:
        if sent >= len(v):
            sent -= len(v)
        else:
            out.append(v[sent:] if sent else v)
            sent = 0
    return out


def _parse(cls, payload: bytes):
    try:
        return cls.FromString(payload)
    except (DecodeError, ValueError) as exc:
        raise FrameError(f"frame is not a valid {cls.__name__} ({type(exc).__name__}: {str(exc)[:200]})") from None
