"""Bearer-token auth, token rotation, TLS and mutual TLS on real teacher servers.

In-process servers (BackgroundTeacher) on ephemeral loopback ports; students
are real TeacherPools; certificates are generated per test (tests/helpers/certs.py).
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from student_client import PoolConfig, SourceRequest
from student_client.credentials import TeacherCredentials
from student_client.errors import ConfigError as StudentConfigError
from student_client.errors import NoTeacherAvailableError, TeacherRequestError
from student_client.pool import TeacherPool
from teacher_server import zoo
from teacher_server.config import TeacherConfig
from teacher_server.errors import ConfigError
from teacher_server.inprocess import BackgroundTeacher
from teacher_server.model import LoadedModel
from tests.helpers.certs import TestCA
from tests.helpers.teacher_proc import TeacherProcess

TOKEN_A = "tokA-" + "a" * 24
TOKEN_B = "tokB-" + "b" * 24


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel.from_module(zoo.mlp(in_features=8, hidden=16, num_classes=4))


def _request() -> pb.PredictRequest:
    req = pb.PredictRequest(request_id="r1")
    codec.encode(np.ones((2, 8), np.float32), req.inputs.add(name="input"))
    return req


def _predict(channel, token: str | None = None, timeout: float = 10.0) -> pb.PredictResponse:
    md = (("authorization", f"Bearer {token}"),) if token is not None else None
    return pb_grpc.TeacherStub(channel).Predict(_request(), timeout=timeout, metadata=md)


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details() or ""


def _pool_predict(address: str, creds: TeacherCredentials | None, wait_s: float = 20.0) -> dict:
    pool = TeacherPool([address], config=PoolConfig(timeout_s=5.0, wait_timeout_s=wait_s),
                       credentials=creds) if creds is not None else TeacherPool(
        [address], config=PoolConfig(timeout_s=5.0, wait_timeout_s=wait_s))
    try:
        return pool.submit(SourceRequest({"input": torch.ones(2, 8)}, 0)).result(timeout=wait_s + 10)
    finally:
        pool.close()


# ---------------------------------------------------------------- tokens


def test_missing_and_wrong_token_are_rejected_health_stays_open(model):
    with BackgroundTeacher(TeacherConfig(auth_tokens=(TOKEN_A,)), model) as t, \
            grpc.insecure_channel(t.address) as ch:
        code, details = _code(lambda: _predict(ch))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
        code, details = _code(lambda: _predict(ch, "wrong-token"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong-token" not in details
        code, _ = _code(lambda: pb_grpc.TeacherStub(ch).Describe(pb.DescribeRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert _predict(ch, TOKEN_A).outputs[0].name == "logits"
        # Probes need no token.
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # The token is in no answer and in no repr of the config.
        desc = pb_grpc.TeacherStub(ch).Describe(pb.DescribeRequest(), timeout=5,
                                                 metadata=(("authorization", f"Bearer {TOKEN_A}"),))
        assert TOKEN_A not in str(desc) and TOKEN_A not in repr(t.config)


def test_student_sends_token_and_reports_a_rejected_one_clearly(model):
    with BackgroundTeacher(TeacherConfig(auth_tokens=(TOKEN_A, TOKEN_B)), model) as t:
        assert _pool_predict(t.address, TeacherCredentials(auth_token=TOKEN_B))["logits"].shape == (2, 4)
        assert _pool_predict(t.address, TeacherCredentials.from_env({"EDISTILL_AUTH_TOKEN": TOKEN_A})) is not None
        with pytest.raises(TeacherRequestError) as info:
            _pool_predict(t.address, TeacherCredentials(auth_token="nope-not-it"))
        assert "UNAUTHENTICATED" in str(info.value) and "nope-not-it" not in str(info.value)
    assert TOKEN_A not in repr(TeacherCredentials(auth_token=TOKEN_A))


def test_token_file_rotation_without_restart(model, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# rotated by ops\n{TOKEN_A}\n")
    student_file = tmp_path / "student-token"
    student_file.write_text(TOKEN_A + "\n")
    with BackgroundTeacher(TeacherConfig(auth_token_file=str(token_file)), model) as t, \
            grpc.insecure_channel(t.address) as ch:
        assert _predict(ch, TOKEN_A).outputs
        assert _code(lambda: _predict(ch, TOKEN_B))[0] == grpc.StatusCode.UNAUTHENTICATED
        # Step 1: both tokens valid; step 2: the old one retired. The file is re-read on change.
        token_file.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
        _poll(lambda: _ok(ch, TOKEN_B))
        assert _ok(ch, TOKEN_A)
        token_file.write_text(f"{TOKEN_B}\n")
        _poll(lambda: not _ok(ch, TOKEN_A))
        # A student reading its token from a file follows the rotation too.
        student_file.write_text(TOKEN_B + "\n")
        assert _pool_predict(t.address, TeacherCredentials(auth_token_file=str(student_file))) is not None


def test_sighup_reloads_the_token_file_of_a_teacher_process(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN_A + "\n")
    with TeacherProcess("teacher_server.zoo:mlp", "--auth-token-file", str(token_file),
                        "--model-kwargs", '{"in_features": 8}') as t, grpc.insecure_channel(t.address) as ch:
        assert _predict(ch, TOKEN_A).outputs
        token_file.write_text(TOKEN_B + "\n")
        t.send_signal(signal.SIGHUP)
        _poll(lambda: _ok(ch, TOKEN_B))
        assert not _ok(ch, TOKEN_A)
        assert TOKEN_A not in t.stderr_text() and TOKEN_B not in t.stderr_text()


def test_env_token_of_a_teacher_process_is_not_on_its_command_line():
    with TeacherProcess("teacher_server.zoo:mlp", "--model-kwargs", '{"in_features": 8}',
                        env={"EDISTILL_AUTH_TOKEN": TOKEN_A}) as t, grpc.insecure_channel(t.address) as ch:
        assert _code(lambda: _predict(ch))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert _predict(ch, TOKEN_A).outputs
        with open(f"/proc/{t.pid}/cmdline", "rb") as f:
            assert TOKEN_A.encode() not in f.read()


def test_empty_token_file_is_a_clear_config_error(model, tmp_path):
    empty = tmp_path / "tokens"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="holds no token"):
        BackgroundTeacher(TeacherConfig(auth_token_file=str(empty)), model).start()
    with pytest.raises(ConfigError, match="cannot read"):
        BackgroundTeacher(TeacherConfig(auth_token_file=str(tmp_path / "missing")), model).start()


def _ok(ch, token) -> bool:
    try:
        _predict(ch, token)
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        return False


def _poll(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.1)


# ------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = TestCA(d, "ca"), TestCA(d, "evil")
    return {
        "ca": ca,
        "other": other,
        "server": ca.issue("server", dns=["localhost", "teacher.internal"], ips=["127.0.0.1"]),
        "wrong_name": ca.issue("elsewhere", dns=["elsewhere.example"]),
        "client": ca.issue("student", client=True),
        "rogue_client": other.issue("student", client=True),
        "rogue_server": other.issue("server", dns=["localhost"], ips=["127.0.0.1"]),
    }


def _tls_config(server, ca=None, **kw) -> TeacherConfig:
    return TeacherConfig(tls_cert=server.cert, tls_key=server.key, tls_ca=ca, **kw)


def test_tls_serves_verified_students_and_refuses_plaintext(model, pki):
    with BackgroundTeacher(_tls_config(pki["server"], auth_tokens=(TOKEN_A,)), model) as t:
        out = _pool_predict(t.address, TeacherCredentials(tls_ca=pki["ca"].cert, auth_token=TOKEN_A))
        assert out["logits"].shape == (2, 4)
        # The registry may hand out a bare IP; the expected name can be set explicitly.
        creds = TeacherCredentials(tls_ca=pki["ca"].cert, tls_server_name="teacher.internal", auth_token=TOKEN_A)
        assert _pool_predict(t.address, creds) is not None
        with grpc.insecure_channel(t.address) as ch:
            assert _code(lambda: _predict(ch, TOKEN_A, timeout=3))[0] == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("case", ["wrong_name", "wrong_ca"])
def test_student_refuses_a_teacher_whose_certificate_does_not_match(model, pki, case):
    server = pki["wrong_name"] if case == "wrong_name" else pki["rogue_server"]
    with BackgroundTeacher(_tls_config(server), model) as t:
        with pytest.raises(NoTeacherAvailableError) as info:
            _pool_predict(t.address, TeacherCredentials(tls_ca=pki["ca"].cert), wait_s=2.0)
        text = str(info.value).lower()
        assert "verif" in text or "certificate" in text or "handshake" in text, text


def test_mutual_tls_rejects_clients_without_a_trusted_certificate(model, pki):
    with BackgroundTeacher(_tls_config(pki["server"], ca=pki["ca"].cert), model) as t:
        good = TeacherCredentials(tls_ca=pki["ca"].cert, tls_cert=pki["client"].cert, tls_key=pki["client"].key)
        assert _pool_predict(t.address, good)["logits"].shape == (2, 4)
        for creds in (TeacherCredentials(tls_ca=pki["ca"].cert),
                      TeacherCredentials(tls_ca=pki["ca"].cert, tls_cert=pki["rogue_client"].cert,
                                         tls_key=pki["rogue_client"].key)):
            with pytest.raises(NoTeacherAvailableError):
                _pool_predict(t.address, creds, wait_s=2.0)


def test_bad_tls_files_are_clear_errors(model, pki, tmp_path):
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        TeacherConfig(tls_cert=pki["server"].cert)
    with pytest.raises(ConfigError, match="does not match the certificate"):
        BackgroundTeacher(TeacherConfig(tls_cert=pki["server"].cert, tls_key=pki["client"].key), model).start()
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        BackgroundTeacher(TeacherConfig(tls_cert=str(junk), tls_key=pki["server"].key), model).start()
    with pytest.raises(StudentConfigError, match="not a readable file"):
        TeacherCredentials(tls_ca=str(tmp_path / "missing.pem"))


def test_teacher_process_with_mtls_and_cli_health(pki):
    s, c = pki["server"], pki["client"]
    with TeacherProcess("teacher_server.zoo:mlp", "--model-kwargs", '{"in_features": 8}',
                        "--tls-cert", s.cert, "--tls-key", s.key, "--tls-ca", pki["ca"].cert) as t:
        good = TeacherCredentials(tls_ca=pki["ca"].cert, tls_cert=c.cert, tls_key=c.key)
        assert _pool_predict(t.address, good)["logits"].shape == (2, 10)
        from teacher_server.cli import main

        args = ["health", t.address, "--tls-ca", pki["ca"].cert, "--tls-cert", c.cert, "--tls-key", c.key]
        assert main(args) == 0
        assert main(["health", t.address, "--tls-ca", pki["ca"].cert, "--timeout-s", "2"]) == 1


def test_distill_reader_sends_token_and_speaks_tls(model, pki):
    from student_client import DistillReader

    loader = [torch.ones(2, 8), torch.zeros(3, 8)]
    with BackgroundTeacher(_tls_config(pki["server"], auth_tokens=(TOKEN_A,)), model) as t:
        creds = TeacherCredentials(auth_token=TOKEN_A, tls_ca=pki["ca"].cert)
        with TeacherPool([t.address], config=PoolConfig(timeout_s=5, wait_timeout_s=20), credentials=creds) as pool, \
                DistillReader(loader, pool) as reader:
            shapes = [teacher["logits"].shape for _, teacher in reader]
        assert shapes == [(2, 4), (3, 4)]
    with pytest.raises(StudentConfigError, match="credentials= or channel_factory=, not both"):
        TeacherPool(["127.0.0.1:1"], credentials=TeacherCredentials(auth_token=TOKEN_B),
                    channel_factory=lambda e, o: None)
