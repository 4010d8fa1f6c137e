"""How one attempt reaches one teacher: gRPC, or the same-host socket.

Both transports have the same surface, which is all the pool's scheduler
uses::

    call = transport.start(request, timeout_s, on_done)   # never blocks
    call.cancel()                                          # withdraw it
    transport.closed, transport.close(), transport.kind    # "grpc" | "local"

``on_done(response, exception, cancelled)`` is called exactly once per call,
from whichever thread learns the outcome (a gRPC callback thread, or the
thread pumping the :class:`~student_client.local.LocalHub`). ``request`` is
the pool's :class:`~student_client._poolstate.Request`: the gRPC transport
serializes it at its first gRPC attempt (kept on the request, so a re-send or
a hedge reuses the bytes), the local transport passes its tensors as shared
memory and never serializes them.

:class:`LocalSetup` switches a verified same-host teacher from gRPC to its
local socket (``PoolConfig.local_transport``): the teacher's ``Describe`` answer (the
pool's, or on a reconnect a new call over its verified channel) says whether
it offers a socket on this host; then it connects and handshakes
(:meth:`LocalHub.connect`).
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from typing import Any, Callable, Sequence

from protos.edistill.v1 import teacher_pb2 as pb

from . import local as _local
from .describe import describe_call
from .status import code_and_details
from .wire import serialize_request

__all__ = ["ChannelFactory", "GrpcTransport", "LocalSetup", "StubFactory", "channel_setup",
           "default_channel_factory", "default_stub_factory"]

logger = logging.getLogger(__name__)

# After a teacher offered no usable local socket (another host, another user, refused),
# ask it again only this much later; after a local connection broke, wait this long
# before a new one (the teacher may be restarting; gRPC carries its batches meanwhile).
_LOCAL_RETRY_S = 60.0
_LOCAL_RECONNECT_S = 2.0

#: ``(response, exception, cancelled) -> None``, called once per call.
OnDone = Callable[[Any, "BaseException | None", bool], None]
#: ``channel_factory(endpoint, options) -> grpc.Channel``-like object with ``close()``.
ChannelFactory = Callable[[str, Sequence[tuple[str, Any]]], Any]
#: ``stub_factory(channel) -> stub`` whose ``Predict.future(request_bytes, timeout=s)``
#: takes a serialized PredictRequest and returns a ``grpc.Future`` that is also a
#: ``grpc.Call`` resolving to a PredictResponse.
StubFactory = Callable[[Any], Any]


def default_channel_factory(endpoint: str, options: Sequence[tuple[str, Any]]):
    """A plaintext channel (the pool uses the credentials' factory when it has credentials)."""
    import grpc

    return grpc.insecure_channel(endpoint, options=list(options))


def channel_setup(credentials, channel_factory: ChannelFactory | None,
                  trust_env: bool) -> tuple[ChannelFactory, Callable[[], str | None]]:
    """The channel factory and the current-token getter for a pool's arguments.

    Raises:
        ConfigError: both ``credentials`` and ``channel_factory`` given.
    """
    from .credentials import TeacherCredentials
    from .errors import ConfigError

    if channel_factory is not None:
        if credentials is not None:
            raise ConfigError("pass credentials= or channel_factory=, not both")
        return channel_factory, lambda: None
    if credentials is None and trust_env:
        credentials = TeacherCredentials.from_env()
    if credentials is None:
        return default_channel_factory, lambda: None
    return credentials.channel_factory(), credentials.token_getter()


class _PredictStub:
    """Like the generated TeacherStub, but Predict takes pre-serialized bytes (see :mod:`.wire`)."""

    def __init__(self, channel) -> None:
        self.Predict = channel.unary_unary(
            "/edistill.v1.Teacher/Predict",
            request_serializer=None,  # the request is already bytes, serialized once per batch
            response_deserializer=pb.PredictResponse.FromString,
        )


def default_stub_factory(channel):
    """``channel -> stub`` whose ``Predict.future(request_bytes, timeout=s)`` returns a grpc.Future."""
    return _PredictStub(channel)


def _grpc_done(on_done: OnDone, call) -> None:
    if call.cancelled():
        on_done(None, None, True)
        return
    exc = call.exception()
    on_done(call.result() if exc is None else None, exc, False)


class GrpcTransport:
    """Predict over one teacher's gRPC channel."""

    kind = "grpc"
    closed = False  # a gRPC channel reconnects by itself; only the pool closes it

    def __init__(self, channel, stub, outputs_blob: bytes) -> None:
        self.channel = channel
        self._predict = stub.Predict
        self._outputs_blob = outputs_blob  # field 3 of every PredictRequest, serialized once per pool

    def start(self, r, timeout_s: float, on_done: OnDone):
        payload = r.payload
        if payload is None:  # first gRPC attempt of this batch (a hedge may race: same bytes)
            payload = r.payload = serialize_request(r.request_id, r.inputs, self._outputs_blob)[0]
        call = self._predict.future(payload, timeout=timeout_s)
        call.add_done_callback(partial(_grpc_done, on_done))
        return call

    def close(self) -> None:
        self.channel.close()


class LocalSetup:
    """Moves verified same-host teachers onto their local socket.

    Args:
        lock: the pool's lock, which guards each teacher's ``local*`` fields.
        is_open: whether the pool still runs (checked under ``lock``).
        token: ``() -> the current auth token`` (or None) for the handshake.
        outputs_blob: the serialized ``LocalRequest.outputs`` of every request.
        timeout_s: deadline of the Describe call and of the handshake.
        max_frame_bytes: largest answer frame accepted.
    """

    def __init__(self, lock: threading.Lock, is_open: Callable[[], bool], token: Callable[[], str | None],
                 outputs_blob: bytes, timeout_s: float, max_frame_bytes: int) -> None:
        self._lock = lock
        self._is_open = is_open
        self._token = token
        self._outputs_blob = outputs_blob
        self._timeout_s = timeout_s
        self._max_frame_bytes = max_frame_bytes
        self.hub: _local.LocalHub | None = None  # made with the first connection

    def due_locked(self, t, now: float) -> bool:
        """Whether to (re)try the local transport with ``t`` now; marks it pending if so."""
        if not self._is_open() or not t.live or t.local_pending or now < t.local_retry_at:
            return False
        if t.local is not None:
            if not t.local.closed:
                return False
            t.local = None  # it broke (teacher stopped or restarted): gRPC meanwhile
            t.local_retry_at = now + _LOCAL_RECONNECT_S
            return False
        t.local_pending = True
        return True

    def start(self, t, resp: "pb.DescribeResponse | None" = None) -> None:
        """Connect to ``t``'s local socket if its Describe answer ``resp`` offers one on this host.

        Without ``resp`` (a reconnect), ask ``t`` over its verified channel first.
        """
        if resp is not None:
            self._use(t, resp)
            return
        try:
            call = describe_call(t.grpc.channel, self._timeout_s)
        except Exception as exc:  # a custom channel without Describe: gRPC only
            self._failed(t, f"Describe could not be sent ({exc})")
            return
        call.add_done_callback(partial(self._on_describe, t))

    def _on_describe(self, t, call) -> None:
        try:
            resp = call.result()
        except Exception as exc:
            code, details = code_and_details(exc)
            self._failed(t, f"Describe failed ({code}: {details})")
            return
        self._use(t, resp)

    def _use(self, t, resp) -> None:
        if not isinstance(resp, pb.DescribeResponse) or not resp.local_socket:
            self._failed(t, "it offers no local socket")
            return
        if not _local.same_host(resp.host_id):
            self._failed(t, "it runs on another host")
            return
        try:
            with self._lock:
                if not self._is_open():
                    raise ConnectionError("the pool is closed")
                if self.hub is None:
                    self.hub = _local.LocalHub()
                hub = self.hub
            conn = hub.connect(resp.local_socket, teacher_id=resp.teacher_id, token=self._token(),
                               timeout_s=self._timeout_s, max_frame_bytes=self._max_frame_bytes,
                               outputs_blob=self._outputs_blob)
        except Exception as exc:  # another user's socket (EACCES), refused token, teacher gone...
            self._failed(t, f"cannot use its local socket {resp.local_socket} ({exc})", info=True)
            return
        with self._lock:
            t.local_pending = False
            keep = self._is_open() and t.live
            if keep:
                t.local = conn
        if not keep:
            conn.close()
            return
        logger.info("teacher %s runs on this host: sending it batches over %s (shared memory, no copy "
                    "through gRPC)", t.endpoint, resp.local_socket)

    def _failed(self, t, why: str, *, info: bool = False) -> None:
        with self._lock:
            t.local_pending = False
            t.local_retry_at = time.monotonic() + _LOCAL_RETRY_S
        (logger.info if info else logger.debug)(
            "teacher %s: local transport not used, %s; batches go over gRPC", t.endpoint, why)

    def close(self) -> None:
        if self.hub is not None:
            self.hub.close()
