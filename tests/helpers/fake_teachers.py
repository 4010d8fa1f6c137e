"""Fake teachers for unit tests of the TeacherPool without gRPC.

The pool takes a channel factory, a stub factory and a health factory; these
build fake teachers whose calls a test completes by hand (or at once), so
every interleaving is deterministic. ``make_pool(net)`` builds a pool over
them, and the ``net`` fixture (import it into a test module) a fresh network.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from student_client import (
    ExponentialBackoff,
    PoolConfig,
    TeacherPool,
)


__all__ = ["FakeCall", "FakeChannel", "FakeHealth", "FakeNet", "FakeRpcError", "batch", "echo_response",
           "make_pool", "net", "wait_for"]


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class FakeCall:
    """A grpc.Future + grpc.Call stand-in, completed by the test."""

    def __init__(self, endpoint: str, request: pb.PredictRequest, timeout: float, cancellable: bool = True) -> None:
        self.endpoint, self.request, self.timeout = endpoint, request, timeout
        self._lock = threading.Lock()
        self._callbacks: list = []
        self._state = "pending"
        self._resp = None
        self._exc = None
        self.cancellable = cancellable

    def _complete(self, state, resp=None, exc=None) -> bool:
        with self._lock:
            if self._state != "pending":
                return False
            self._state, self._resp, self._exc = state, resp, exc
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)
        return True

    def add_done_callback(self, fn) -> None:
        with self._lock:
            if self._state == "pending":
                self._callbacks.append(fn)
                return
        fn(self)

    def succeed(self, resp=None) -> bool:
        return self._complete("done", resp if resp is not None else echo_response(self.request))

    def fail(self, code=grpc.StatusCode.UNAVAILABLE, details="connection refused") -> bool:
        return self._complete("done", exc=FakeRpcError(code, details))

    def cancel(self) -> bool:
        if not self.cancellable:
            return False  # the answer was already on its way
        return self._complete("cancelled")

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def done(self) -> bool:
        return self._state != "pending"

    def exception(self):
        if self._state == "cancelled":
            raise grpc.FutureCancelledError()
        return self._exc

    def result(self):
        if self._exc is not None:
            raise self._exc
        return self._resp


def echo_response(request: pb.PredictRequest, *, classes: int = 4) -> pb.PredictResponse:
    """logits[b] = [x[b, 0], 0, 1, 2, ...]: the sample id travels back, so outputs can be matched to batches."""
    x = codec.to_torch(request.inputs[0]).float()
    first = x.reshape(x.shape[0], -1)[:, :1]  # (B, 1)
    logits = torch.cat([first, torch.arange(classes - 1, dtype=torch.float32).expand(x.shape[0], -1)], dim=1)
    resp = pb.PredictResponse(request_id=request.request_id, teacher_id="fake", batch_size=x.shape[0])
    for o in request.outputs:
        out = resp.outputs.add(name=o.name, transform=o.transform, temperature=o.temperature, top_k=o.top_k)
        out.dense_shape.extend(logits.shape)
        if o.top_k:
            v, i = torch.topk(logits, o.top_k, dim=-1)
            codec.encode(v, out.values)
            codec.encode(i, out.indices)
        else:
            codec.encode(logits, out.values)
    return resp


class FakeNet:
    """Fake teachers by endpoint. ``mode[endpoint]``: 'hold' (test completes), 'ok', or a StatusCode.

    ``health[endpoint]`` answers the pool's health probe: "SERVING" (default),
    "NOT_SERVING", "hold" (never answers; the test completes ``health_calls``)
    or a StatusCode.
    """

    def __init__(self, default: object = "hold") -> None:
        self.default = default
        self.mode: dict[str, object] = {}
        self.health: dict[str, object] = {}
        self.health_calls: list[FakeCall] = []
        self.calls: list[FakeCall] = []
        self.channels: dict[str, "FakeChannel"] = {}
        self.cancellable = True
        self._lock = threading.Lock()

    def channel_factory(self, endpoint, options):
        ch = FakeChannel(self, endpoint, dict(options))
        self.channels[endpoint] = ch
        return ch

    @staticmethod
    def stub_factory(channel):
        return channel

    @staticmethod
    def health_factory(channel):
        return FakeHealth(channel)

    def calls_to(self, endpoint: str) -> list[FakeCall]:
        with self._lock:
            return [c for c in self.calls if c.endpoint == endpoint]

    def pending(self, endpoint: str | None = None) -> list[FakeCall]:
        with self._lock:
            return [c for c in self.calls if not c.done() and (endpoint is None or c.endpoint == endpoint)]


class FakeChannel:
    def __init__(self, net: FakeNet, endpoint: str, options: dict) -> None:
        self.net, self.endpoint, self.options = net, endpoint, options
        self.closed = False
        self.Predict = self  # stub.Predict.future(...)

    def future(self, request, timeout=None):
        if self.closed:
            raise ValueError("Cannot invoke RPC on closed channel!")
        assert isinstance(request, bytes), "the pool sends pre-serialized requests"
        call = FakeCall(self.endpoint, pb.PredictRequest.FromString(request), timeout, self.net.cancellable)
        with self.net._lock:
            self.net.calls.append(call)
        mode = self.net.mode.get(self.endpoint, self.net.default)
        if mode == "ok":
            call.succeed()
        elif isinstance(mode, grpc.StatusCode):
            call.fail(mode, f"fake {mode.name}")
        return call

    def close(self):
        self.closed = True
        for c in self.net.pending(self.endpoint):
            c.cancel()


class FakeHealth:
    """``Check.future(request, timeout)`` answering per ``net.health[endpoint]``."""

    def __init__(self, channel: "FakeChannel") -> None:
        self.channel = channel
        self.Check = self

    def future(self, request, timeout=None):
        from grpc_health.v1 import health_pb2

        ch, net = self.channel, self.channel.net
        if ch.closed:
            raise ValueError("Cannot invoke RPC on closed channel!")
        call = FakeCall(ch.endpoint, request, timeout)
        with net._lock:
            net.health_calls.append(call)
        mode = net.health.get(ch.endpoint, "SERVING")
        if mode in ("SERVING", "NOT_SERVING"):
            call._complete("done", health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.ServingStatus.Value(mode)))
        elif isinstance(mode, grpc.StatusCode):
            call.fail(mode, f"fake {mode.name}")
        return call


def wait_for(cond, timeout_s: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.002)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def batch(ids) -> dict[str, torch.Tensor]:
    x = torch.zeros(len(ids), 3)
    x[:, 0] = torch.tensor(ids, dtype=torch.float32)
    return {"": x}


def make_pool(net: FakeNet, endpoints=("a:1", "b:2"), outputs=("logits",), **cfg) -> TeacherPool:
    cfg.setdefault("backoff", ExponentialBackoff(base_s=0.05, cap_s=0.2, jitter=0.0))
    return TeacherPool(endpoints, outputs, config=PoolConfig(**cfg), channel_factory=net.channel_factory,
                       stub_factory=net.stub_factory, health_factory=net.health_factory)


@pytest.fixture
def net():
    return FakeNet()
