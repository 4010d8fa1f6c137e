"""What a teacher says when its surroundings are not as expected: stale sockets, a registry gone
before it stops, other teachers still in its embedded registry, a model pickled from a script.

Real sockets, a real redis-server, real teacher processes and signals.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from registry import EmbeddedRedis, TeacherRecord, TeacherRegistration
from teacher_server.errors import ModelLoadError
from teacher_server.localpaths import remove_stale_sockets
from tests.helpers.redis_proc import wait_until
from tests.helpers.teacher_proc import TeacherProcess


def _unix_socket(path: str, *, listen: bool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if listen:
        sock.listen()
    return sock


def test_stale_sockets_of_dead_teachers_are_removed_and_live_or_young_ones_kept(tmp_path):
    old = time.time() - 60
    live = _unix_socket(str(tmp_path / "teacher-alive.sock"), listen=True)
    dead = _unix_socket(str(tmp_path / "teacher-dead.sock"), listen=False)
    dead.close()  # the file stays, as after a SIGKILL: nobody listens
    young = _unix_socket(str(tmp_path / "teacher-young.sock"), listen=False)  # bound, not yet listening
    young.close()
    other = _unix_socket(str(tmp_path / "someone-else.sock"), listen=False)
    other.close()
    for name in ("teacher-alive.sock", "teacher-dead.sock", "someone-else.sock"):
        os.utime(tmp_path / name, (old, old))
    try:
        assert remove_stale_sockets(str(tmp_path)) == [str(tmp_path / "teacher-dead.sock")]
        assert sorted(os.listdir(tmp_path)) == ["someone-else.sock", "teacher-alive.sock", "teacher-young.sock"]
    finally:
        live.close()


def test_a_teacher_stopping_after_redis_died_does_not_claim_it_deregistered(caplog):
    caplog.set_level(logging.INFO, logger="registry")
    with EmbeddedRedis() as redis_server:
        record = TeacherRecord(endpoint="127.0.0.1:9", service="svc", model_name="m", teacher_id="t1")
        registration = TeacherRegistration(redis_server.url, "svc", record, heartbeat_s=0.2, ttl_s=0.6).start()
        redis_server.kill()
        assert registration.close() is False
    lines = [r.getMessage() for r in caplog.records]
    assert any("failed while deregistering" in line and "expires by itself" in line for line in lines), lines
    assert not any("deregistered" in line for line in lines), lines


def test_a_local_registry_teacher_warns_on_exit_while_other_teachers_are_registered():
    with TeacherProcess("teacher_server.zoo:mlp", "--registry", "local", "--service", "owner") as proc:
        match = wait_until(lambda: re.search(r"embedded Redis for the registry at (redis://\S+?);",
                                             proc.stderr_text()), timeout_s=10, what="the embedded Redis URL")
        assert "It stops with this teacher" in proc.stderr_text() and "edistill registry serve" in proc.stderr_text()
        record = TeacherRecord(endpoint="127.0.0.1:7", service="guest", model_name="m", teacher_id="guest-1")
        guest = TeacherRegistration(match.group(1), "guest", record, heartbeat_s=0.3, ttl_s=5.0).start()
        try:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            log = proc.stderr_text()
        finally:
            guest.close()
    warning = next(line for line in log.splitlines() if "stopping this teacher's embedded registry" in line)
    assert "1 other teacher(s)" in warning and "guest/127.0.0.1:7" in warning
    assert "edistill registry serve" in warning and "WARNING" in warning


def test_a_model_pickled_from_a_script_names_the_cause_and_the_fix(tmp_path):
    script = ("import torch\n"
              "class CNN1D(torch.nn.Module):\n"
              "    def __init__(self):\n"
              "        super().__init__(); self.fc = torch.nn.Linear(40, 10)\n"
              "    def forward(self, x):\n"
              "        return self.fc(x)\n"
              f"torch.save(CNN1D(), {str(tmp_path / 'cnn.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    from teacher_server.model import load_model

    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "cnn.pt"), trust_model_file=True)
    message = str(info.value)
    assert "pickled from a script" in message and "__main__" in message and "CNN1D" in message
    assert "save_torchscript" in message and "package.module:factory" in message
