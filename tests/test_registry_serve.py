"""``edistill registry serve``: a registry that outlives its teachers, and URLs with ``?password_file=``.

Real processes throughout: the registry is ``edistill registry serve`` (a real
redis-server under it), the teachers are ``teacher serve`` processes, and
stopping is a real SIGTERM.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from registry import RegistryConfigError, connect, fetch_service, list_services
from registry.standalone import prepare_password_file
from tests.helpers.redis_proc import REPO_ROOT, children, pid_alive, redis_with_password, wait_until  # noqa: F401
from tests.helpers.teacher_proc import TeacherProcess

SERVICE = "lifetime"
FAST = ("--heartbeat-s", "0.3", "--ttl-s", "1.0")


class RegistryServe:
    """``edistill registry serve`` as a child process; :attr:`url` is the first line of its stdout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "student_client.cli", "registry", "serve", *args],
                                     cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        self.url = self.proc.stdout.readline().strip()  # the ready line; EOF ("") if it failed
        if not self.url:
            self.proc.kill()
            pytest.fail(f"registry serve printed no URL; stderr:\n{self.proc.communicate()[1][-2000:]}")

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _live(url: str) -> set[str]:
    client = connect(url)
    try:
        return set(fetch_service(client, SERVICE).teachers)
    finally:
        client.close()


def test_the_registry_outlives_a_sigtermed_teacher_and_a_new_teacher_joins_it():
    registry = RegistryServe()
    try:
        url = registry.url
        assert url.startswith("redis://127.0.0.1:") and "?password_file=" in url
        password_file = url.split("?password_file=", 1)[1]
        password = Path(password_file).read_text().strip()
        assert stat.S_IMODE(os.stat(password_file).st_mode) == 0o600 and len(password) >= 16
        (redis_pid,) = children(registry.proc.pid)
        for pid in (registry.proc.pid, redis_pid):  # never on a process list
            assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")

        first = TeacherProcess("teacher_server.zoo:mlp", "--registry", url, "--service", SERVICE, *FAST).start()
        try:
            wait_until(lambda: _live(url) == {first.address}, timeout_s=10, what="the first teacher registered")
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=20) == 0
        finally:
            first.close()
        assert _live(url) == set()  # deregistered, and the registry still answers
        assert pid_alive(redis_pid) and registry.proc.poll() is None

        second = TeacherProcess("teacher_server.zoo:mlp", "--registry", url, "--service", SERVICE, *FAST).start()
        try:
            wait_until(lambda: _live(url) == {second.address}, timeout_s=10, what="the new teacher joined")
            ls = subprocess.run([sys.executable, "-m", "student_client.cli", "registry", "ls", "--registry", url],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
            assert ls.returncode == 0 and second.address in ls.stdout, ls.stderr
        finally:
            second.close()

        rc, err = registry.stop()
        assert rc == 0, err
        assert "Traceback" not in err
        wait_until(lambda: not pid_alive(redis_pid), timeout_s=10, what="redis-server to stop with the registry")
        assert not os.path.exists(password_file)  # the generated password goes with it
    finally:
        registry.close()


def test_a_given_password_file_is_created_0600_then_reused(tmp_path):
    path = tmp_path / "registry.password"
    password, where, workdir = prepare_password_file(str(path))
    assert (where, workdir) == (str(path), None) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert prepare_password_file(str(path))[0] == password
    path.chmod(0o644)
    with pytest.raises(RegistryConfigError, match="readable by group or others; run `chmod 600"):
        prepare_password_file(str(path))
    path.chmod(0o600)
    path.write_text("\n")
    with pytest.raises(RegistryConfigError, match="is empty"):
        prepare_password_file(str(path))


def test_password_file_urls_connect_and_say_what_is_wrong(redis_with_password, tmp_path):
    port = redis_with_password.port
    good = tmp_path / "pw"
    good.write_text("Pa55-w0rd-xyz\n")
    client = connect(f"redis://127.0.0.1:{port}/0?password_file={good}")
    assert list_services(client) == []
    client.close()
    with pytest.raises(RegistryConfigError, match="cannot read the Redis password file .*No such file"):
        connect(f"redis://127.0.0.1:{port}/0?password_file={tmp_path / 'missing'}")
    with pytest.raises(RegistryConfigError, match="both a password and \\?password_file=") as info:
        connect(f"redis://:Pa55-w0rd-xyz@127.0.0.1:{port}/0?password_file={good}")
    assert "Pa55" not in str(info.value)
