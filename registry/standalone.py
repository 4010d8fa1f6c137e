"""A registry with its own lifetime: an embedded Redis that runs until it is told to stop.

``edistill registry serve`` (:func:`serve_registry`) starts an
:class:`~registry.embedded.EmbeddedRedis` with a password and keeps it
running until SIGTERM or SIGINT, independent of any teacher: teachers
(``--registry URL``) and students (``registry=URL``) come and go, the
registry stays. Compare ``teacher serve --registry local``, whose embedded
Redis lives and dies with that one teacher.

The URL it prints names no secret: the password lives in a file of mode
0600 and the URL points at it (``redis://127.0.0.1:PORT/0?password_file=PATH``,
read by :func:`registry.connect`), so the URL can go on a command line, into
a log or into ``ps`` output safely. Without ``password_file`` a random
password is written to a fresh private directory (0700), removed on exit;
with one, an existing file's first line is the password, and a missing file
is created (0600) with a random one and kept.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable
from urllib.parse import quote

from registry.connection import PASSWORD_FILE_OPTION, read_password_file
from registry.embedded import EmbeddedRedis
from registry.errors import EmbeddedRedisError, RegistryConfigError

__all__ = ["password_file_url", "prepare_password_file", "serve_registry"]

logger = logging.getLogger(__name__)

# How often the wait for a stop signal checks that redis-server is still alive.
_CHECK_S = 0.5


def password_file_url(host: str, port: int, path: str) -> str:
    """``redis://HOST:PORT/0?password_file=PATH`` (the path percent-escaped)."""
    shown_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"redis://{shown_host}:{port}/0?{PASSWORD_FILE_OPTION}={quote(os.path.abspath(path), safe='/')}"


def prepare_password_file(path: str | None) -> tuple[str, str, str | None]:
    """``(password, file path, private directory to remove at exit or None)``.

    Raises:
        RegistryConfigError: the file exists but is empty, unreadable, not a
            regular file, or readable by group/others; or it cannot be created.
    """
    if path is None:
        workdir = tempfile.mkdtemp(prefix="edistill-registry-")  # mode 0700
        path = os.path.join(workdir, "password")
        password = secrets.token_urlsafe(24)
        _write_new(path, password)
        return password, path, workdir
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        password = secrets.token_urlsafe(24)
        _write_new(path, password)
        logger.info("wrote a new random registry password to %s (mode 0600)", path)
        return password, path, None
    try:
        st = os.stat(path)
    except OSError as exc:
        raise RegistryConfigError(f"cannot read --password-file {path!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RegistryConfigError(f"--password-file {path!r} is not a regular file")
    if st.st_mode & 0o077:
        raise RegistryConfigError(f"--password-file {path!r} has mode {stat.S_IMODE(st.st_mode):04o}, readable by "
                                  f"group or others; run `chmod 600 {path}`")
    password = read_password_file(path, f"--password-file {path!r}",
                                  empty_hint=" (or remove the file and a random one is written)")
    return password, path, None


def _write_new(path: str, password: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise RegistryConfigError(f"cannot create the password file {path!r}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(password + "\n")


def serve_registry(*, host: str = "127.0.0.1", port: int = 0, password_file: str | None = None,
                   on_ready: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> int:
    """Run an embedded Redis until SIGTERM/SIGINT (or ``stop`` is set); return 0 after a clean stop.

    Args:
        host / port: where redis-server listens (port 0: a free one).
        password_file: see the module docstring.
        on_ready: called with the URL (``?password_file=``) once Redis answers.
        stop: set it to stop (for callers that are not the main thread; the
            signal handlers are only installed from the main thread).

    Raises:
        RegistryConfigError: a bad port or password file.
        EmbeddedRedisError: redis-server could not start, or died while serving.
    """
    password, path, workdir = prepare_password_file(password_file)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    server = EmbeddedRedis(host=host, port=port, password=password)
    try:
        server.start()
        url = password_file_url(host, server.port, path)
        logger.info("registry serving at %s until SIGTERM or Ctrl-C: give it to teachers (--registry) and "
                    "students (registry=), or export EDISTILL_REGISTRY='%s'", url, url)
        if on_ready is not None:
            on_ready(url)
        while not stop.wait(_CHECK_S):
            if not server.running:
                raise EmbeddedRedisError(f"the registry's redis-server on {host}:{server.port} exited by itself; "
                                         "teachers and students lose it now: start `edistill registry serve` again")
        logger.info("registry on %s:%d stopping", host, server.port)
        return 0
    finally:
        server.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
