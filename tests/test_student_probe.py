"""Registry trust: a student sends a teacher data only once it passed a health check.

Real in-process teachers (BackgroundTeacher) on loopback, a real embedded
Redis, real TLS certificates (tests/helpers/certs.py). A registry entry that
points at a closed port or at a TCP listener that never speaks HTTP/2 must
cost one probe, never a batch; a teacher presenting the wrong certificate is
never used; a NOT_SERVING teacher is used only once it turns SERVING.
"""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch
from grpc_health.v1 import health_pb2

from registry import EmbeddedRedis, TeacherRecord, TeacherRegistration
from student_client import DistillReader, PoolConfig, SourceRequest
from student_client.credentials import TeacherCredentials
from student_client.pool import TeacherPool
from teacher_server import zoo
from teacher_server.config import TeacherConfig
from teacher_server.inprocess import BackgroundTeacher
from teacher_server.model import LoadedModel
from teacher_server.server import SERVICE_NAME
from tests.helpers.certs import TestCA
from tests.helpers.redis_proc import wait_until

SERVICE = "probe-test"


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel.from_module(zoo.mlp(in_features=8, hidden=16, num_classes=4))


def _closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def _silent_listener():
    """A TCP port that completes the TCP handshake (kernel backlog) but never speaks HTTP/2."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def _register(url: str, endpoint: str, teacher_id: str) -> TeacherRegistration:
    record = TeacherRecord(endpoint=endpoint, service=SERVICE, model_name="mlp", teacher_id=teacher_id)
    reg = TeacherRegistration(url, SERVICE, record, heartbeat_s=0.5, ttl_s=5.0)
    reg.start()
    return reg


def test_unreachable_registry_entries_cost_one_probe_and_never_get_a_batch(model):
    """A closed port and a silent listener in the registry: every batch goes to the real teacher.

    Predict's deadline is 30 s: had one batch gone to the silent listener, this
    test would stall for 30 s and its request count would not be 0. The silent
    endpoint's probe fails with DEADLINE_EXCEEDED after probe_timeout_s.
    """
    loader = [torch.full((k % 4 + 1, 8), float(k)) for k in range(24)]
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(EmbeddedRedis())
        teacher = stack.enter_context(BackgroundTeacher(TeacherConfig(), model))
        silent = stack.enter_context(_silent_listener())
        closed = _closed_port_endpoint()
        for endpoint, tid in ((teacher.address, "real"), (closed, "closed"), (silent, "silent")):
            stack.callback(_register(redis_server.url, endpoint, tid).close)
        cfg = PoolConfig(timeout_s=30, wait_timeout_s=30, probe_timeout_s=1.0)
        pool = stack.enter_context(TeacherPool.from_registry(redis_server.url, SERVICE, config=cfg))
        reader = stack.enter_context(DistillReader(loader, pool, window=4))
        wait_until(lambda: set(pool.endpoints) == {teacher.address, closed, silent}, timeout_s=10,
                   what="the reader to discover all three registry entries")
        shapes = [out["logits"].shape for _, out in reader]
        teachers = wait_until(
            lambda: (t := reader.stats().source.teachers)[silent].last_error and t[closed].last_error and t,
            timeout_s=10, what="both bad endpoints to fail their health check")
        st = reader.stats().source
    assert shapes == [(k % 4 + 1, 4) for k in range(24)], "a batch was lost, duplicated or reordered"
    assert st.failed == 0 and st.retries == 0 and teachers[teacher.address].successes == 24
    for endpoint, code in ((closed, "UNAVAILABLE"), (silent, "DEADLINE_EXCEEDED")):
        t = teachers[endpoint]
        assert t.requests == 0 and t.state.startswith("not ready") and t.breaker == "unverified", (endpoint, t)
        assert "health check failed" in t.last_error and code in t.last_error, t.last_error


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe-pki")
    ca, other = TestCA(d, "ca"), TestCA(d, "evil")
    return {
        "ca": ca,
        "server": ca.issue("server", dns=["localhost"], ips=["127.0.0.1"]),
        "wrong_name": ca.issue("elsewhere", dns=["elsewhere.example"]),
        "rogue": other.issue("server", dns=["localhost"], ips=["127.0.0.1"]),
    }


def _tls(issued) -> TeacherConfig:
    return TeacherConfig(tls_cert=issued.cert, tls_key=issued.key)


def test_teachers_with_a_certificate_that_does_not_match_are_never_used(model, pki):
    with BackgroundTeacher(_tls(pki["server"]), model) as good, \
            BackgroundTeacher(_tls(pki["wrong_name"]), model) as wrong_name, \
            BackgroundTeacher(_tls(pki["rogue"]), model) as rogue:
        pool = TeacherPool([wrong_name.address, rogue.address, good.address],
                           config=PoolConfig(timeout_s=10, wait_timeout_s=20, probe_timeout_s=2.0),
                           credentials=TeacherCredentials(tls_ca=pki["ca"].cert))
        try:
            futs = [pool.submit(SourceRequest({"input": torch.ones(2, 8)}, i)) for i in range(12)]
            assert all(f.result(timeout=20)["logits"].shape == (2, 4) for f in futs)
            teachers = wait_until(
                lambda: (t := pool.stats().teachers)[wrong_name.address].last_error and t[rogue.address].last_error
                and t, timeout_s=10, what="both impostors to fail their health check")
        finally:
            pool.close()
    assert teachers[good.address].successes == 12
    for bad in (wrong_name.address, rogue.address):
        assert teachers[bad].requests == 0, f"an impostor teacher {bad} was sent a batch"
        assert "health check failed" in teachers[bad].last_error


def test_a_not_serving_teacher_is_used_only_once_it_turns_serving(model):
    with BackgroundTeacher(TeacherConfig(), model) as t:
        t.call(t.server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING), timeout_s=5)
        pool = TeacherPool([t.address], config=PoolConfig(timeout_s=10, wait_timeout_s=30, probe_timeout_s=1.0))
        try:
            fut = pool.submit(SourceRequest({"input": torch.ones(3, 8)}, 0))
            wait_until(lambda: "NOT_SERVING" in (pool.stats().teachers[t.address].last_error or ""),
                       timeout_s=10, what="the health check to report NOT_SERVING")
            assert not fut.done() and pool.stats().teachers[t.address].requests == 0
            t.call(t.server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING), timeout_s=5)
            assert fut.result(timeout=15)["logits"].shape == (3, 4)
            assert pool.stats().teachers[t.address].state == "healthy"
        finally:
            pool.close()
