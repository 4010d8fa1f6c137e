"""The teacher side of the same-host transport (protos/edistill/v1/local.proto).

A raw client written here against the protocol (not the student's
implementation): Unix socket, LocalHello, LocalRequest frames whose tensor
bytes live in memfds passed with SCM_RIGHTS. Real in-process teachers, one
real teacher process for the CLI flag.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import stat
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from protos import codec, localwire
from protos.edistill.v1 import local_pb2
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig, zoo
from teacher_server import local as local_mod
from teacher_server.errors import ConfigError
from teacher_server.signature import TensorSpec
from tests.helpers.teacher_proc import TeacherProcess

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "memfd_create") or not hasattr(socket, "SO_PEERCRED"),
                       reason="the local transport is Linux-only (memfd, SO_PEERCRED)"),
    # teacher_server.local ignores torch's "not writable" warning with a filter
    # added at import, which pytest's per-test warning capture does not keep.
    pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning"),
]

TIMEOUT_S = 30.0
OK = grpc.StatusCode.OK.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
WIRE = {np.dtype("float32"): pb.FLOAT32, np.dtype("float16"): pb.FLOAT16, np.dtype("int64"): pb.INT64}


# ------------------------------------------------------------------ raw client


class RawLocalClient:
    """A minimal student side of local.proto, for tests: one blocking Unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(path)
        self.frames = localwire.FrameBuffer(1 << 30)
        self._ready: collections.deque[bytes] = collections.deque()
        self._next_call = 0

    def __enter__(self) -> "RawLocalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_frame(self, payload: bytes, fds=()) -> None:
        socket.send_fds(self.sock, [localwire.encode_frame(payload)], list(fds))

    def recv_frame(self) -> bytes | None:
        """The next frame's payload, or None at EOF."""
        while not self._ready:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.frames.feed(data)
            self._ready.extend(self.frames.frames())  # drain the generator: it compacts its buffer at the end
        return self._ready.popleft()

    def hello(self, *, version: int = 1, token: str = "") -> local_pb2.LocalWelcome:
        self.send_frame(local_pb2.LocalHello(version=version, token=token).SerializeToString())
        frame = self.recv_frame()
        assert frame is not None, "teacher closed the connection instead of answering LocalHello"
        return local_pb2.LocalWelcome.FromString(frame)

    def send_request(self, arrays: dict[str, np.ndarray], *, request_id: str = "", outputs=(), timeout_s: float = 0.0,
                     offset: int = 0, separate_fds: bool = False, tamper=None, extra_fds: int = 0) -> int:
        """Put ``arrays`` in memfd(s) and send one LocalRequest; return its call id.

        ``offset``: where the first tensor starts in its memfd. ``tamper(req)``
        may edit the request (bad shapes, offsets) before it is sent.
        ``extra_fds``: that many more memfds, not counted in fd_count.
        """
        self._next_call += 1
        call_id = self._next_call
        req = local_pb2.LocalRequest(call_id=call_id, request_id=request_id, outputs=list(outputs),
                                     timeout_s=timeout_s)
        fds = []
        try:
            if separate_fds:
                for i, (name, arr) in enumerate(arrays.items()):
                    fds.append(_memfd(b"\x00" * offset + arr.tobytes()))
                    req.inputs.add(name=name, dtype=WIRE[arr.dtype], shape=arr.shape, fd_index=i, offset=offset)
            else:
                blob = bytearray(b"\x00" * offset)
                for name, arr in arrays.items():
                    blob += b"\x00" * (-len(blob) % 64)  # 64-byte aligned, like a tensor storage
                    req.inputs.add(name=name, dtype=WIRE[arr.dtype], shape=arr.shape, fd_index=0, offset=len(blob))
                    blob += arr.tobytes()
                fds.append(_memfd(bytes(blob)))
            req.fd_count = len(fds)
            fds += [_memfd(b"extra") for _ in range(extra_fds)]
            if tamper is not None:
                tamper(req)
            self.send_frame(req.SerializeToString(), fds)
        finally:
            for fd in fds:  # the teacher got its own copies
                os.close(fd)
        return call_id

    def recv_reply(self) -> local_pb2.LocalReply:
        frame = self.recv_frame()
        assert frame is not None, "teacher closed the connection instead of replying"
        return local_pb2.LocalReply.FromString(frame)

    def predict(self, arrays: dict[str, np.ndarray], **kwargs) -> local_pb2.LocalReply:
        call_id = self.send_request(arrays, **kwargs)
        reply = self.recv_reply()
        assert reply.call_id == call_id
        return reply

    def at_eof(self) -> bool:
        """True once the teacher has closed this connection, skipping frames sent before (waits up to TIMEOUT_S)."""
        try:
            while self.recv_frame() is not None:
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        return True  # a connection left open ends in socket.timeout instead


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("edistill-test")
    os.write(fd, data)
    return fd


def ids_input(ids, features: int = 4) -> dict[str, np.ndarray]:
    """Latency-teacher input: column 0 of each row is its id."""
    x = np.zeros((len(ids), features), np.float32)
    x[:, 0] = ids
    return {"input": x}


def ids_of(reply: local_pb2.LocalReply) -> list[float]:
    return codec.to_numpy(reply.response.outputs[0].values)[:, 0].tolist()


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------- models


class TwoInputs(nn.Module):
    """x (B, 8) float32 and ids (B, 3) int64 -> logits (B, 5)."""

    edistill_inputs = [TensorSpec("x", torch.float32, (8,)), TensorSpec("ids", torch.int64, (3,))]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + ids.sum(-1, keepdim=True).float()  # (B, 5)


class Wide(nn.Module):
    """x (B, 4) -> (B, 200_000): 800 KB of output per row, far more than a socket buffer holds."""

    edistill_inputs = [TensorSpec("input", torch.float32, (4,))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + torch.arange(200_000, dtype=torch.float32)  # (B, 200_000)


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory) -> str:
    """EDISTILL_RUNTIME_DIR for this module's teachers: a fresh directory (created by the teacher)."""
    path = str(tmp_path_factory.mktemp("rt") / "edistill")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(local_mod.RUNTIME_DIR_ENV, path)
        yield path


@contextlib.contextmanager
def serving(model: nn.Module, **config):
    config.setdefault("max_queue_delay_ms", 20)
    config.setdefault("max_batch_size", 16)
    with BackgroundTeacher(TeacherConfig(model_name="m", model_version="3", **config),
                           LoadedModel.from_module(model)) as teacher:
        yield teacher


@pytest.fixture(scope="module")
def latency_teacher(runtime_dir):
    """Latency teacher (20 ms per forward) that waits up to 20 ms to fill a batch of <= 16."""
    with serving(zoo.latency(delay_ms=20), metrics_port=0) as teacher:
        yield teacher


@pytest.fixture(scope="module")
def two_input_teacher(runtime_dir):
    with serving(TwoInputs(), max_queue_delay_ms=1) as teacher:
        yield teacher


@pytest.fixture
def client(latency_teacher):
    with RawLocalClient(latency_teacher.server.local_socket) as c:
        assert c.hello().code == OK
        yield c


def _describe(address: str, metadata=None) -> pb.DescribeResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.TeacherStub(ch).Describe(pb.DescribeRequest(), timeout=TIMEOUT_S, metadata=metadata)


def _grpc_predict(address: str, arrays: dict[str, np.ndarray], request_id: str = "") -> pb.PredictResponse:
    req = pb.PredictRequest(request_id=request_id)
    for name, arr in arrays.items():
        codec.encode(arr, req.inputs.add(), name=name)
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.TeacherStub(ch).Predict(req, timeout=TIMEOUT_S)


# ---------------------------------------------------------------------- tests


def test_describe_names_the_socket_and_host(latency_teacher, runtime_dir) -> None:
    d = _describe(latency_teacher.address)
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
    via_grpc = _grpc_predict(two_input_teacher.address, {"x": x, "ids": ids}, request_id="req-42")
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
        _grpc_predict(latency_teacher.address, arrays)
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
            _wait_for(lambda: t.server.local.in_flight == 0, "the teacher did not answer")
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
            fd = _memfd(b"x" * 16)
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
    _wait_for(lambda: open_fds() <= before, f"descriptors leaked: {before} before, {open_fds()} after")
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


def test_descriptors_are_not_leaked(latency_teacher, client) -> None:
    for k in range(5):  # warm up whatever the first requests allocate
        client.predict(ids_input([k]))
    with grpc.insecure_channel(latency_teacher.address) as ch:
        stub = pb_grpc.TeacherStub(ch)
        stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)  # connect before counting
        before = open_fds()
        n = 0
        for _ in range(20):  # 200 requests, 10 in flight at a time
            calls = [client.send_request(ids_input([n + i])) for i in range(10)]
            replies = {r.call_id: r for r in (client.recv_reply() for _ in calls)}
            assert all(replies[c].code == OK for c in calls)
            n += 10
        # The batcher drops its last batch (and so the last mappings, each
        # holding a descriptor) when it forms the next one: one more request.
        req = pb.PredictRequest()
        codec.encode(ids_input([0])["input"], req.inputs.add(), name="input")
        stub.Predict(req, timeout=TIMEOUT_S)
        after = open_fds()
    assert after <= before, f"{after - before} descriptor(s) leaked over 200 local requests"


def test_per_connection_limit(runtime_dir) -> None:
    with serving(zoo.latency(delay_ms=200), max_batch_size=1, max_queued_per_peer=2) as t:
        with RawLocalClient(t.server.local_socket) as c:
            assert c.hello().code == OK
            for k in range(4):
                c.send_request(ids_input([k]))
            replies = [c.recv_reply() for _ in range(4)]
        codes = collections.Counter(r.code for r in replies)
        assert codes == {OK: 2, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: 2}
        refused = next(r for r in replies if r.code != OK)
        assert "max_queued_per_peer 2" in refused.details
        # A second connection has a quota of its own.
        with RawLocalClient(t.server.local_socket) as other:
            assert other.hello().code == OK
            assert other.predict(ids_input([9])).code == OK


def test_deadline_skips_work_still_queued(runtime_dir) -> None:
    with serving(zoo.latency(delay_ms=500), max_batch_size=1, max_queue_delay_ms=0) as t:
        module = t.model.module
        with RawLocalClient(t.server.local_socket) as c:
            assert c.hello().code == OK
            calls_before = module.forward_calls
            slow = c.send_request(ids_input([1]))  # occupies the model for 500 ms
            late = c.send_request(ids_input([2]), timeout_s=0.05)  # queued behind it, expires there
            replies = {r.call_id: r for r in (c.recv_reply(), c.recv_reply())}
            assert replies[slow].code == OK
            assert replies[late].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert "timeout_s" in replies[late].details
            # The queued request was never computed: one forward pass, not two.
            assert c.predict(ids_input([3])).code == OK  # the batcher has moved past the skipped item
            assert module.forward_calls - calls_before == 2


def test_token_is_checked_like_grpc_metadata(runtime_dir) -> None:
    with serving(zoo.latency(delay_ms=1), auth_tokens=("tok-a", "tok-b")) as t:
        path = _describe(t.address, metadata=(("authorization", "Bearer tok-a"),)).local_socket
        assert path == t.server.local_socket
        for token, needle in (("", "carries no token"), ("nope", "not accepted")):
            with RawLocalClient(path) as c:
                w = c.hello(token=token)
                assert w.code == grpc.StatusCode.UNAUTHENTICATED.value[0] and needle in w.details
                assert "nope" not in w.details  # never echoes what was sent
                assert c.at_eof()
        with RawLocalClient(path) as c:
            assert c.hello(token="tok-b").code == OK
            assert ids_of(c.predict(ids_input([4]))) == [4]


def test_socket_file_is_private_and_removed_on_stop(runtime_dir) -> None:
    with serving(zoo.latency(delay_ms=1)) as t:
        path = t.server.local_socket
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        d = os.lstat(os.path.dirname(path))
        assert stat.S_IMODE(d.st_mode) == 0o700 and d.st_uid == os.geteuid()
    assert not os.path.exists(path)


def test_drain_finishes_in_flight_requests_then_closes(runtime_dir) -> None:
    t = BackgroundTeacher(TeacherConfig(max_batch_size=1, max_queue_delay_ms=0, grace_s=10),
                          LoadedModel.from_module(zoo.latency(delay_ms=300))).start()
    try:
        path = t.server.local_socket
        with RawLocalClient(path) as c:
            assert c.hello().code == OK
            first = c.send_request(ids_input([1]))
            _wait_for(lambda: t.server.batcher.in_flight == 1, "the first request never reached the model")
            stopping = threading.Thread(target=t.close, kwargs={"grace_s": 10.0})
            stopping.start()
            _wait_for(lambda: t.server.local.draining, "the drain never began")
            assert not os.path.exists(path)  # no new connections since health turned NOT_SERVING
            late = c.send_request(ids_input([2]))
            replies = {r.call_id: r for r in (c.recv_reply(), c.recv_reply())}
            assert replies[first].code == OK and ids_of(replies[first]) == [1]  # in flight: finished
            assert replies[late].code == grpc.StatusCode.UNAVAILABLE.value[0]  # after drain began: refused
            assert c.at_eof()
            stopping.join(TIMEOUT_S)
        with pytest.raises(OSError):
            RawLocalClient(path)
    finally:
        t.close()


def test_auto_skips_a_directory_open_to_others(tmp_path, monkeypatch, caplog) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv(local_mod.RUNTIME_DIR_ENV, str(shared))
    with serving(zoo.latency(delay_ms=1)) as t:
        assert t.server.local_socket is None
        assert _describe(t.address).local_socket == ""
    assert "open to group or others" in caplog.text and "chmod 700" in caplog.text
    with pytest.raises(ConfigError, match="open to group or others"):
        local_mod.runtime_dir()


def test_explicit_path(tmp_path) -> None:
    path = str(tmp_path / "t.sock")
    with serving(zoo.latency(delay_ms=1), local_socket=path) as t:
        assert _describe(t.address).local_socket == path
        with RawLocalClient(path) as c:
            assert c.hello().code == OK
        # A second teacher on a live socket fails loudly instead of stealing it.
        with pytest.raises(ConfigError, match="another process is serving"):
            with serving(zoo.latency(delay_ms=1), local_socket=path):
                pass
        assert os.path.exists(path)
    assert not os.path.exists(path)
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(ConfigError, match="is not a socket"):
        with serving(zoo.latency(delay_ms=1), local_socket=str(tmp_path / "plain")):
            pass


def test_stale_socket_file_is_replaced(tmp_path) -> None:
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: what a SIGKILLed teacher leaves
    with serving(zoo.latency(delay_ms=1), local_socket=path) as t:
        with RawLocalClient(path) as c:
            assert c.hello().teacher_id == t.server.teacher_id


@pytest.mark.parametrize("value,expected", [("off", "off"), ("OFF", "off"), ("", "off"), ("none", "off"),
                                            ("auto", "auto"), ("/run/t.sock", "/run/t.sock")])
def test_config_values(value: str, expected: str) -> None:
    assert TeacherConfig(local_socket=value).local_socket == expected


def test_config_rejects_a_path_too_long_for_af_unix() -> None:
    with pytest.raises(ConfigError, match="107-byte limit"):
        TeacherConfig(local_socket="/tmp/" + "x" * 120 + ".sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_other_uid_is_refused() -> None:
    # Past the 0600 file (opened up here on purpose), SO_PEERCRED still refuses another uid.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        path = os.path.join(d, "open.sock")
        with serving(zoo.latency(delay_ms=1), local_socket=path):
            os.chmod(path, 0o666)
            assert _connect_as(65534, path) == "EOF"
            assert _connect_as(os.geteuid(), path) == "ANSWERED"


def _connect_as(uid: int, path: str) -> str:
    """Fork, switch to ``uid``, send a LocalHello; "EOF" when the teacher hangs up, "ANSWERED" otherwise."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: raw syscalls only, then _exit (no gRPC, no torch, no logging after fork)
        result = b"ERROR"
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(TIMEOUT_S)
            s.connect(path)
            try:  # the teacher may hang up before the hello is even written
                s.sendall(localwire.encode_frame(local_pb2.LocalHello(version=1).SerializeToString()))
                result = b"ANSWERED" if s.recv(100) else b"EOF"
            except (ConnectionResetError, BrokenPipeError):
                result = b"EOF"
        except BaseException as exc:  # noqa: B036 -- reported to the parent
            result = f"ERROR {exc!r}".encode()
        finally:
            os.write(w, result)
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


def test_cli_flag_off_gives_empty_describe() -> None:
    with TeacherProcess("teacher_server.zoo:latency", "--local-socket", "off") as t:
        d = _describe(t.address)
        assert d.local_socket == "" and d.host_id == localwire.host_id()


def _wait_for(cond, message: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)
