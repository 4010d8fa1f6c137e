"""``edistill demo``'s teachers: server processes it starts, and the registry it watches them in.

The demo is a student that also starts teachers, so this module imports
:mod:`teacher_server.process` (the one launcher of ``python -m teacher_server
serve``; DESIGN.md lets student_client import teacher_server where a student
also serves or, as here, runs teachers). Private to :mod:`student_client.demo`.
"""

from __future__ import annotations

import json
import pathlib
import threading
import time
from typing import Mapping

from student_client.errors import StudentError
from teacher_server.process import TeacherProcess, TeacherStartError, close_all

__all__ = ["SERVICE", "LiveSampler", "ProcessFleet", "TeacherFleet", "check_registry"]

#: The registry service the demo's teachers register in.
SERVICE = "edistill-demo"


class ProcessFleet:
    """Teacher server processes started from one ``serve`` command line, registered in ``registry``.

    Every process is in :attr:`procs` from the moment it is launched, so
    :meth:`stop_all` ends it even when it (or a sibling) never became ready.

    Args:
        model: the ``--model`` spec; ``serve_args`` follow it.
        env: variables for each child besides ``EDISTILL_REGISTRY`` (set from ``registry``).
        ready_timeout_s: how long each teacher may take to print its ready line.
        grace_s: how long :meth:`stop_all` lets the teachers drain before SIGKILL.
    """

    def __init__(self, model: str, *serve_args: str, registry: str, log_dir: pathlib.Path,
                 env: Mapping[str, str] | None = None, ready_timeout_s: float = 60.0, grace_s: float = 15.0) -> None:
        self.model, self.serve_args, self.registry, self.log_dir = model, serve_args, registry, log_dir
        self.env, self.ready_timeout_s, self.grace_s = dict(env or {}), ready_timeout_s, grace_s
        self.procs: list[TeacherProcess] = []
        self._lock = threading.Lock()  # procs grows from the replacement thread too
        self._count = 0

    def _launch(self) -> TeacherProcess:
        # The URL may carry a password: pass it in the environment (the teacher
        # CLI reads EDISTILL_REGISTRY), never on the command line, where `ps` shows it.
        env = {**self.env, "EDISTILL_REGISTRY": self.registry}
        with self._lock:
            self._count += 1
            teacher = TeacherProcess(*self._command(), env=env, ready_timeout_s=self.ready_timeout_s,
                                     log_path=self.log_dir / f"teacher-{self._count}.log")
            teacher.launch()
            self.procs.append(teacher)  # at once: stop_all() must reach it whatever happens next
        return teacher

    def _command(self) -> tuple[str, ...]:
        """``(model, *serve_args)`` of the next teacher."""
        return (self.model, *self.serve_args)

    def snapshot(self) -> list[TeacherProcess]:
        """The teachers launched so far (a copy, safe to read while another thread starts one)."""
        with self._lock:
            return list(self.procs)

    def start(self) -> TeacherProcess:
        """Start one teacher and wait until it prints its ready line."""
        return self.start_many(1)[0]

    def start_many(self, n: int) -> list[TeacherProcess]:
        """Start ``n`` teachers at once (they boot in parallel) and wait for all.

        Raises:
            StudentError: a teacher exited or did not get ready in time (one
                line, ending with the teacher's error and its log's path); the
                caller's :meth:`stop_all` ends the others.
        """
        launched = [self._launch() for _ in range(n)]
        for teacher in launched:
            try:
                teacher.wait_ready()
            except TeacherStartError as exc:
                raise StudentError(f"demo {exc.summary}") from None
        return launched

    def stop_all(self) -> None:
        """SIGTERM every teacher (they drain in parallel); SIGKILL what is left after ``grace_s``."""
        close_all(self.snapshot(), grace_s=self.grace_s)


class TeacherFleet(ProcessFleet):
    """Teacher server processes serving the digits demo's teacher checkpoint."""

    def __init__(self, checkpoint: pathlib.Path, hidden: int, registry: str, log_dir: pathlib.Path) -> None:
        super().__init__("teacher_server.zoo:mlp", registry=registry, log_dir=log_dir,
                         env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        self.checkpoint, self.hidden = checkpoint, hidden

    def _command(self) -> tuple[str, ...]:
        # read at each launch: tests point the fleet at another checkpoint between launches
        return (self.model,
                "--model-kwargs", json.dumps({"hidden": self.hidden}),
                "--checkpoint", str(self.checkpoint),
                "--name", "digits-mlp", "--version", "1",
                "--service", SERVICE,
                "--max-queue-delay-ms", "1")


class LiveSampler:
    """Samples the registry's live-teacher count every ``period_s`` in a thread."""

    def __init__(self, watcher, t0: float, period_s: float = 0.1) -> None:
        self.samples: list[tuple[float, int]] = []
        self.endpoints: set[str] = set()  # every teacher seen live in the registry
        self._watcher, self._t0, self._period_s = watcher, t0, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edistill-demo-live", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            live = self._watcher.snapshot()
            self.endpoints.update(live)
            self.samples.append((time.monotonic() - self._t0, len(live)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def check_registry(url: str) -> None:
    """PING the registry the demo was given.

    Raises:
        registry.RegistryError: unreachable, bad URL or credentials (URL redacted).
    """
    from redis import exceptions as redis_exc

    from registry import connect
    from registry.connection import map_redis_error

    client = connect(url)
    try:
        client.ping()
    except (redis_exc.RedisError, OSError) as exc:
        raise map_redis_error(exc, url, "answering the demo's PING") from exc
    finally:
        client.close()
