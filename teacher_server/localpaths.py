"""Where the teacher's same-host socket lives, and taking that path safely.

The runtime directory (``$EDISTILL_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/edistill``, else ``<tmp>/edistill-<uid>``) must be a
0700 directory of this user, so no other user can swap the socket file for
their own (SECURITY.md, "Same-host transport"). :func:`claim_path` frees a
path left behind by a teacher that died and refuses one that is in use or is
not a socket; :func:`remove_stale_sockets` clears the ``teacher-*.sock``
files that SIGKILLed teachers left in the runtime directory (each teacher's
socket has its own name, so nobody else would ever reclaim them). :func:`raise_fd_limit` makes room for the descriptors a full
queue of local requests holds (see :mod:`teacher_server.local`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import tempfile
import time

from teacher_server.config import MAX_UNIX_PATH_BYTES
from teacher_server.errors import ConfigError

__all__ = ["RUNTIME_DIR_ENV", "claim_path", "raise_fd_limit", "remove_stale_sockets", "resolve_socket_path",
           "runtime_dir"]

log = logging.getLogger(__name__)

#: Overrides the directory of ``local_socket="auto"`` sockets.
RUNTIME_DIR_ENV = "EDISTILL_RUNTIME_DIR"

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
# A socket younger than this may belong to a teacher between bind() and listen(), which
# refuses connections too: never remove it.
_STALE_MIN_AGE_S = 10.0


def runtime_dir() -> str:
    """This user's directory for teacher sockets, created mode 0700 when missing.

    ``$EDISTILL_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/edistill``, else
    ``<tempfile.gettempdir()>/edistill-<uid>``.

    Raises:
        ConfigError: the directory cannot be created, is a symbolic link, is
            not owned by this user, or is open to group or others (another
            user could then swap the socket for their own).
    """
    uid = os.geteuid()
    if os.environ.get(RUNTIME_DIR_ENV):
        path, where = os.environ[RUNTIME_DIR_ENV], f"${RUNTIME_DIR_ENV}"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path, where = os.path.join(os.environ["XDG_RUNTIME_DIR"], "edistill"), "$XDG_RUNTIME_DIR/edistill"
    else:
        path, where = os.path.join(tempfile.gettempdir(), f"edistill-{uid}"), "the temporary directory"
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"cannot create the socket directory {path} ({where}): {exc.strerror}; set "
                          f"{RUNTIME_DIR_ENV} to a writable directory, or pass --local-socket PATH or off") from None
    fix = f"remove it, or set {RUNTIME_DIR_ENV} to a directory of your own (mode 0700)"
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"socket directory {path} ({where}) is a symbolic link, which whoever owns it can "
                          f"re-point; {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"socket directory {path} ({where}) exists but is not a directory; {fix}")
    if st.st_uid != uid:
        raise ConfigError(f"socket directory {path} ({where}) belongs to uid {st.st_uid}, not to this user "
                          f"(uid {uid}); {fix}")
    if st.st_mode & 0o077:
        raise ConfigError(f"socket directory {path} ({where}) has mode {stat.S_IMODE(st.st_mode):04o}, open to "
                          f"group or others; run `chmod 700 {path}`, or set {RUNTIME_DIR_ENV} to another directory")
    return path


def resolve_socket_path(setting: str, teacher_id: str) -> str | None:
    """The absolute socket path for ``TeacherConfig.local_socket``, or None for no local socket.

    ``"auto"``: ``<runtime_dir()>/teacher-<teacher_id>.sock``; when that is
    unusable (directory refused, path over the AF_UNIX limit) the reason is
    logged as a warning and the teacher serves gRPC only. A path is used as
    given (made absolute).

    Raises:
        ConfigError: an explicit path that is too long.
    """
    if setting == "off":
        return None
    if setting != "auto":
        path = os.path.abspath(setting)
        _check_length(path, f"--local-socket {setting!r}")
        return path
    try:
        directory = runtime_dir()
        remove_stale_sockets(directory)
        path = os.path.join(directory, f"teacher-{_UNSAFE_NAME.sub('_', teacher_id)}.sock")
        _check_length(path, "the automatic local socket path")
    except ConfigError as exc:
        log.warning("same-host transport off: %s (students on this machine use gRPC)", exc)
        return None
    return path


def _check_length(path: str, what: str) -> None:
    n = len(os.fsencode(path))
    if n > MAX_UNIX_PATH_BYTES:
        raise ConfigError(f"{what} {path} is {n} bytes, over the {MAX_UNIX_PATH_BYTES}-byte limit of Unix socket "
                          f"paths; set {RUNTIME_DIR_ENV} to a shorter directory or pass --local-socket with a "
                          "shorter path")


def claim_path(path: str) -> None:
    """Make ``path`` free to bind: remove a stale socket, refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot use local socket path {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"local socket path {path} exists and is not a socket; refusing to replace it: "
                          "choose another --local-socket path (or 'auto')")
    try:
        listening = _listening(path)
    except OSError as exc:
        raise ConfigError(f"cannot use local socket path {path}: {exc}") from None
    if not listening:  # left behind by a process that died
        log.info("removing stale local socket %s", path)
        _unlink(path)
        return
    raise ConfigError(f"another process is serving on local socket {path}; choose another --local-socket path "
                      "(or 'auto')")


def remove_stale_sockets(directory: str) -> list[str]:
    """Remove this user's ``teacher-*.sock`` sockets in ``directory`` that nobody listens on; return them.

    Only sockets older than a few seconds are touched (a teacher starting
    right now may not listen yet), and only when a connection is refused; a
    socket whose owner is alive, even stopped, accepts the connection.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    removed = []
    for name in names:
        if not (name.startswith("teacher-") and name.endswith(".sock")):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if (not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid()
                    or time.time() - st.st_mtime < _STALE_MIN_AGE_S or _listening(path)):
                continue
        except OSError:  # vanished, or another error: leave it alone
            continue
        _unlink(path)
        removed.append(path)
    if removed:
        log.info("removed %d stale local socket(s) of teachers that are gone: %s", len(removed),
                 ", ".join(os.path.basename(p) for p in removed))
    return removed


def _listening(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket ``path`` (False: refused).

    Raises:
        OSError: any other failure (permission, timeout, ...).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    finally:
        probe.close()
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def raise_fd_limit(want: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (never above the hard limit)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= want:
            return
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            log.info("raised the open-file limit from %d to %d (each queued local request maps its shared "
                     "memory with one descriptor)", soft, new)
    except (ImportError, OSError, ValueError) as exc:
        log.debug("could not raise the open-file limit: %s", exc)
