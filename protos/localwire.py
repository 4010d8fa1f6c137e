"""The same-host transport's shared definitions (``local.proto``): version, framing, status codes, host identity.

The one home of what both ends of the local transport must agree on: the
protocol version (:data:`PROTOCOL_VERSION`, sent in ``LocalHello`` and
``LocalWelcome``), the gRPC status numbers carried in ``code`` fields
(:data:`STATUS_NAMES`; protos does not import grpc, so each side builds its
own ``grpc.StatusCode`` lookup from the names), and the framing: a frame is a 4-byte
little-endian length followed by one serialized message, and descriptors
passed with SCM_RIGHTS are queued in arrival order so each LocalRequest takes
its ``fd_count`` of them when the frame is complete (the kernel delivers a
sendmsg's descriptors with its first byte, so a frame's descriptors are
always in the queue by the time its last byte is).
"""

from __future__ import annotations

import collections
import os
import socket
import struct

__all__ = ["HEADER", "MAX_FDS_PER_FRAME", "PROTOCOL_VERSION", "STATUS_NAMES", "STATUS_NUMBERS", "FrameBuffer",
           "FrameError", "encode_frame", "frame_parts", "host_id"]

#: The ``local.proto`` version both ends speak (``LocalHello.version``, ``LocalWelcome.version``).
PROTOCOL_VERSION = 1

#: gRPC status number -> ``grpc.StatusCode`` name, for the ``code`` fields of
#: ``LocalWelcome`` and ``LocalReply`` (the numbers of the gRPC spec, which
#: ``grpc.StatusCode[name].value[0]`` also gives; a test checks they agree).
#: Build a lookup with ``{n: grpc.StatusCode[name] for n, name in STATUS_NAMES.items()}``.
STATUS_NAMES: dict[int, str] = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
    10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
    15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}
#: The reverse of :data:`STATUS_NAMES`: status name -> number.
STATUS_NUMBERS: dict[str, int] = {name: n for n, name in STATUS_NAMES.items()}

HEADER = struct.Struct("<I")
#: Upper bound on descriptors per LocalRequest (one per input tensor at most).
MAX_FDS_PER_FRAME = 16

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class FrameError(ValueError):
    """The peer sent something that is not a valid frame sequence."""


def host_id() -> str:
    """``<kernel boot id>/<hostname>``: equal for two processes only on the same running machine.

    The boot id changes on every boot and differs between machines; the
    hostname separates containers that share a kernel but not a filesystem
    (each container gets its own hostname by default), where the teacher's
    socket path would not be reachable anyway.
    """
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
    except OSError:  # not Linux: the local transport (SCM_RIGHTS + memfd) is Linux-only
        return ""
    return f"{boot}/{socket.gethostname()}"


def encode_frame(payload: bytes) -> bytes:
    """Length-prefixed frame of one serialized message."""
    return HEADER.pack(len(payload)) + payload


def frame_parts(*parts: bytes) -> list[bytes]:
    """One frame whose payload is ``parts`` joined, as buffers for ``sendmsg`` (the parts are not copied)."""
    return [HEADER.pack(sum(len(p) for p in parts)), *parts]


class FrameBuffer:
    """Reassembles frames from stream reads; keeps received descriptors in order.

    Args:
        max_frame_bytes: a larger declared length is a protocol error (the
            peer is broken or hostile), raised as :class:`FrameError`.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self._buf = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._max = max_frame_bytes

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self._buf += data
        self._fds.extend(fds)

    def _frame_at(self, data, pos: int):
        """``(payload slice, position after it)`` of the complete frame at ``pos``, or None."""
        start = pos + HEADER.size
        if len(data) < start:
            return None
        (n,) = HEADER.unpack_from(data, pos)
        if n > self._max:
            raise FrameError(f"frame of {n} bytes is over the limit of {self._max}")
        if len(data) - start < n:
            return None
        return data[start:start + n], start + n

    def split(self, data) -> list:
        """Feed ``data`` (no descriptors); return the payloads of the frames now complete.

        When nothing is buffered, frames are cut straight out of ``data``
        (memoryview slices, no copy: parse them before ``data`` changes) and
        only an incomplete tail is kept.
        """
        if self._buf:
            self._buf += data
            return list(self.frames())
        out, pos = [], 0
        while (got := self._frame_at(data, pos)) is not None:
            payload, pos = got
            out.append(payload)
        if pos < len(data):
            self._buf += data[pos:]
        return out

    def frames(self):
        """Yield each complete frame's payload (as ``bytes``)."""
        buf = self._buf
        pos = 0
        while (got := self._frame_at(buf, pos)) is not None:
            payload, pos = got
            yield bytes(payload)
        if pos:
            del buf[:pos]

    def take_fds(self, n: int) -> list[int]:
        """The next ``n`` received descriptors (the caller owns and must close them)."""
        if n > len(self._fds):
            raise FrameError(f"frame declares {n} descriptors but only {len(self._fds)} arrived")
        return [self._fds.popleft() for _ in range(n)]

    def close_fds(self) -> None:
        """Close descriptors that no frame claimed (on disconnect)."""
        while self._fds:
            try:
                os.close(self._fds.popleft())
            except OSError:
                pass
