"""The teacher side of the same-host transport: descriptors, per-peer limits, deadlines, tokens,
draining, the socket file and directory, the peer's uid, and the CLI flag.

Real in-process teachers and a raw client (``tests/helpers/local_raw.py``);
one real teacher process for the CLI flag.
"""

from __future__ import annotations

import collections
import os
import socket
import stat
import threading

import grpc
import pytest

from protos import codec, localwire
from protos.edistill.v1 import local_pb2
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig, zoo
from teacher_server import local as local_mod
from teacher_server.errors import ConfigError
from tests.helpers.local_raw import (  # noqa: F401  (fixtures: client, latency_teacher, runtime_dir)
    LOCAL_ONLY,
    OK,
    TIMEOUT_S,
    RawLocalClient,
    client,
    describe,
    ids_input,
    ids_of,
    latency_teacher,
    open_fds,
    runtime_dir,
    serving,
)
from tests.helpers.redis_proc import wait_until
from tests.helpers.teacher_proc import TeacherProcess

pytestmark = LOCAL_ONLY


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
        path = describe(t.address, metadata=(("authorization", "Bearer tok-a"),)).local_socket
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
            wait_until(lambda: t.server.batcher.in_flight == 1, timeout_s=10,
                       what="the first request to reach the model")
            stopping = threading.Thread(target=t.close, kwargs={"grace_s": 10.0})
            stopping.start()
            wait_until(lambda: t.server.local.draining, timeout_s=10, what="the drain to begin")
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
        assert describe(t.address).local_socket == ""
    assert "open to group or others" in caplog.text and "chmod 700" in caplog.text
    with pytest.raises(ConfigError, match="open to group or others"):
        local_mod.runtime_dir()


def test_explicit_path(tmp_path) -> None:
    path = str(tmp_path / "t.sock")
    with serving(zoo.latency(delay_ms=1), local_socket=path) as t:
        assert describe(t.address).local_socket == path
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
        d = describe(t.address)
        assert d.local_socket == "" and d.host_id == localwire.host_id()
