"""The teacher side of the same-host transport (protos/edistill/v1/local.proto): answers and protocol.

A raw client written against the protocol (``tests/helpers/local_raw.py``,
not the student's implementation) talks to real in-process teachers. Limits,
draining, socket files and peer checks: ``test_local_teacher_limits.py``.
"""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
import torch

from protos import codec, localwire
from protos.edistill.v1 import local_pb2
from protos.edistill.v1 import teacher_pb2 as pb
from teacher_server import local as local_mod
from tests.helpers.local_raw import (  # noqa: F401  (fixtures: client, latency_teacher, runtime_dir, two_input_teacher)
    INVALID_ARGUMENT,
    LOCAL_ONLY,
    OK,
    RawLocalClient,
    Wide,
    client,
    describe,
    grpc_predict,
    ids_input,
    ids_of,
    latency_teacher,
    memfd,
    open_fds,
    runtime_dir,
    serving,
    two_input_teacher,
)
from tests.helpers.redis_proc import wait_until

pytestmark = LOCAL_ONLY


def test_describe_names_the_socket_and_host(latency_teacher, runtime_dir) -> None:
    d = describe(latency_teacher.address)
    assert d.local_socket == latency_teacher.server.local_socket
    assert os.path.isabs(d.local_socket) and os.path.dirname(d.local_socket) == runtime_dir
    assert os.path.basename(d.local_socket) == f"teacher-{d.teacher_id}.sock"
    assert d.host_id == localwire.host_id() != ""


def test_welcome_names_the_teacher(latency_teacher) -> None:
    with RawLocalClient(latency_teacher.server.local_socket) as c:
        w = c.hello()
    assert (w.code, w.version, w.teacher_id) == (OK, 1, latency_teacher.server.teacher_id)


@pytest.mark.parametrize("separate_fds", [False, True], ids=["one-memfd", "memfd-per-input"])
def test_answer_equals_the_model_and_the_grpc_answer(two_input_teacher, separate_fds: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8), dtype=np.float32)
    ids = rng.integers(0, 100, (3, 3), dtype=np.int64)
    module = two_input_teacher.model.module
    with torch.inference_mode():
        expected = module(torch.from_numpy(x), torch.from_numpy(ids)).numpy()
    with RawLocalClient(two_input_teacher.server.local_socket) as c:
        assert c.hello().code == OK
        reply = c.predict({"ids": ids, "x": x}, request_id="req-42", separate_fds=separate_fds, offset=128)
    assert (reply.code, reply.details) == (OK, "")
    resp = reply.response
    assert resp.request_id == "req-42"
    np.testing.assert_allclose(codec.to_numpy(resp.outputs[0].values), expected, rtol=1e-6, atol=1e-6)
    via_grpc = grpc_predict(two_input_teacher.address, {"x": x, "ids": ids}, request_id="req-42")
    for field in ("request_id", "teacher_id", "model_name", "model_version"):
        assert getattr(resp, field) == getattr(via_grpc, field)
    assert (resp.model_name, resp.model_version, resp.teacher_id) == ("m", "3", two_input_teacher.server.teacher_id)
    assert resp.outputs[0].name == via_grpc.outputs[0].name == "logits"
    assert list(resp.outputs[0].dense_shape) == list(via_grpc.outputs[0].dense_shape) == [3, 5]
    np.testing.assert_array_equal(codec.to_numpy(resp.outputs[0].values), codec.to_numpy(via_grpc.outputs[0].values))
    assert resp.batch_size == 3 and resp.compute_ms > 0


def test_output_requests_apply_as_on_grpc(client) -> None:
    want = pb.OutputRequest(name="logits", transform=pb.PROBS, temperature=2.0, top_k=3, dtype=pb.FLOAT16)
    reply = client.predict(ids_input([5]), outputs=[want])
    assert reply.code == OK
    out = reply.response.outputs[0]
    assert (out.transform, out.top_k, out.values.dtype) == (pb.PROBS, 3, pb.FLOAT16)
    assert codec.to_numpy(out.indices).tolist() == [[9, 8, 7]]


def _bad_cases() -> dict[str, tuple[dict[str, np.ndarray], str]]:
    return {
        "wrong-shape": ({"input": np.zeros((1, 5), np.float32)}, "does not match [B, 4]"),
        "wrong-dtype": ({"input": np.zeros((1, 4), np.float16)}, "dtype float16, expected float32"),
        "unknown-input": ({"pixels": np.zeros((1, 4), np.float32)}, "unknown input 'pixels'"),
        "over-max-batch": (ids_input(range(17)), "exceeds this teacher's max_batch_size 16"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_invalid_request_gets_the_grpc_message(latency_teacher, client, case: str) -> None:
    arrays, needle = _bad_cases()[case]
    reply = client.predict(arrays, request_id="bad")
    with pytest.raises(grpc.RpcError) as info:
        grpc_predict(latency_teacher.address, arrays)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.code == INVALID_ARGUMENT and reply.details == info.value.details()
    assert needle in reply.details
    assert not reply.HasField("response")
    assert ids_of(client.predict(ids_input([7]))) == [7]  # the connection still serves


def _set(field: str, value):
    def tamper(req: local_pb2.LocalRequest) -> None:
        setattr(req.inputs[0], field, value)
    return tamper


@pytest.mark.parametrize("tamper,needle", [
    (_set("offset", 1 << 20), "needs 32 bytes from offset 1048576, but descriptor #0 holds 32 bytes"),
    (_set("offset", 8), "needs 32 bytes from offset 8, but descriptor #0 holds 32 bytes"),
    (_set("fd_index", 1), "fd_index 1, but the request carries 1 descriptor(s)"),
    (lambda req: req.inputs[0].shape.__setitem__(0, -2), "batch is empty"),
    (lambda req: setattr(req, "timeout_s", -1.0), "timeout_s must be a finite number"),
], ids=["offset-beyond-memory", "tensor-past-the-end", "fd-index", "negative-batch", "negative-timeout"])
def test_bad_shared_memory_reference_is_invalid_argument(client, tamper, needle: str) -> None:
    reply = client.predict(ids_input([1, 2]), tamper=tamper)
    assert reply.code == INVALID_ARGUMENT, reply.details
    assert needle in reply.details
    assert ids_of(client.predict(ids_input([3]))) == [3]


def test_descriptor_that_is_not_shared_memory_is_invalid_argument(client) -> None:
    r, w = os.pipe()
    try:
        req = local_pb2.LocalRequest(call_id=99, fd_count=1)
        req.inputs.add(name="input", dtype=pb.FLOAT32, shape=[1, 4], fd_index=0)
        client.send_frame(req.SerializeToString(), [r])
    finally:
        os.close(r)
        os.close(w)
    reply = client.recv_reply()
    assert (reply.call_id, reply.code) == (99, INVALID_ARGUMENT)
    assert "is not shared memory" in reply.details


def test_many_requests_on_one_connection_are_all_answered_and_batched(latency_teacher, client) -> None:
    before = latency_teacher.server.batcher.stats()
    calls = {client.send_request(ids_input([100 * k, 100 * k + 1]), request_id=f"c{k}"): k for k in range(24)}
    replies = [client.recv_reply() for _ in calls]
    assert sorted(r.call_id for r in replies) == sorted(calls)
    for r in replies:
        k = calls[r.call_id]
        assert r.code == OK and r.response.request_id == f"c{k}"
        assert ids_of(r) == [100 * k, 100 * k + 1]  # each answer belongs to its own request
    assert max(r.response.batch_size for r in replies) > 2  # several requests shared a forward pass
    after = latency_teacher.server.batcher.stats()
    assert after.requests - before.requests == 24 and after.batches - before.batches < 24


def test_large_replies_arrive_whole_and_in_completion_order(runtime_dir) -> None:
    # Each reply is ~1.6 MB: the teacher's sends are partial and continue when
    # the socket drains; frames must never interleave.
    with serving(Wide(), max_queue_delay_ms=0) as t:
        with RawLocalClient(t.server.local_socket) as c:
            assert c.hello().code == OK
            calls = {c.send_request(ids_input([10 * k, 10 * k + 1])): k for k in range(6)}
            # All answered before the client reads one: the replies wait in the teacher's write buffer.
            wait_until(lambda: t.server.local.in_flight == 0, timeout_s=10, what="the teacher to answer")
            for _ in range(len(calls)):
                reply = c.recv_reply()
                k = calls.pop(reply.call_id)
                values = codec.to_numpy(reply.response.outputs[0].values)
                assert values.shape == (2, 200_000)
                assert values[:, 0].tolist() == [10 * k, 10 * k + 1] and values[1, -1] == 10 * k + 1 + 199_999


def test_local_requests_are_counted_in_metrics(latency_teacher, client) -> None:
    def count(code: str) -> float:
        for line in latency_teacher.server.metrics.text().splitlines():
            if line.startswith("edistill_teacher_requests_total{") and 'method="LocalPredict"' in line \
                    and f'code="{code}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    client.predict(ids_input([1]))
    client.predict({"input": np.zeros((1, 5), np.float32)})
    assert (count("OK"), count("INVALID_ARGUMENT")) == (ok + 1, bad + 1)


def test_garbage_frame_closes_only_that_connection(latency_teacher, client) -> None:
    with RawLocalClient(latency_teacher.server.local_socket) as bad:
        assert bad.hello().code == OK
        bad.sock.sendall(localwire.encode_frame(b"\xff\xff\xff\xff garbage"))
        assert bad.at_eof()
    assert ids_of(client.predict(ids_input([11]))) == [11]
    with RawLocalClient(latency_teacher.server.local_socket) as fresh:
        assert fresh.hello().code == OK
        assert ids_of(fresh.predict(ids_input([12]))) == [12]


@pytest.mark.parametrize("abuse", ["garbage-hello", "oversized-frame", "fd-count-over-max", "fewer-fds-than-declared",
                                   "more-fds-than-declared", "fds-with-hello"])
def test_protocol_violation_closes_the_connection_without_leaking_fds(latency_teacher, client, abuse: str) -> None:
    before = open_fds()
    with RawLocalClient(latency_teacher.server.local_socket) as bad:
        if abuse == "garbage-hello":
            bad.sock.sendall(localwire.encode_frame(b"\x0a\xff"))
        elif abuse == "fds-with-hello":
            fd = memfd(b"x" * 16)
            bad.send_frame(local_pb2.LocalHello(version=1).SerializeToString(), [fd])
            os.close(fd)
        else:
            assert bad.hello().code == OK
            if abuse == "oversized-frame":
                bad.sock.sendall(localwire.HEADER.pack(latency_teacher.config.max_message_bytes + 1))
            elif abuse == "fd-count-over-max":
                bad.send_request(ids_input([1]), tamper=lambda r: setattr(r, "fd_count", localwire.MAX_FDS_PER_FRAME + 1))
            elif abuse == "fewer-fds-than-declared":
                bad.send_request(ids_input([1]), tamper=lambda r: setattr(r, "fd_count", 2))
            else:
                bad.send_request(ids_input([1]), tamper=lambda r: setattr(r, "fd_count", 1), separate_fds=True,
                                 extra_fds=1)
        assert bad.at_eof()
    # Every descriptor the teacher received on the closed connection was closed
    # (in-process server, so its descriptors are this process's; the client's
    # memfds were closed by send_request, its socket by the `with`).
    wait_until(lambda: open_fds() <= before, timeout_s=10, what=f"the descriptors back to {before} (leaked)")
    assert ids_of(client.predict(ids_input([5]))) == [5]  # the server, and other connections, go on


def test_wrong_version_is_refused(latency_teacher) -> None:
    with RawLocalClient(latency_teacher.server.local_socket) as c:
        w = c.hello(version=2)
        assert w.code == grpc.StatusCode.UNIMPLEMENTED.value[0] and "version 1" in w.details
        assert c.at_eof()


def test_no_hello_in_time_closes(latency_teacher) -> None:
    latency_teacher.server.local.hello_timeout_s = 0.2
    try:
        with RawLocalClient(latency_teacher.server.local_socket) as c:
            assert c.at_eof()
    finally:
        latency_teacher.server.local.hello_timeout_s = local_mod.HELLO_TIMEOUT_S


def test_requests_may_follow_the_hello_without_waiting_for_the_welcome(latency_teacher) -> None:
    # The kernel may hand the teacher the hello and the first request (with its
    # descriptors) in one read.
    with RawLocalClient(latency_teacher.server.local_socket) as c:
        c.send_frame(local_pb2.LocalHello(version=1).SerializeToString())
        first = c.send_request(ids_input([77]))
        second = c.send_request(ids_input([78]), separate_fds=True)
        assert local_pb2.LocalWelcome.FromString(c.recv_frame()).code == OK
        replies = {r.call_id: ids_of(r) for r in (c.recv_reply(), c.recv_reply())}
        assert replies == {first: [77], second: [78]}

