"""A same-host teacher whose socket this student cannot use is used over gRPC (README, Concepts).

"Teachers on other machines, other users and containers keep using gRPC": a
real teacher (in-process: real gRPC server, real Unix socket) offers its socket
in Describe; the student declines it when the teacher reports another host id,
and falls back to gRPC when the socket refuses it because it runs as another
user. Playing another user needs two uids, so the teacher's listener is told to
expect another one (``LocalListener.peer_uid``, its SO_PEERCRED check), which
refuses this process's connection exactly as it would refuse another user's;
``test_local_teacher_limits.py::test_other_uid_is_refused`` checks that check
with a real second uid (as root). A control pool in each test shows the socket
was usable otherwise, so the refusal alone kept the student on gRPC.
"""

from __future__ import annotations

import logging
import os

import torch

from student_client import PoolConfig, SourceRequest, TeacherPool
from student_client import local as student_local
from teacher_server import zoo
from tests.helpers.local_raw import LOCAL_ONLY, runtime_dir, serving  # noqa: F401  (runtime_dir: fixture)
from tests.helpers.redis_proc import wait_until

pytestmark = LOCAL_ONLY


def _answer(pool: TeacherPool, i: int) -> None:
    x = torch.zeros(4, 4)
    x[:, 0] = torch.arange(4 * i, 4 * i + 4, dtype=torch.float32)
    out = pool.submit(SourceRequest({"input": x}, i)).result(timeout=30)["logits"]
    assert torch.equal(out[:, 0], x[:, 0]), "an answer for another batch"


def _until_logged(pool: TeacherPool, caplog, needle: str) -> None:
    """Send batches until the pool has decided about the teacher's socket (its log says ``needle``)."""
    def decided() -> bool:
        _answer(pool, 0)
        return needle in caplog.text
    wait_until(decided, timeout_s=30, interval_s=0.05, what=f"the log line {needle!r}")


def _control_uses_the_socket(address: str) -> None:
    """Control: without the mismatch, a pool of this process reaches the teacher over its socket."""
    with TeacherPool([address], config=PoolConfig(local_transport="auto")) as pool:
        wait_until(lambda: _answer(pool, 1) or pool.stats().teachers[address].transport == "local",
                   timeout_s=30, interval_s=0.05, what="the control pool on the local socket")


def test_a_teacher_reporting_another_host_id_is_used_over_grpc(runtime_dir, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="student_client.transports")
    with serving(zoo.latency(delay_ms=1)) as t:
        assert t.server.local_socket  # it offers a socket...
        with monkeypatch.context() as m:
            m.setattr(student_local, "_HOST_ID", "another-boot-id/another-host")  # ...to a student "elsewhere"
            with TeacherPool([t.address], config=PoolConfig(local_transport="auto")) as pool:
                _until_logged(pool, caplog, "local transport not used, it runs on another host")
                for i in range(10):
                    _answer(pool, i)
                ts = pool.stats().teachers[t.address]
                assert ts.transport == "grpc" and ts.successes >= 11 and ts.failures == {}
                assert t.server.local.connections == 0  # it never even tried the socket
        _control_uses_the_socket(t.address)


def test_a_socket_refusing_this_user_leaves_the_student_on_grpc(runtime_dir, caplog):
    caplog.set_level(logging.INFO)
    with serving(zoo.latency(delay_ms=1)) as t:
        t.server.local.peer_uid = os.geteuid() + 1  # the teacher "runs as another user"
        with TeacherPool([t.address], config=PoolConfig(local_transport="auto")) as pool:
            _until_logged(pool, caplog, f"cannot use its local socket {t.server.local_socket}")
            for i in range(10):
                _answer(pool, i)
            ts = pool.stats().teachers[t.address]
            assert ts.transport == "grpc" and ts.successes >= 11 and ts.failures == {}
        assert f"refused pid {os.getpid()} running as uid {os.geteuid()}" in caplog.text  # the teacher's side
        t.server.local.peer_uid = os.geteuid()
        _control_uses_the_socket(t.address)
