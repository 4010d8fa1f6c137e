"""`teacher serve` checks cheap settings before loading the model; `describe`/`health` flag errors.

In-process through ``teacher_server.cli.main`` with ``load_model`` replaced by
a sentinel, so a test proves the error came *before* the model would load
(a big GPU model can take minutes).
"""

from __future__ import annotations

import pathlib

import pytest

from teacher_server import cli
from teacher_server.errors import ModelLoadError

SENTINEL = "sentinel: load_model reached"


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import teacher_server.model

    def fake_load_model(*a, **kw):
        raise ModelLoadError(SENTINEL)

    monkeypatch.setattr(teacher_server.model, "load_model", fake_load_model)
    for k in ("EDISTILL_REGISTRY", "EDISTILL_SERVICE", "EDISTILL_AUTH_TOKEN", "EDISTILL_NAME",
              "EDISTILL_TEACHER_TLS_CERT", "EDISTILL_TEACHER_TLS_KEY", "EDISTILL_TEACHER_TLS_CA",
              "EDISTILL_TEACHER_AUTH_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _serve(capsys, *extra: str) -> tuple[int, str]:
    return _run(capsys, "serve", "--model", "teacher_server.zoo:mlp", *extra)


def test_serve_reaches_model_load_when_settings_are_fine(capsys, tmp_path: pathlib.Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-1\n")
    code, err = _serve(capsys, "--registry", "redis://127.0.0.1:1/0", "--service", "svc-1",
                       "--auth-token-file", str(tokens))
    assert code == 2 and SENTINEL in err, err


@pytest.mark.parametrize("extra,needle", [
    (["--registry", "http://redis.example:6379"], "--registry: invalid Redis URL"),
    (["--registry", "redis://127.0.0.1:6379/0", "--service", "my service"], "--service must be"),
    (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], "cannot read --tls-cert"),
    (["--auth-token-file", "/nonexistent/tokens"], "--auth-token-file '/nonexistent/tokens'"),
])
def test_serve_reports_bad_settings_before_loading_the_model(capsys, extra: list[str], needle: str) -> None:
    code, err = _serve(capsys, *extra)
    assert code == 2
    assert SENTINEL not in err, "the model was loaded before a bad setting was reported"
    assert needle in err and len(err.splitlines()) == 1, err


def test_serve_bad_pem_and_empty_token_file(capsys, tmp_path: pathlib.Path) -> None:
    (tmp_path / "c.pem").write_text("not pem")
    (tmp_path / "k.pem").write_text("not pem")
    code, err = _serve(capsys, "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"))
    assert code == 2 and "not a PEM certificate" in err and SENTINEL not in err, err
    (tmp_path / "empty").write_text("# no tokens yet\n")
    code, err = _serve(capsys, "--auth-token-file", str(tmp_path / "empty"))
    assert code == 2 and "holds no token" in err and SENTINEL not in err, err


def test_model_name_with_a_space_gets_a_valid_default_service(capsys) -> None:
    # Used to fail after loading with "service must be ..." naming a flag the user never gave.
    code, err = _serve(capsys, "--name", "My Teacher (v2)", "--registry", "redis://127.0.0.1:1/0")
    assert code == 2 and SENTINEL in err, err


@pytest.mark.parametrize("name,expected", [
    ("resnet101", "resnet101"), ("My Teacher (v2)", "My-Teacher-v2"), ("_private.model", "private.model"),
    ("x" * 200, "x" * 128),
])
def test_default_service(name: str, expected: str) -> None:
    assert cli.default_service(name) == expected


def test_default_service_from_nothing_usable_says_pass_service() -> None:
    from teacher_server.errors import ConfigError

    with pytest.raises(ConfigError, match="pass --service NAME"):
        cli.default_service("ÄÖÜ ???")


@pytest.mark.parametrize("command", ["describe", "health"])
def test_client_missing_ca_names_the_flag(capsys, command: str) -> None:
    code, err = _run(capsys, command, "127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem", "--timeout-s", "1")
    assert code == 2 and "cannot read --tls-ca '/nonexistent/ca.pem'" in err, err


@pytest.mark.parametrize("command", ["describe", "health"])
@pytest.mark.parametrize("flag", ["--tls-key", "--tls-cert"])
def test_client_half_a_key_pair_is_an_error_not_plaintext(capsys, command: str, flag: str) -> None:
    code, err = _run(capsys, command, "127.0.0.1:1", flag, "/some/file.pem", "--timeout-s", "1")
    assert code == 2 and "--tls-cert and --tls-key go together" in err and f"got only {flag}" in err, err


def test_a_taken_port_is_one_line_before_the_model_loads(capsys) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _serve(capsys, "--port", str(port))
    assert code == 2 and SENTINEL not in err, err
    assert err == (f"edistill teacher serve: error: cannot listen on 127.0.0.1:{port}: port {port} is in use "
                   "(another teacher or program listens there); choose another --port, or --port 0 for a free one")


def test_health_names_not_found_and_the_flag_is_the_grpc_health_service(capsys) -> None:
    from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig, zoo

    with BackgroundTeacher(TeacherConfig(local_socket="off"), LoadedModel.from_module(zoo.mlp())) as teacher:
        assert cli.main(["health", teacher.address, "--health-service", "edistill.v1.Teacher"]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        # A registry service name where the gRPC health service goes: the server is up, so not UNREACHABLE.
        assert cli.main(["health", teacher.address, "--health-service", "imagenet-r101"]) == 1
        out = capsys.readouterr().out
        assert out.startswith(f"NOT_FOUND {teacher.address}: the server is up") and "UNREACHABLE" not in out
        assert cli.main(["health", teacher.address, "--service", "edistill.v1.Teacher"]) == 0  # deprecated alias
        captured = capsys.readouterr()
        assert captured.out.strip() == "SERVING" and "--service is deprecated here" in captured.err
