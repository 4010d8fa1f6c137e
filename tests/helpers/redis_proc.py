"""Test helpers for the registry: real redis-server processes, child Python
processes, and waiting on conditions with deadlines (never sleep-and-hope)."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from registry.embedded import EmbeddedRedis

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], T], *, timeout_s: float = 5.0, what: str = "condition", interval_s: float = 0.01) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The ids of the processes whose parent is ``pid`` (read from ``/proc``)."""
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat_file.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat_file.parent.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return out


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    """A fresh real redis-server on a free loopback port, torn down after the test."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_with_password() -> Iterator[EmbeddedRedis]:
    """A real redis-server with ``requirepass``."""
    with EmbeddedRedis(password="Pa55-w0rd-xyz") as server:
        yield server


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child run from the repository: no inherited ``EDISTILL_*`` settings or
    torch.distributed variables (``RANK``, ``MASTER_ADDR``...), one OpenMP thread, the repository first on
    ``PYTHONPATH``, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDISTILL_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


class PythonChild:
    """A child ``python -c CODE`` process whose stdout lines can be awaited with a deadline."""

    def __init__(self, code: str, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=REPO_ROOT
        )
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]

    def read_line(self, timeout_s: float = 10.0) -> str:
        """The next stdout line; fails the test (with the child's stderr) on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._selector.select(timeout=max(0.0, deadline - time.monotonic())):
                line = self.proc.stdout.readline()  # type: ignore[union-attr]
                if line:
                    return line.decode().strip()
                break
        self.proc.kill()
        _, err = self.proc.communicate()
        pytest.fail(f"child printed no line within {timeout_s}s (rc={self.proc.returncode}); stderr:\n{err.decode()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the child and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        self._selector.close()
