"""Unit tests of TeacherPool's scheduling, without gRPC (fake teachers: tests/helpers/fake_teachers.py).

Every interleaving is deterministic: the test completes each fake call by hand.
"""

from __future__ import annotations

import threading
import time

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
    TeacherRequestError,
    TeacherResponseError,
    TopK,
)
from tests.helpers.fake_teachers import (  # noqa: F401  (net is a fixture)
    batch,
    FakeNet,
    echo_response,
    make_pool,
    net,
    wait_for,
)


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
    assert st.teachers[first.endpoint].state.startswith("failing") and st.teachers[first.endpoint].breaker == "open"


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
    assert elapsed >= 0.5  # it waited wait_timeout_s (named in the message below) before giving up
    msg = str(ei.value)
    assert "a:1" in msg and "b:2" in msg and "UNAVAILABLE" in msg and "wait_timeout_s=0.5" in msg
    assert set(ei.value.endpoints) == {"a:1", "b:2"}
    # the breaker kept probing with backoff (>= 0.05 s apart per teacher), not hammering
    assert 2 <= len(net.calls) <= 2 * (1 + elapsed / 0.05)


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
        assert pool.stats().teachers["a:1"].state == "healthy"


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
