"""DistillReader construction: bad devices and registry problems are ConfigErrors
(StudentError tree) raised at once, not failures deep inside torch or registry errors."""

from __future__ import annotations

import logging

import pytest
import torch

from registry import RegistryAuthError, RegistryConfigError, keys
from registry import connect
from registry.record import MAX_RECORD_BYTES
from student_client import DistillReader, InProcessTeacher
from student_client.errors import ConfigError, StudentError
from tests.helpers.redis_proc import redis_server, redis_with_password  # noqa: F401

SERVICE = "reader-config"


def _source() -> InProcessTeacher:
    return InProcessTeacher(torch.nn.Linear(3, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_a_cuda_device_without_cuda_is_a_config_error_at_construction(device):
    with pytest.raises(ConfigError, match="CUDA is not available to this torch") as info:
        DistillReader([], source=_source(), device=device)
    assert repr(device) in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_out_of_range_is_a_config_error_at_construction():
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"there are only {count} CUDA device"):
        DistillReader([], source=_source(), device=f"cuda:{count}")


def test_registry_local_is_a_config_error_in_the_student_tree():
    with pytest.raises(ConfigError) as info:
        DistillReader([], registry="local", service=SERVICE)
    assert isinstance(info.value, StudentError) and isinstance(info.value.__cause__, RegistryConfigError)
    assert "'local' means an embedded Redis" in str(info.value)


def test_refused_registry_credentials_are_a_config_error_without_a_retrying_log(redis_with_password, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = redis_with_password.url.replace("Pa55-w0rd-xyz", "wrong-pw-456")
    with pytest.raises(ConfigError) as info:
        DistillReader([], registry=wrong, service=SERVICE)
    assert isinstance(info.value.__cause__, RegistryAuthError)
    assert "redis://:***@127.0.0.1" in str(info.value) and "wrong-pw-456" not in str(info.value)
    assert "retrying" not in caplog.text and "wrong-pw-456" not in caplog.text


def test_a_deeply_nested_registry_record_does_not_break_the_reader(redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="registry")
    client = connect(redis_server.url)
    now_ms = int(client.time()[0]) * 1000
    client.set(keys.record_key(SERVICE, "deep"), b"[" * MAX_RECORD_BYTES, px=60_000)
    client.zadd(keys.members_key(SERVICE), {"deep": now_ms + 60_000})
    reader = DistillReader([], registry=redis_server.url, service=SERVICE)  # RecursionError before the fix
    reader.close()
    assert "skipping teacher 'deep'" in caplog.text
