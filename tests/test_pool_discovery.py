"""A TeacherPool finds its own teachers: from_registry() follows a service, wait_for_teachers() waits
for verified ones, and "no teacher" errors give the advice that fits how the pool was set up."""

from __future__ import annotations

import logging
import socket

import pytest
import torch

from registry import EmbeddedRedis, TeacherRecord, TeacherRegistration
from student_client import ConfigError, NoTeacherAvailableError, PoolConfig, SourceRequest, TeacherPool
from teacher_server import zoo
from teacher_server.config import TeacherConfig
from teacher_server.inprocess import BackgroundTeacher
from teacher_server.model import LoadedModel

SERVICE = "pool-discovery"


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel.from_module(zoo.mlp(in_features=8, hidden=16, num_classes=4))


@pytest.fixture
def redis_server():
    with EmbeddedRedis() as server:
        yield server


def _register(url: str, endpoint: str) -> TeacherRegistration:
    record = TeacherRecord(endpoint=endpoint, service=SERVICE, model_name="mlp")
    return TeacherRegistration(url, SERVICE, record, heartbeat_s=0.2, ttl_s=1.0).start()


def test_from_registry_follows_the_service_and_wait_for_teachers_returns_the_verified_ones(model, redis_server):
    with BackgroundTeacher(TeacherConfig(), model) as teacher:
        reg = _register(redis_server.url, teacher.address)
        try:
            with TeacherPool.from_registry(redis_server.url, SERVICE, poll_s=0.2) as pool:
                assert pool.wait_for_teachers(1, timeout_s=20) == [teacher.address]
                out = pool.submit(SourceRequest({"": torch.ones(3, 8)}, "b")).result(timeout=20)
                assert out["logits"].shape == (3, 4)
        finally:
            reg.close()


def test_wait_for_teachers_names_a_dead_endpoint_and_its_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with TeacherPool([dead], config=PoolConfig(probe_timeout_s=1.0)) as pool:
        with pytest.raises(NoTeacherAvailableError) as info:
            pool.wait_for_teachers(1, timeout_s=1.5)
    message = str(info.value)
    assert "0 of the 1 teacher(s)" in message and dead in message and "health check failed" in message
    assert "running and reachable" in message


def test_an_empty_fixed_pool_advises_teachers_and_an_empty_registry_pool_advises_the_service(redis_server):
    with TeacherPool([]) as pool:
        with pytest.raises(NoTeacherAvailableError) as info:
            pool.wait_for_teachers(timeout_s=0.2)
    assert "pass teachers=['host:port', ...]" in str(info.value)
    with TeacherPool.from_registry(redis_server.url, "no-such-service", poll_s=0.2) as pool:
        with pytest.raises(NoTeacherAvailableError) as info:
            pool.wait_for_teachers(timeout_s=0.5)
    message = str(info.value)
    assert "pass teachers=" not in message  # the wrong advice for a registry user
    assert "lists no live teacher for service 'no-such-service'" in message


def test_waiting_is_logged_while_it_lasts(redis_server, caplog, monkeypatch):
    from student_client import _pool_members

    monkeypatch.setattr(_pool_members, "_WAITING_LOG_S", 0.2)
    caplog.set_level(logging.INFO, logger="student_client.pool")
    with TeacherPool.from_registry(redis_server.url, "late-service") as pool:
        with pytest.raises(NoTeacherAvailableError):
            pool.wait_for_teachers(timeout_s=1.0)
    lines = [r.getMessage() for r in caplog.records if "waiting for teachers" in r.getMessage()]
    assert lines and "service 'late-service'" in lines[0] and "0 of 1 ready" in lines[0]


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_wait_for_teachers_takes_a_positive_count(n):
    with TeacherPool([]) as pool, pytest.raises(ConfigError, match="n must be an int >= 1"):
        pool.wait_for_teachers(n)


def test_a_bad_registry_url_is_a_config_error_and_leaves_nothing_running():
    with pytest.raises(ConfigError, match="cannot use the registry"):
        TeacherPool.from_registry("local", SERVICE)
    with pytest.raises(ConfigError, match="service="):
        TeacherPool.from_registry("redis://127.0.0.1:1/0", "")
