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

Per connection: a ``LocalHello`` within :data:`HELLO_TIMEOUT_S`, then at most
``max_queued_per_peer`` requests in flight (RESOURCE_EXHAUSTED beyond it, as
on gRPC). A frame that is not a valid message, is over
``max_message_bytes``, or whose descriptors do not match its ``fd_count``
ends that connection only (one log line); the server keeps serving. A
connection that closes cancels its queued work (like a gRPC client going
away). Every received descriptor is closed: at once when unused, right after
``mmap`` otherwise.

Memory lifetime: an input tensor is a zero-copy ``torch.frombuffer`` view of
an ``mmap``; torch holds a reference to the ``mmap`` object (not a buffer
export), so the mapping lives exactly as long as some tensor still views it
-- the batcher's concatenated batch is a copy, and the last views die after
the forward pass. The code never calls ``mmap.close()``, which would unmap
under live views. Python's ``mmap`` keeps a duplicate of the descriptor while
mapped, so a queued request holds one descriptor per shared-memory input;
:meth:`LocalListener.start` raises the soft RLIMIT_NOFILE (to at most the
hard limit) so a full queue cannot run the process out of descriptors.
"""

from __future__ import annotations

import array
import asyncio
import collections
import itertools
import logging
import math
import mmap
import os
import re
import socket
import stat
import struct
import tempfile
import warnings
from typing import TYPE_CHECKING, Sequence

import grpc
import torch
from google.protobuf.message import DecodeError

from protos import codec
from protos.codec import varint
from protos.edistill.v1 import local_pb2
from protos.localwire import HEADER, MAX_FDS_PER_FRAME, FrameBuffer, FrameError
from teacher_server.config import MAX_UNIX_PATH_BYTES, TeacherConfig
from teacher_server.errors import ConfigError, InvalidRequest, RequestError
from teacher_server.servicer import peer_limit_message
from teacher_server.signature import TORCH_OF_WIRE

if TYPE_CHECKING:
    from teacher_server.auth import TokenSet
    from teacher_server.metrics import TeacherMetrics
    from teacher_server.servicer import TeacherServicer

__all__ = ["HELLO_TIMEOUT_S", "LOCAL_METHOD", "PROTOCOL_VERSION", "RUNTIME_DIR_ENV", "LocalListener",
           "resolve_socket_path", "runtime_dir"]

log = logging.getLogger(__name__)

#: The ``local.proto`` version this teacher speaks (``LocalHello.version``).
PROTOCOL_VERSION = 1

#: Seconds a new connection has to send its ``LocalHello``.
HELLO_TIMEOUT_S = 5.0

#: ``method`` label of local requests in ``edistill_teacher_requests_total``.
LOCAL_METHOD = "LocalPredict"

#: Overrides the directory of ``local_socket="auto"`` sockets.
RUNTIME_DIR_ENV = "EDISTILL_RUNTIME_DIR"

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
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")

# torch warns (once per process) that a view of read-only memory is not
# writable. Here that is intended: inputs are read-only views of the
# student's shared memory, and the batcher copies them (concatenation, or a
# clone for a lone request) before the model runs. Ignored only when raised
# from this module, like protos.codec does (warnings.catch_warnings() per call
# would swap the process-wide filter list under other threads).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=r"teacher_server\.local\Z")


# --------------------------------------------------------------------- paths


def runtime_dir() -> str:
    """This user's directory for teacher sockets, created mode 0700 when missing.

    ``$EDISTILL_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/edistill``, else
    ``<tempfile.gettempdir()>/edistill-<uid>``.

    Raises:
        ConfigError: the directory cannot be created, is a symbolic link, is
            not owned by this user, or is open to group or others (another
            user could then swap the socket for their own).
    """
    uid = os.geteuid()
    if os.environ.get(RUNTIME_DIR_ENV):
        path, where = os.environ[RUNTIME_DIR_ENV], f"${RUNTIME_DIR_ENV}"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path, where = os.path.join(os.environ["XDG_RUNTIME_DIR"], "edistill"), "$XDG_RUNTIME_DIR/edistill"
    else:
        path, where = os.path.join(tempfile.gettempdir(), f"edistill-{uid}"), "the temporary directory"
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"cannot create the socket directory {path} ({where}): {exc.strerror}; set "
                          f"{RUNTIME_DIR_ENV} to a writable directory, or pass --local-socket PATH or off") from None
    fix = f"remove it, or set {RUNTIME_DIR_ENV} to a directory of your own (mode 0700)"
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"socket directory {path} ({where}) is a symbolic link, which whoever owns it can "
                          f"re-point; {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"socket directory {path} ({where}) exists but is not a directory; {fix}")
    if st.st_uid != uid:
        raise ConfigError(f"socket directory {path} ({where}) belongs to uid {st.st_uid}, not to this user "
                          f"(uid {uid}); {fix}")
    if st.st_mode & 0o077:
        raise ConfigError(f"socket directory {path} ({where}) has mode {stat.S_IMODE(st.st_mode):04o}, open to "
                          f"group or others; run `chmod 700 {path}`, or set {RUNTIME_DIR_ENV} to another directory")
    return path


def resolve_socket_path(setting: str, teacher_id: str) -> str | None:
    """The absolute socket path for ``TeacherConfig.local_socket``, or None for no local socket.

    ``"auto"``: ``<runtime_dir()>/teacher-<teacher_id>.sock``; when that is
    unusable (directory refused, path over the AF_UNIX limit) the reason is
    logged as a warning and the teacher serves gRPC only. A path is used as
    given (made absolute).

    Raises:
        ConfigError: an explicit path that is too long.
    """
    if setting == "off":
        return None
    if setting != "auto":
        path = os.path.abspath(setting)
        _check_length(path, f"--local-socket {setting!r}")
        return path
    try:
        path = os.path.join(runtime_dir(), f"teacher-{_UNSAFE_NAME.sub('_', teacher_id)}.sock")
        _check_length(path, "the automatic local socket path")
    except ConfigError as exc:
        log.warning("same-host transport off: %s (students on this machine use gRPC)", exc)
        return None
    return path


def _check_length(path: str, what: str) -> None:
    n = len(os.fsencode(path))
    if n > MAX_UNIX_PATH_BYTES:
        raise ConfigError(f"{what} {path} is {n} bytes, over the {MAX_UNIX_PATH_BYTES}-byte limit of Unix socket "
                          f"paths; set {RUNTIME_DIR_ENV} to a shorter directory or pass --local-socket with a "
                          "shorter path")


def _claim_path(path: str) -> None:
    """Make ``path`` free to bind: remove a stale socket, refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot use local socket path {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"local socket path {path} exists and is not a socket; refusing to replace it: "
                          "choose another --local-socket path (or 'auto')")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # left behind by a process that died: nobody listens
        log.info("removing stale local socket %s", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError as exc:
        raise ConfigError(f"cannot use local socket path {path}: {exc}") from None
    finally:
        probe.close()
    raise ConfigError(f"another process is serving on local socket {path}; choose another --local-socket path "
                      "(or 'auto')")


def _raise_fd_limit(want: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (never above the hard limit)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= want:
            return
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            log.info("raised the open-file limit from %d to %d (each queued local request maps its shared "
                     "memory with one descriptor)", soft, new)
    except (ImportError, OSError, ValueError) as exc:
        log.debug("could not raise the open-file limit: %s", exc)


# -------------------------------------------------------------------- inputs


class _SharedInputs:
    """The descriptors of one LocalRequest, each mapped read-only on first use.

    Owns the descriptors: :meth:`close` (or mapping) closes every one.
    Event-loop thread only.
    """

    __slots__ = ("_fds", "_maps")

    def __init__(self, fds: Sequence[int]) -> None:
        self._fds = list(fds)
        self._maps: dict[int, tuple[mmap.mmap | None, int]] = {}

    def decode(self, msg: local_pb2.SharedTensor, label: str) -> torch.Tensor:
        """A zero-copy read-only view of one input (dtype and shape already validated).

        Raises:
            InvalidRequest: bad descriptor index, memory that cannot be
                mapped, or a tensor reaching past the end of its memory.
        """
        shape = list(msg.shape)
        if any(d < 0 for d in shape):
            raise InvalidRequest(f"{label}: negative dimension in shape {shape}")
        i = msg.fd_index
        if i >= len(self._fds):
            raise InvalidRequest(f"{label}: fd_index {i}, but the request carries {len(self._fds)} "
                                 "descriptor(s) (fd_count)")
        mem, size = self._map(i, label)
        count = math.prod(shape)
        nbytes = count * codec.itemsize(msg.dtype)
        if msg.offset + nbytes > size:
            raise InvalidRequest(f"{label}: shape {shape} of {codec.dtype_name(msg.dtype)} needs {nbytes} bytes "
                                 f"from offset {msg.offset}, but descriptor #{i} holds {size} bytes")
        dtype = TORCH_OF_WIRE[msg.dtype]
        if count == 0:  # torch.frombuffer refuses count=0; nothing to share anyway
            return torch.empty(shape, dtype=dtype)
        # torch keeps a reference to `mem`: the mapping outlives this object for as long as the view lives.
        return torch.frombuffer(mem, dtype=dtype, count=count, offset=msg.offset).view(shape)

    def _map(self, i: int, label: str) -> tuple[mmap.mmap | None, int]:
        if i in self._maps:
            return self._maps[i]
        fd, self._fds[i] = self._fds[i], -1
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidRequest(f"{label}: descriptor #{i} is not shared memory (a memfd or /dev/shm file); "
                                     "send the descriptor of the tensor's shared-memory file")
            size = st.st_size
            mem = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED) if size else None
        except (OSError, ValueError, OverflowError) as exc:
            raise InvalidRequest(f"{label}: cannot map descriptor #{i} read-only ({exc}); send a shared-memory "
                                 "descriptor opened for reading") from None
        finally:
            os.close(fd)  # mmap keeps its own duplicate while mapped
        self._maps[i] = (mem, size)
        return mem, size

    def close(self) -> None:
        """Close the descriptors not mapped yet; drop this object's mappings (live views keep theirs)."""
        for fd in self._fds:
            if fd >= 0:
                _close_fd(fd)
        self._fds = [-1] * len(self._fds)
        self._maps.clear()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Descriptors passed with SCM_RIGHTS in ``recvmsg`` ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


# LocalReply.response is field 4, length-delimited: tag (4 << 3) | 2.
_RESPONSE_TAG = bytes([(4 << 3) | 2])


def _reply_parts(call_id: int, code: grpc.StatusCode, details: str, response_bytes: bytes | None) -> list[bytes]:
    """One LocalReply frame as buffers for sendmsg, without copying the response.

    A serialized message followed by a serialized field is the message with
    that field set (protobuf concatenation merges), so the PredictResponse,
    already serialized once, is framed as field 4 behind the small head
    instead of being copied into a LocalReply and serialized again.
    """
    head = local_pb2.LocalReply(call_id=call_id, code=code.value[0], details=details).SerializeToString()
    if response_bytes is None:
        return [HEADER.pack(len(head)), head]
    field = _RESPONSE_TAG + varint(len(response_bytes))
    return [HEADER.pack(len(head) + len(field) + len(response_bytes)), head, field, response_bytes]


# ---------------------------------------------------------------- connection


class _Connection:
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
        fds = _fds_of(ancdata)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                _close_fd(fd)
            self.protocol_error(f"more than {MAX_FDS_PER_FRAME} descriptors in one message (MAX_FDS_PER_FRAME)")
            return
        if not data:
            for fd in fds:
                _close_fd(fd)
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
                                         code=code.value[0], details=details)
        payload = welcome.SerializeToString()
        self.write([HEADER.pack(len(payload)), payload])
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


# ------------------------------------------------------------------ listener


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
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self._sock: socket.socket | None = None
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._conns: set[_Connection] = set()
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
        _raise_fd_limit(1024 + (cfg.max_queue_size + 2 * cfg.max_batch_size) * MAX_FDS_PER_FRAME)
        _claim_path(self.path)
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
        if uid != os.geteuid():
            log.warning("local socket %s: refused pid %d running as uid %d (this teacher runs as uid %d)",
                        self.path, pid, uid, os.geteuid())
            sock.close()
            return
        conn = _Connection(self, sock, pid)
        self._conns.add(conn)
        conn.start()

    def forget(self, conn: _Connection) -> None:
        """Called by a connection when it closes."""
        self._conns.discard(conn)

    # ------------------------------------------------------------- requests

    def on_request(self, conn: _Connection, req: local_pb2.LocalRequest, fds: list[int]) -> None:
        """A complete LocalRequest and its descriptors (now ours): answer it or start serving it."""
        if self.draining:
            _close_all(fds)
            self._answer(conn, req.call_id, grpc.StatusCode.UNAVAILABLE,
                         "teacher is shutting down; send the request to another teacher")
            return
        limit = self.config.max_queued_per_peer
        if conn.held >= limit:
            _close_all(fds)
            self._answer(conn, req.call_id, grpc.StatusCode.RESOURCE_EXHAUSTED, peer_limit_message(conn.held, limit))
            return
        conn.held += 1
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        shared = _SharedInputs(fds)
        task = self.loop.create_task(self._serve(conn, req, shared))
        conn.tasks.add(task)
        task.add_done_callback(lambda t: self._served(conn, t, shared))

    async def _serve(self, conn: _Connection, req: local_pb2.LocalRequest, shared: _SharedInputs) -> None:
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

    def _served(self, conn: _Connection, task: asyncio.Task, shared: _SharedInputs) -> None:
        # A task cancelled before it first ran never entered _serve's
        # `finally`: its descriptors are closed here.
        shared.close()
        conn.tasks.discard(task)
        if task.cancelled():  # the connection closed, or the drain ran out of time: no answer to send
            conn.held -= 1
            self._count(grpc.StatusCode.CANCELLED, in_flight=True)
        elif task.exception() is not None:  # not expected: _serve answers every error
            log.error("local request task failed", exc_info=task.exception())

    def _answer(self, conn: _Connection, call_id: int, code: grpc.StatusCode, details: str,
                response: bytes | None = None, *, counted: bool = False) -> None:
        self._count(code, in_flight=counted)
        conn.write(_reply_parts(call_id, code, details, response))

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


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        _close_fd(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
