"""``TeacherProcess``: a real ``python -m teacher_server serve`` subprocess for tests.

    with TeacherProcess("teacher_server.zoo:latency", "--max-batch-size", "32") as t:
        channel = grpc.insecure_channel(t.address)
        ...
        t.send_signal(signal.SIGTERM)
        assert t.wait(timeout=10) == 0

API:
    TeacherProcess(model, *extra_args, host="127.0.0.1", ready_timeout_s=60.0, env=None)
        ``extra_args`` are passed to ``serve`` after ``--model/--host/--port 0``.
    .start()            launch and wait for the ready line (also done by ``with``);
                        raises RuntimeError with the process's stderr if it exits
                        or the deadline passes first.
    .address            "host:port" from the ready line.
    .pid                the process id.
    .send_signal(sig)   e.g. signal.SIGTERM.
    .kill()             SIGKILL.
    .wait(timeout)      exit code (raises subprocess.TimeoutExpired).
    .returncode         None while running.
    .stderr_text()      everything the process logged so far.
    .close()            SIGTERM, wait up to 10 s, then SIGKILL (``with`` exit does this).

The server's stderr goes to a temporary file (not a pipe, so a chatty server
can never block on a full pipe); stdout is read by a thread for the ready line.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

READY_PREFIX = "edistill teacher ready address="
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

__all__ = ["READY_PREFIX", "TeacherProcess"]


class TeacherProcess:
    """A teacher server subprocess, always torn down (see module docstring)."""

    def __init__(self, model: str, *extra_args: str, host: str = "127.0.0.1", ready_timeout_s: float = 60.0,
                 env: dict[str, str] | None = None) -> None:
        self.argv = [sys.executable, "-m", "teacher_server", "serve", "--model", model,
                     "--host", host, "--port", "0", *extra_args]
        self.ready_timeout_s = ready_timeout_s
        self.env = {**os.environ, **(env or {})}
        # Factory specs from the tests package must be importable by the child.
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), self.env.get("PYTHONPATH")]))
        self.address: str | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._ready = threading.Event()
        self._stdout_lines: list[str] = []

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self) -> "TeacherProcess":
        """Launch and block until the ready line, the process's exit, or the deadline."""
        self._proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        threading.Thread(target=self._read_stdout, name=f"teacher-{self._proc.pid}-stdout", daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready.wait(0.05):
            if self._proc.poll() is not None:
                self._ready.wait(0.5)  # the reader may still be handing over the line
                if self._ready.is_set():
                    break
                raise RuntimeError(f"teacher exited with code {self._proc.returncode} before it was ready; "
                                   f"argv={self.argv}\nstderr:\n{self.stderr_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"teacher not ready within {self.ready_timeout_s}s; argv={self.argv}\n"
                                   f"stderr:\n{self.stderr_text()}")
        return self

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            for line in self._proc.stdout:  # drains until EOF so the child never blocks on stdout
                line = line.rstrip("\n")
                self._stdout_lines.append(line)
                if line.startswith(READY_PREFIX) and not self._ready.is_set():
                    self.address = line[len(READY_PREFIX):].strip()
                    self._ready.set()
        except (ValueError, OSError):  # stdout closed by close() while reading
            pass

    def stderr_text(self) -> str:
        """Everything the server wrote to stderr so far (its logs)."""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def send_signal(self, sig: int) -> None:
        assert self._proc is not None, "not started"
        self._proc.send_signal(sig)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def wait(self, timeout: float | None = None) -> int:
        assert self._proc is not None, "not started"
        return self._proc.wait(timeout)

    def close(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL; idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> "TeacherProcess":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
