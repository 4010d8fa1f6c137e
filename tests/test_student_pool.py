"""Unit tests of TeacherPool, its balancer, breaker and backoff, without gRPC.

The pool takes a channel factory and a stub factory; here they build fake
teachers whose calls the test completes by hand (or at once), so every
interleaving is deterministic.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import grpc
import numpy as np
import pytest
import torch

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from student_client import (
    ConfigError,
    ExponentialBackoff,
    NoTeacherAvailableError,
    OutputSpec,
    PoolConfig,
    SourceClosedError,
    SourceRequest,
    TeacherPool,
    TeacherRequestError,
    TeacherResponseError,
    TopK,
)
from student_client import backoff as backoff_mod
from student_client.balancer import LatencyEwma, pick
from student_client.breaker import CircuitBreaker


# ---------------------------------------------------------------- fakes


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


# ------------------------------------------------------------ backoff


def test_backoff_doubles_up_to_cap_without_jitter():
    b = ExponentialBackoff(base_s=0.1, cap_s=1.0, jitter=0.0)
    assert [b.delay_s(n) for n in (1, 2, 3, 4, 5, 100)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_jitter_uses_the_random_source(monkeypatch):
    seen = []

    def fake_uniform(a, b):
        seen.append((a, b))
        return a  # the shortest delay the jitter allows

    monkeypatch.setattr(backoff_mod.random, "uniform", fake_uniform)
    b = ExponentialBackoff(base_s=1.0, cap_s=8.0, jitter=0.5, uniform=backoff_mod.random.uniform)
    assert b.delay_s(3) == pytest.approx(2.0)
    assert seen == [(2.0, 4.0)]


@pytest.mark.parametrize("kwargs", [dict(base_s=0), dict(base_s=1, cap_s=0.5), dict(jitter=1.5)])
def test_backoff_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        ExponentialBackoff(**kwargs)


# ------------------------------------------------------------ breaker


def test_breaker_opens_probes_once_and_closes():
    br = CircuitBreaker(ExponentialBackoff(base_s=1.0, cap_s=4.0, jitter=0.0))
    assert br.available(0.0) and br.on_send(0.0) is False
    br.on_failure(10.0, probe=False)
    assert br.state == "open" and br.open_until == pytest.approx(11.0)
    br.on_failure(10.5, probe=False)  # a straggler in flight before it opened: no longer backoff
    assert br.open_until == pytest.approx(11.0) and br.failures == 1
    assert not br.available(10.9)
    assert br.available(11.0) and br.on_send(11.0) is True  # the probe
    assert not br.available(11.1)  # only one probe at a time
    br.on_failure(11.2, probe=True)
    assert br.state == "open" and br.open_until == pytest.approx(13.2)  # backoff doubled
    assert br.on_send(13.3) is True
    br.on_success()
    assert br.state == "closed" and br.failures == 0 and br.available(13.4)


def test_breaker_abandoned_probe_frees_the_slot():
    br = CircuitBreaker(ExponentialBackoff(base_s=1.0, cap_s=4.0, jitter=0.0))
    br.on_failure(0.0, probe=False)
    assert br.on_send(2.0) is True and not br.available(2.0)
    br.on_abandon(probe=True)
    assert br.available(2.0)


# ----------------------------------------------------------- balancer


class Cand:
    def __init__(self, name, outstanding, latency_s, last_pick=0):
        self.name, self.outstanding, self.last_pick = name, outstanding, last_pick
        self.latency = LatencyEwma()
        if latency_s is not None:
            self.latency.add(latency_s)


def test_pick_prefers_fewer_outstanding_then_lower_latency():
    assert pick([Cand("a", 2, 0.01), Cand("b", 0, 0.01)]).name == "b"
    # a holds 1 at 10 ms (expected 20 ms), b is idle at 50 ms (expected 50 ms)
    assert pick([Cand("a", 1, 0.01), Cand("b", 0, 0.05)]).name == "a"
    assert pick([]) is None


def test_pick_new_teacher_is_tried_and_ties_rotate():
    assert pick([Cand("old", 1, 0.01), Cand("new", 0, None)]).name == "new"
    assert pick([Cand("a", 0, None, last_pick=5), Cand("b", 0, None, last_pick=3)]).name == "b"


def test_latency_ewma_follows_samples():
    e = LatencyEwma(alpha=0.5)
    e.add(1.0)
    e.add(3.0)
    assert e.value_s == pytest.approx(2.0)


# --------------------------------------------------------------- pool


def test_submit_resolves_to_decoded_dense_and_topk_outputs(net):
    net.default = "ok"
    with make_pool(net, ("a:1",), outputs=[OutputSpec("logits"), ]) as pool:
        out = pool.submit(SourceRequest(batch([7, 8]), "0:0")).result(timeout=5)
    assert out["logits"].shape == (2, 4) and out["logits"][:, 0].tolist() == [7.0, 8.0]
    net2 = FakeNet("ok")
    with make_pool(net2, ("a:1",), outputs=[OutputSpec("logits", top_k=2)]) as pool:
        tk = pool.submit(SourceRequest(batch([9]), "0:0")).result(timeout=5)["logits"]
    assert isinstance(tk, TopK) and tk.dense_shape == (1, 4) and tk.k == 2
    assert tk.values.tolist() == [[9.0, 2.0]] and tk.indices.tolist() == [[0, 3]]
    assert tk.dense().tolist() == [[9.0, 0.0, 0.0, 2.0]]
    # the request asked for exactly that output
    (req_out,) = net2.calls[0].request.outputs
    assert (req_out.name, req_out.top_k, req_out.dtype) == ("logits", 2, pb.FLOAT32)


def test_an_answer_with_the_wrong_number_of_rows_is_a_teacher_response_error(net):
    # A teacher that answers 3 rows for a batch of 2 would hand the loss
    # another batch's labels' worth of soft targets; the pool refuses it.
    with make_pool(net, ("a:1",)) as pool:
        fut = pool.submit(SourceRequest(batch([7, 8]), "0:0"))
        call = wait_for(lambda: net.pending("a:1"), what="the call")[0]
        bigger = pb.PredictRequest(request_id=call.request.request_id, outputs=call.request.outputs)
        codec.encode(torch.zeros(3, 3), bigger.inputs.add(), name="")
        wrong = echo_response(bigger)
        call.succeed(wrong)
        with pytest.raises(TeacherResponseError, match="row"):
            fut.result(timeout=5)


def test_every_call_carries_the_deadline_and_channels_the_message_limits(net):
    with make_pool(net, ("a:1",), timeout_s=7.5, max_message_bytes=1 << 20) as pool:
        pool.submit(SourceRequest(batch([1]), "x"))
        (call,) = wait_for(lambda: net.pending("a:1"))
        assert call.timeout == 7.5
        opts = net.channels["a:1"].options
        assert opts["grpc.max_send_message_length"] == opts["grpc.max_receive_message_length"] == 1 << 20


def test_load_aware_spread_and_in_flight_limit(net):
    with make_pool(net, ("a:1", "b:2"), max_in_flight_per_teacher=2) as pool:
        futs = [pool.submit(SourceRequest(batch([i]), i)) for i in range(6)]
        assert len(net.pending("a:1")) == 2 and len(net.pending("b:2")) == 2  # 2 queued
        net.pending("b:2")[0].succeed()
        wait_for(lambda: len(net.pending("b:2")) == 2, what="queued batch sent to the freed teacher")
        assert len(net.pending("a:1")) == 2
        for _ in range(10):
            for c in net.pending():
                c.succeed()
            if all(f.done() for f in futs):
                break
        got = [f.result(timeout=5)["logits"][0, 0].item() for f in futs]
    assert got == [float(i) for i in range(6)]


def test_retryable_failure_is_resent_to_another_teacher(net):
    with make_pool(net, ("a:1", "b:2")) as pool:
        fut = pool.submit(SourceRequest(batch([5]), "e:5"))
        (first,) = net.pending()
        other = "b:2" if first.endpoint == "a:1" else "a:1"
        first.fail(grpc.StatusCode.UNAVAILABLE, "connection refused")
        (second,) = wait_for(lambda: net.pending(other), what="re-send to the other teacher")
        second.succeed()
        assert fut.result(timeout=5)["logits"][0, 0].item() == 5.0
        st = pool.stats()
    assert st.retries == 1 and st.completed == 1 and st.failed == 0
    assert st.teachers[first.endpoint].failovers == 1 and st.teachers[first.endpoint].failures == {"UNAVAILABLE": 1}
    assert st.teachers[other].retries == 1 and st.teachers[other].successes == 1
    assert st.teachers[first.endpoint].state.startswith("open")


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.UNIMPLEMENTED])
def test_non_retryable_answer_surfaces_with_the_teachers_message(net, code):
    with make_pool(net, ("a:1", "b:2")) as pool:
        fut = pool.submit(SourceRequest(batch([1]), "0:3"))
        (call,) = net.pending()
        call.fail(code, "input '' has dtype float64, expected float32")
        with pytest.raises(TeacherRequestError) as ei:
            fut.result(timeout=5)
        assert len(net.calls) == 1  # never retried
    err = ei.value
    assert err.code == code.name and err.endpoint == call.endpoint and err.batch_id == "0:3"
    assert "expected float32" in str(err) and code.name in str(err)
    assert isinstance(err.__cause__, grpc.RpcError)


def test_server_errors_are_retried_a_bounded_number_of_times(net):
    net.default = grpc.StatusCode.INTERNAL
    with make_pool(net, ("a:1", "b:2"), max_server_error_attempts=3,
                   backoff=ExponentialBackoff(base_s=0.01, cap_s=0.01, jitter=0.0)) as pool:
        fut = pool.submit(SourceRequest(batch([1]), "0:0"))
        with pytest.raises(TeacherRequestError, match="3 times"):
            fut.result(timeout=5)
    assert len(net.calls) == 3
    assert {net.calls[0].endpoint, net.calls[1].endpoint} == {"a:1", "b:2"}  # a different teacher first


def test_removed_teacher_requests_are_resent_and_late_answers_dropped(net):
    net.cancellable = False  # the removed teacher's answers still arrive
    with make_pool(net, ("a:1", "b:2")) as pool:
        futs = [pool.submit(SourceRequest(batch([i]), i)) for i in range(2)]
        held_by_a = net.pending("a:1")
        assert len(held_by_a) == 1
        pool.set_endpoints(["b:2"])
        assert net.channels["a:1"].closed
        wait_for(lambda: len(net.pending("b:2")) == 2, what="re-send to b")
        held_by_a[0].succeed()  # late answer from the removed teacher
        for c in net.pending("b:2"):
            c.succeed()
        got = [f.result(timeout=5)["logits"][0, 0].item() for f in futs]
        st = pool.stats()
    assert got == [0.0, 1.0]
    assert st.late_answers_dropped == 1 and st.completed == 2
    assert st.teachers["a:1"].live is False and st.teachers["a:1"].failovers == 1


def test_added_teacher_gets_work_at_once(net):
    with make_pool(net, ("a:1",), max_in_flight_per_teacher=1) as pool:
        pool.submit(SourceRequest(batch([0]), 0))
        pool.submit(SourceRequest(batch([1]), 1))  # queued: a is full
        assert len(net.pending()) == 1
        pool.set_endpoints(["a:1", "c:3"])
        (call,) = wait_for(lambda: net.pending("c:3"), what="the new teacher's first request")
        assert codec.to_torch(call.request.inputs[0])[0, 0].item() == 1.0
        assert pool.endpoints == ["a:1", "c:3"]


def test_no_teacher_available_names_endpoints_and_last_errors(net):
    net.default = grpc.StatusCode.UNAVAILABLE
    with make_pool(net, ("a:1", "b:2"), wait_timeout_s=0.5) as pool:
        t0 = time.monotonic()
        fut = pool.submit(SourceRequest(batch([1]), "0:0"))
        with pytest.raises(NoTeacherAvailableError) as ei:
            fut.result(timeout=5)
        elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 1.5
    msg = str(ei.value)
    assert "a:1" in msg and "b:2" in msg and "UNAVAILABLE" in msg and "wait_timeout_s=0.5" in msg
    assert set(ei.value.endpoints) == {"a:1", "b:2"}
    # the breaker kept probing with backoff, not hammering: a handful of calls, not thousands
    assert 2 <= len(net.calls) < 40


def test_no_endpoints_at_all_fails_after_wait_timeout(net):
    with make_pool(net, (), wait_timeout_s=0.3) as pool:
        fut = pool.submit(SourceRequest(batch([1]), "0:0"))
        with pytest.raises(NoTeacherAvailableError, match="no teacher endpoints"):
            fut.result(timeout=5)


def test_hung_teacher_cannot_outlast_wait_timeout(net):
    with make_pool(net, ("a:1",), wait_timeout_s=0.3, timeout_s=30.0) as pool:
        fut = pool.submit(SourceRequest(batch([1]), "0:0"))
        with pytest.raises(NoTeacherAvailableError):
            fut.result(timeout=5)
        assert net.calls[0].cancelled()  # the hung call was withdrawn


def test_breaker_probes_a_failed_teacher_after_backoff_and_recovers(net):
    with make_pool(net, ("a:1",), backoff=ExponentialBackoff(base_s=0.05, cap_s=0.05, jitter=0.0)) as pool:
        fut = pool.submit(SourceRequest(batch([3]), 0))
        net.pending()[0].fail()
        t_fail = time.monotonic()
        (probe,) = wait_for(lambda: net.pending("a:1"), what="probe after backoff")
        assert time.monotonic() - t_fail >= 0.04
        probe.succeed()
        assert fut.result(timeout=5)["logits"][0, 0].item() == 3.0
        assert pool.stats().teachers["a:1"].state == "closed"


def test_cancelling_a_future_withdraws_the_batch(net):
    with make_pool(net, ("a:1",), max_in_flight_per_teacher=1) as pool:
        f0 = pool.submit(SourceRequest(batch([0]), 0))
        f1 = pool.submit(SourceRequest(batch([1]), 1))  # queued
        assert f1.cancel() and f0.cancel()
        assert net.calls[0].cancelled()
        assert pool.stats().cancelled == 2
        f2 = pool.submit(SourceRequest(batch([2]), 2))  # the slot is free again, and b1 was never sent
        wait_for(lambda: len(net.calls) == 2)
        assert codec.to_torch(net.calls[1].request.inputs[0])[0, 0].item() == 2.0
        net.calls[1].succeed()
        assert f2.result(timeout=5)["logits"][0, 0].item() == 2.0


def test_close_resolves_pending_work_and_refuses_more(net):
    pool = make_pool(net, ("a:1",))
    fut = pool.submit(SourceRequest(batch([1]), 0))
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(SourceClosedError):
        fut.result(timeout=5)
    with pytest.raises(SourceClosedError):
        pool.submit(SourceRequest(batch([2]), 1))
    assert net.channels["a:1"].closed


def test_oversized_batch_is_a_clear_config_error(net):
    with make_pool(net, ("a:1",), max_message_bytes=1000) as pool:
        with pytest.raises(ConfigError, match="max_message_bytes"):
            pool.submit(SourceRequest({"": torch.zeros(64, 64)}, 0))


@pytest.mark.parametrize("bad", [[""], ["a b:1"], [3]])
def test_bad_endpoints_are_rejected(net, bad):
    with pytest.raises(ConfigError, match="host:port"):
        make_pool(net, bad)


@pytest.mark.parametrize("kwargs", [dict(timeout_s=0), dict(wait_timeout_s=-1), dict(max_in_flight_per_teacher=0),
                                    dict(latency_ewma_alpha=0.0), dict(keepalive_time_s=float("nan"))])
def test_pool_config_validates(kwargs):
    with pytest.raises(ConfigError):
        PoolConfig(**kwargs)


def test_concurrent_submitters_each_get_their_own_answer(net):
    """Several threads submitting while answers arrive on other threads: no batch lost or mixed up."""
    net.default = "ok"
    results: dict[int, float] = {}
    with make_pool(net, ("a:1", "b:2", "c:3"), max_in_flight_per_teacher=2) as pool:
        def worker(base):
            futs = {i: pool.submit(SourceRequest(batch([i]), i)) for i in range(base, base + 50)}
            for i, f in futs.items():
                results[i] = f.result(timeout=5)["logits"][0, 0].item()

        threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st = pool.stats()
    assert len(results) == 200 and all(v == float(i) for i, v in results.items())
    assert st.completed == 200 and sum(t.successes for t in st.teachers.values()) == 200


# ---------------------------------------------------------------- wire


@pytest.mark.parametrize("inputs", [
    {"": torch.randn(4, 3, 8, 8)},
    {"image": torch.randn(2, 3).t(), "mask": torch.ones(3, 2, dtype=torch.bool)},  # non-contiguous
    {"ids": torch.arange(6).reshape(2, 3), "h": torch.randn(2, 300).half(), "b": torch.randn(2, 2).bfloat16()},
    {"x": np.arange(12, dtype=">f4").reshape(3, 4)},  # big-endian ndarray: codec path
    {"x": np.zeros((0, 5), np.float32), "y": np.uint8(7) * np.ones((2,), np.uint8)},
])
def test_fast_serialization_is_byte_identical_to_the_codec(inputs):
    from student_client.outputs import output_requests
    from student_client.wire import serialize_request

    outs = output_requests([OutputSpec("logits", "probs", 2.0, 5, "float16")])
    blob = pb.PredictRequest(outputs=outs).SerializeToString()
    fast, size = serialize_request("r-1", inputs, blob)
    ref = pb.PredictRequest(request_id="r-1")
    for name, v in inputs.items():
        codec.encode(v, ref.inputs.add(), name=name)
    ref.outputs.extend(outs)
    assert pb.PredictRequest.FromString(fast) == ref
    assert size == sum(len(t.data) for t in ref.inputs)


# ------------------------------------------------------------ health probes (registry trust)


def test_unverified_teacher_gets_no_batch_until_its_health_check_answers_serving(net):
    net.default = "ok"
    net.health["b:2"] = "NOT_SERVING"
    pool = make_pool(net, endpoints=["a:1", "b:2"])
    try:
        results = [pool.submit(SourceRequest(batch([i]), i)) for i in range(12)]
        for f in results:
            f.result(timeout=5)
        assert net.calls_to("b:2") == [] and len(net.calls_to("a:1")) == 12
        st = pool.stats().teachers["b:2"]
        assert st.state.startswith("unverified") and "NOT_SERVING" in st.last_error
        # it is checked again (after the backoff) and used once it turns SERVING
        net.health["b:2"] = "SERVING"
        wait_for(lambda: pool.stats().teachers["b:2"].state == "closed", what="b:2 re-probed and verified")
        assert len([c for c in net.health_calls if c.endpoint == "b:2"]) >= 2
        more = [pool.submit(SourceRequest(batch([i]), i)) for i in range(12, 40)]
        for f in more:
            f.result(timeout=5)
        assert net.calls_to("b:2"), "a teacher that turned SERVING was never used"
    finally:
        pool.close()


def test_health_check_is_sent_at_once_with_probe_timeout_and_failures_back_off(net):
    net.default = "ok"
    net.health["a:1"] = grpc.StatusCode.UNAVAILABLE
    pool = make_pool(net, endpoints=["a:1"], probe_timeout_s=0.7, wait_timeout_s=0.5,
                     backoff=ExponentialBackoff(base_s=0.05, cap_s=0.4, jitter=0.0))
    try:
        first = net.health_calls[0]  # sent by the constructor, not later by the dispatcher
        assert first.timeout == 0.7 and first.request.service == "edistill.v1.Teacher"
        with pytest.raises(NoTeacherAvailableError, match="health check failed"):
            pool.submit(SourceRequest(batch([0]), 0)).result(timeout=5)
        assert net.calls_to("a:1") == []
        n = len(net.health_calls)
        assert 2 <= n <= 12, f"{n} health checks in ~0.5 s with a 0.05..0.4 s backoff"
    finally:
        pool.close()


def test_a_pending_health_check_blocks_neither_set_endpoints_nor_submit(net):
    net.default = "ok"
    net.health["slow:1"] = "hold"
    pool = make_pool(net, endpoints=["a:1"])
    try:
        pool.set_endpoints(["a:1", "slow:1"])  # returns although slow:1 never answers its probe
        assert pool.submit(SourceRequest(batch([1]), 1)).result(timeout=5)["logits"].shape == (1, 4)
        assert net.calls_to("slow:1") == [] and pool.stats().teachers["slow:1"].state.startswith("probing")
        probe = next(c for c in net.health_calls if c.endpoint == "slow:1")
        probe.fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        assert "DEADLINE_EXCEEDED" in pool.stats().teachers["slow:1"].last_error
    finally:
        pool.close()


def test_probe_timeout_none_uses_teachers_without_a_health_check(net):
    net.default = "ok"
    pool = make_pool(net, endpoints=["a:1"], probe_timeout_s=None)
    try:
        assert pool.submit(SourceRequest(batch([1]), 1)).result(timeout=5)
        assert net.health_calls == []
    finally:
        pool.close()
    with pytest.raises(ConfigError, match="probe_timeout_s"):
        PoolConfig(probe_timeout_s=0)


# ------------------------------------------------------------- hedging


@pytest.mark.parametrize("cancellable", [True, False])
def test_a_teacher_that_never_answers_is_hedged_and_the_batch_delivered_once(net, cancellable):
    net.cancellable = cancellable  # False: the frozen teacher's answer still arrives, late
    with make_pool(net, ("a:1", "b:2"), hedge_after_s=0.2) as pool:
        fut = pool.submit(SourceRequest(batch([7]), "0:7"))
        (stuck,) = net.pending()
        other = "b:2" if stuck.endpoint == "a:1" else "a:1"
        (hedge,) = wait_for(lambda: net.pending(other), what="the hedge to the other teacher")
        assert hedge.request.request_id == stuck.request.request_id  # the same request, sent again
        hedge.succeed()
        assert fut.result(timeout=5)["logits"][0, 0].item() == 7.0
        assert stuck.cancelled() is cancellable  # the losing call is withdrawn
        if not cancellable:
            stuck.succeed()  # the frozen teacher wakes up: its answer is dropped
        st = wait_for(lambda: (s := pool.stats()).late_answers_dropped == (0 if cancellable else 1) and s,
                      what="the late answer counted")
        assert len(net.calls) == 2
    assert st.hedges == 1 and st.completed == 1 and st.failed == 0
    assert st.teachers[stuck.endpoint].failures == {"HEDGED": 1}
    assert st.teachers[stuck.endpoint].state.startswith("open")  # no fresh batches for the stuck teacher
    assert st.teachers[other].successes == 1


def test_hedge_answer_losing_the_race_is_dropped(net):
    with make_pool(net, ("a:1", "b:2"), hedge_after_s=0.1) as pool:
        fut = pool.submit(SourceRequest(batch([3]), "0:3"))
        (slow,) = net.pending()
        other = "b:2" if slow.endpoint == "a:1" else "a:1"
        (hedge,) = wait_for(lambda: net.pending(other), what="the hedge")
        slow.succeed()  # the first teacher answers after all
        assert fut.result(timeout=5)["logits"][0, 0].item() == 3.0
        assert hedge.cancelled()
        st = pool.stats()
    assert st.hedges == 1 and st.completed == 1
    assert st.teachers[slow.endpoint].failures == {} and st.teachers[other].failures == {}


def test_auto_hedge_waits_for_latency_samples_then_hedges_a_stuck_teacher(net):
    with make_pool(net, ("a:1", "b:2"), hedge_min_s=0.2) as pool:  # hedge_after_s="auto"
        fut = pool.submit(SourceRequest(batch([1]), 1))
        (held,) = net.pending()
        time.sleep(0.5)  # no latency reference yet: no hedge, timeout_s applies
        assert len(net.calls) == 1 and pool.stats().hedges == 0
        held.succeed()
        fut.result(timeout=5)
        net.default = "ok"  # quick answers from every teacher give a p99 (threshold: hedge_min_s)
        for i in range(40):
            pool.submit(SourceRequest(batch([i]), f"w{i}")).result(timeout=5)
        # (a teacher with fewer than 8 answers borrows the others' threshold)
        net.default = "hold"
        fut = pool.submit(SourceRequest(batch([9]), 9))
        (stuck,) = net.pending()
        other = "b:2" if stuck.endpoint == "a:1" else "a:1"
        t0 = time.monotonic()
        net.mode[other] = "ok"
        assert fut.result(timeout=5)["logits"][0, 0].item() == 9.0  # hedged to the other teacher
        assert time.monotonic() - t0 >= 0.15
        st = pool.stats()
    assert st.hedges == 1 and st.teachers[stuck.endpoint].failures == {"HEDGED": 1}


def test_hedging_can_be_turned_off(net):
    with make_pool(net, ("a:1", "b:2"), hedge_after_s=None) as pool:
        pool.submit(SourceRequest(batch([1]), 1))
        time.sleep(0.4)
        assert len(net.calls) == 1 and pool.stats().hedges == 0


@pytest.mark.parametrize("value", ["soon", 0, -1.0, float("nan")])
def test_hedge_after_s_is_validated(value):
    with pytest.raises(ConfigError, match="hedge_after_s"):
        PoolConfig(hedge_after_s=value)
