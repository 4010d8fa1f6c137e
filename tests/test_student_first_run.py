"""A new user's first run of a student: a start that explains itself, and the batches users actually have.

Real teacher servers (in this process, on ephemeral ports) and a real Redis.
Waiting is observed through log records (WARNING: what a user sees with
Python's default logging) and polled with deadlines.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from registry import EmbeddedRedis, TeacherRecord, TeacherRegistration
from student_client import (ConfigError, DistillReader, NoTeacherAvailableError, OutputSpec, PoolConfig,
                            SourceRequest, TeacherPool, TeacherRequestError, kd_loss)
from student_client.signature import TeacherSignature, cast_float64
from teacher_server import zoo
from teacher_server.config import TeacherConfig
from teacher_server.inprocess import BackgroundTeacher
from teacher_server.model import LoadedModel
from tests.helpers.redis_proc import redis_server, wait_until  # noqa: F401 (fixture)

FEATURES, CLASSES = 8, 4


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = LoadedModel.from_module(zoo.mlp(in_features=FEATURES, hidden=16, num_classes=CLASSES))
    with BackgroundTeacher(TeacherConfig(), model) as served:
        yield served


def _warnings(caplog, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()]


def test_a_wrong_service_name_is_explained_at_once_while_waiting_and_at_the_deadline(teacher, redis_server,
                                                                                     caplog, monkeypatch):
    from student_client import _pool_members

    monkeypatch.setattr(_pool_members, "_WAITING_LOG_S", 0.5)
    caplog.set_level(logging.WARNING)
    record = TeacherRecord(endpoint=teacher.address, service="digits", model_name="mlp")
    registration = TeacherRegistration(redis_server.url, "digits", record, heartbeat_s=0.2, ttl_s=1.0).start()
    data = DataLoader(TensorDataset(torch.randn(32, FEATURES)), batch_size=8)
    try:
        with TeacherPool.from_registry(redis_server.url, "digitz", config=PoolConfig(wait_timeout_s=4.0)) as pool:
            # Before any batch: the start itself (the first read happens in from_registry) says what is wrong
            # and what exists.
            (first,) = _warnings(caplog, "lists no live teacher for service 'digitz'")
            assert "Services with live teachers there: digits" in first.getMessage()
            assert "Waiting for teachers of service 'digitz' at redis://127.0.0.1:" in first.getMessage()
            with DistillReader(data, pool) as reader, pytest.raises(NoTeacherAvailableError) as info:
                next(iter(reader))
        waiting = _warnings(caplog, "waiting for teachers of service 'digitz' at redis://127.0.0.1:")
        assert len(waiting) >= 2, [r.getMessage() for r in caplog.records]  # repeated while it lasts
        assert all("Services with live teachers there: digits" in r.getMessage() for r in waiting)
        message = str(info.value)
        assert "gave up waiting for teachers of service 'digitz'" in message and "wait_timeout_s=4" in message
        assert "Services with live teachers there: digits" in message and "pass teachers=" not in message
    finally:
        registration.close()


def test_an_unreachable_registry_is_said_at_once():
    with EmbeddedRedis() as server:
        url = server.url
    started = time.monotonic()
    with TeacherPool.from_registry(url, "digits", config=PoolConfig(wait_timeout_s=60.0)) as pool:
        elapsed = time.monotonic() - started
        with pytest.raises(NoTeacherAvailableError) as info:
            pool.wait_for_teachers(timeout_s=0.3)
    assert elapsed < 30.0  # a refused connection: no retry loop until the 60 s deadline before from_registry returns
    assert "is unreachable, so no teacher could be discovered" in str(info.value)


def test_the_start_warning_is_logged_for_an_unreachable_registry(caplog):
    caplog.set_level(logging.WARNING)
    with EmbeddedRedis() as server:
        url = server.url
    with TeacherPool.from_registry(url, "digits"):
        pass
    (line,) = _warnings(caplog, "is unreachable, so no teacher could be discovered")
    assert "Waiting for teachers of service 'digits'" in line.getMessage() and "wait_timeout_s=60" in line.getMessage()


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_a_float64_batch_is_cast_to_the_teachers_float32_and_trained_on(teacher, caplog, kind):
    caplog.set_level(logging.WARNING)
    x64 = np.random.default_rng(0).standard_normal((24, FEATURES))  # numpy's default dtype
    batches = [x64[i:i + 8] for i in range(0, 24, 8)]
    if kind == "torch":
        batches = [torch.from_numpy(b) for b in batches]
    student = torch.nn.Linear(FEATURES, CLASSES)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    answers = []
    with DistillReader(batches, teachers=[teacher.address]) as reader:
        for x, out in reader:
            loss = kd_loss(student(torch.as_tensor(x).float()), out["logits"], temperature=2.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            answers.append(out["logits"])
    expected = teacher.model.module(torch.from_numpy(x64).float()).detach()
    assert torch.allclose(torch.cat(answers), expected, atol=1e-5)
    (cast,) = _warnings(caplog, "casting float64 input(s)")  # logged once, not per batch
    assert "float32" in cast.getMessage()


@pytest.mark.parametrize("when", ["before the teacher is verified", "after wait_for_teachers"])
def test_an_integer_batch_for_a_float_teacher_is_refused_with_the_dtype_shape_and_fix(teacher, when):
    with TeacherPool([teacher.address]) as pool:
        if when != "before the teacher is verified":
            pool.wait_for_teachers(1, timeout_s=20)
        fut = pool.submit(SourceRequest({"": torch.arange(3 * FEATURES).view(3, FEATURES)}, "b0"))
        with pytest.raises((ConfigError, TeacherRequestError)) as info:
            fut.result(timeout=20)
    message = str(info.value)
    assert "expects the input as float32 with per-sample shape (8)" in message
    assert "this batch has int64 with shape (3, 8)" in message
    assert "Integers are not cast to floats automatically" in message and "teacher_input=lambda b: b[0].float()" in message


@pytest.mark.parametrize("outputs, needle", [
    (["probs"], "has no output 'probs'; its outputs: 'logits' (float32 with per-sample shape (4))"),
    ([OutputSpec("logits", "log_probs", top_k=20)], "top_k=20 for output 'logits', but teacher"),
], ids=["missing-output", "top-k-too-large"])
def test_outputs_and_top_k_are_checked_against_describe_before_the_first_batch(teacher, outputs, needle):
    with TeacherPool([teacher.address], outputs) as pool:
        fut = pool.submit(SourceRequest({"": torch.zeros(2, FEATURES)}, "b0"))
        with pytest.raises(ConfigError) as info:
            fut.result(timeout=20)
        assert needle in str(info.value)
        with pytest.raises(ConfigError) as again:  # waiting for such teachers fails at once, saying why
            pool.wait_for_teachers(1, timeout_s=30)
        assert needle in str(again.value)
        st = pool.stats()
    assert st.teachers[teacher.address].requests == 0  # never sent a batch it would refuse
    assert st.teachers[teacher.address].state.startswith("not ready")


def test_cast_float64_follows_the_declared_float_dtype_and_refuses_integer_inputs():
    from protos.edistill.v1 import teacher_pb2 as pb

    def signature(dtype: int) -> TeacherSignature:
        resp = pb.DescribeResponse(model_name="m", inputs=[pb.TensorSpec(name="ids", dtype=dtype, shape=[-1])])
        return TeacherSignature.from_describe("t:1", resp)

    x = {"ids": torch.ones(2, 5, dtype=torch.float64)}
    assert cast_float64(x, signature(pb.FLOAT16), "b")[0]["ids"].dtype == torch.float16
    assert cast_float64(x, None, "b")[0]["ids"].dtype == torch.float32  # no teacher has said yet
    with pytest.raises(ConfigError, match="expects input .ids. as int64 .* Floats are not cast to integers"):
        cast_float64(x, signature(pb.INT64), "b")


def test_the_waiting_line_names_the_endpoints_of_a_fixed_pool(caplog):
    caplog.set_level(logging.WARNING)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with TeacherPool([dead], config=PoolConfig(wait_timeout_s=30, probe_timeout_s=0.5)) as pool:
        pool.submit(SourceRequest({"": torch.zeros(1, FEATURES)}, "b0"))
        line = wait_until(lambda: _warnings(caplog, f"waiting for teachers {dead}: 1 batch(es) waiting"),
                          timeout_s=10, what="the waiting line")[0]
    assert "health check failed" in line.getMessage()
