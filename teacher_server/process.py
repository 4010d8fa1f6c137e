"""Start a teacher server as a child process and wait until it serves: :class:`TeacherProcess`.

The one launcher of ``python -m teacher_server serve`` subprocesses, used by
the demo, the benchmarks and the tests, and the one home of the ready line
``serve`` prints once it serves (and, with ``--registry``, is discoverable)::

    edistill teacher ready address=HOST:PORT

That line is a contract (docs/internals.md): :data:`READY_PREFIX` is how the
CLI writes it and how this module reads it. Example::

    with TeacherProcess("teacher_server.zoo:latency", "--max-batch-size", "32") as t:
        channel = grpc.insecure_channel(t.address)
        ...
        t.send_signal(signal.SIGTERM)
        assert t.wait(timeout=10) == 0

The child's stderr (its log) goes to a file, never a pipe, so a chatty server
can never block on a full pipe: a temporary file by default, or ``log_path``.
Its stdout is drained by a thread that watches for the ready line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import IO

from teacher_server.errors import TeacherError

__all__ = ["READY_PREFIX", "TeacherProcess", "TeacherStartError", "close_all"]

#: Start of the line ``teacher serve`` prints once it serves; the address follows.
READY_PREFIX = "edistill teacher ready address="

_TAIL_LINES = 30  # lines of the child's log quoted in a TeacherStartError


class TeacherStartError(TeacherError, RuntimeError):
    """The teacher process exited, or missed its deadline, before it printed its ready line.

    ``summary`` is the first line of the message (it ends with the log's last
    line, which is where the teacher CLI prints its error); the message goes
    on with the last lines of the log. ``returncode`` is None when the
    deadline passed (the process was then killed).
    """

    def __init__(self, summary: str, log_tail: str, *, returncode: int | None, log_path: str | None) -> None:
        super().__init__(f"{summary}\nlast lines of its log:\n{log_tail}" if log_tail else summary)
        self.summary = summary
        self.log_tail = log_tail
        self.returncode = returncode
        self.log_path = log_path


class TeacherProcess:
    """A ``python -m teacher_server serve`` subprocess (see the module docstring).

    Args:
        model: the ``--model`` spec.
        *serve_args: more ``serve`` arguments, after ``--model``, ``--host`` and ``--port``.
        host: ``--host`` (loopback by default).
        port: ``--port``; 0 (default) lets the server pick a free one.
        ready_timeout_s: how long :meth:`wait_ready` waits for the ready line
            (importing torch and loading a model take seconds).
        env: variables added to this process's environment for the child
            (e.g. ``EDISTILL_REGISTRY``, so a password stays off the command line).
        log_path: where the child's stderr goes; a temporary file (removed by
            :meth:`close`) when None.
        log_level: the ``--log-level`` given before ``serve`` (default: the CLI's).
        pythonpath: directories put first on the child's ``PYTHONPATH``, for
            factory specs outside installed packages.
        cwd: the child's working directory (default: this process's).

    :meth:`start` (or ``with``) launches it and waits until it serves;
    :meth:`launch` and :meth:`wait_ready` do the two halves, so several
    teachers can boot in parallel. :meth:`close` always ends it.
    """

    def __init__(self, model: str, *serve_args: str, host: str = "127.0.0.1", port: int = 0,
                 ready_timeout_s: float = 60.0, env: Mapping[str, str] | None = None,
                 log_path: str | os.PathLike[str] | None = None, log_level: str | None = None,
                 pythonpath: Iterable[str | os.PathLike[str]] = (), cwd: str | os.PathLike[str] | None = None) -> None:
        if not ready_timeout_s > 0:
            raise ValueError(f"ready_timeout_s must be > 0, got {ready_timeout_s}")
        self.argv: list[str] = [sys.executable, "-m", "teacher_server",
                                *(("--log-level", log_level) if log_level else ()),
                                "serve", "--model", model, "--host", host, "--port", str(port), *serve_args]
        self.ready_timeout_s = ready_timeout_s
        self.env = {**os.environ, **(env or {})}
        paths = [os.fspath(p) for p in pythonpath]
        if paths:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, self.env.get("PYTHONPATH")]))
        self.cwd = cwd
        self.log_path = None if log_path is None else os.fspath(log_path)
        self.address: str | None = None  # "host:port" from the ready line
        self.ready_at: float | None = None  # time.monotonic() when the ready line was read
        self._proc: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None
        self._ready = threading.Event()
        self._terminated = False

    # ------------------------------------------------------------ state

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._popen().pid

    @property
    def returncode(self) -> int | None:
        """The exit code, None while running (or before :meth:`launch`)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def running(self) -> bool:
        """Launched and not exited."""
        return self._proc is not None and self._proc.poll() is None

    def _popen(self) -> subprocess.Popen[str]:
        if self._proc is None:
            raise RuntimeError("teacher process not started: call start() or launch() first")
        return self._proc

    # -------------------------------------------------------------- start

    def start(self) -> TeacherProcess:
        """:meth:`launch`, then :meth:`wait_ready`."""
        self.launch()
        return self.wait_ready()

    def launch(self) -> TeacherProcess:
        """Start the child without waiting for it to serve."""
        if self._proc is not None:
            raise RuntimeError(f"teacher process already launched (pid {self._proc.pid})")
        self._log = open(self.log_path, "w+b") if self.log_path else tempfile.TemporaryFile(mode="w+b")
        self._proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        threading.Thread(target=self._read_stdout, name=f"teacher-{self._proc.pid}-stdout", daemon=True).start()
        return self

    def _read_stdout(self) -> None:
        proc = self._popen()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:  # drained until EOF, so the child never blocks on stdout
                if line.startswith(READY_PREFIX) and not self._ready.is_set():
                    self.ready_at = time.monotonic()
                    self.address = line[len(READY_PREFIX):].strip()
                    self._ready.set()
        except (ValueError, OSError):  # stdout closed by close() while reading
            pass

    def wait_ready(self, timeout_s: float | None = None) -> TeacherProcess:
        """Block until the ready line (then :attr:`address` is set).

        Raises:
            TeacherStartError: the child exited first, or ``timeout_s``
                (default ``ready_timeout_s``) passed; it is then killed.
        """
        proc = self._popen()
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if proc.poll() is not None:
                if self._ready.wait(0.5):  # the reader may still be handing over the line
                    break
                self._fail(f"exited with code {proc.returncode} before it was ready", proc.returncode)
            if time.monotonic() > deadline:
                self.kill()
                proc.wait()
                self._fail(f"did not print its ready line within {timeout_s:g} s (killed)", None)
        return self

    def _fail(self, what: str, returncode: int | None) -> None:
        lines = self.stderr_text().strip().splitlines()
        last = lines[-1].strip() if lines else "(no output)"
        where = f" (full log: {self.log_path})" if self.log_path else ""
        raise TeacherStartError(f"teacher process {self.pid} {what}: {last}{where}",
                                "\n".join(lines[-_TAIL_LINES:]), returncode=returncode, log_path=self.log_path)

    # ------------------------------------------------------------ talking

    def stderr_text(self) -> str:
        """Everything the child logged so far (its stderr); "" once closed with a temporary log."""
        if self._log is None or self._log.closed:
            if self.log_path and os.path.exists(self.log_path):
                with open(self.log_path, "rb") as f:
                    return f.read().decode(errors="replace")
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` (e.g. ``signal.SIGTERM``) to the child."""
        if sig == signal.SIGTERM:
            self._terminated = True
        self._popen().send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM, once (the server drains, deregisters and exits 0); no-op when not running."""
        if self.running and not self._terminated:
            self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL while running (no deregistration: the registry's TTL has to notice)."""
        if self.running:
            self._popen().kill()

    def wait(self, timeout: float | None = None) -> int:
        """The exit code (raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds)."""
        return self._popen().wait(timeout)

    # ------------------------------------------------------------ stopping

    def close(self, grace_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; closes the log. Idempotent."""
        if self._proc is not None:
            self.terminate()
            try:
                self._proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> TeacherProcess:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_all(procs: Sequence[TeacherProcess], grace_s: float = 15.0) -> None:
    """SIGTERM every process at once (they drain in parallel), then :meth:`TeacherProcess.close` each."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.close(max(0.0, deadline - time.monotonic()))
