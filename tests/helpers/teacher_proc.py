"""``TeacherProcess`` for tests: :class:`teacher_server.process.TeacherProcess` run from the repository.

    with TeacherProcess("teacher_server.zoo:latency", "--max-batch-size", "32") as t:
        channel = grpc.insecure_channel(t.address)
        ...

The launcher itself (ready line, deadline, log file, SIGTERM-then-SIGKILL)
is the library's; here the child runs in the repository root with it first
on ``PYTHONPATH``, so factory specs from the ``tests`` package
(``tests.helpers...:factory``) are importable by the server.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
from collections.abc import Mapping

from teacher_server import process as _process
from teacher_server.process import READY_PREFIX, TeacherStartError, close_all

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
LATENCY = "teacher_server.zoo:latency"

__all__ = ["LATENCY", "READY_PREFIX", "REPO_ROOT", "TeacherProcess", "TeacherStartError", "start_teachers"]


class TeacherProcess(_process.TeacherProcess):
    """A teacher server subprocess started from :data:`REPO_ROOT` (see the module docstring)."""

    def __init__(self, model: str, *serve_args: str, **kwargs) -> None:
        kwargs.setdefault("cwd", REPO_ROOT)
        kwargs["pythonpath"] = [REPO_ROOT, *kwargs.get("pythonpath", ())]
        super().__init__(model, *serve_args, **kwargs)


def start_teachers(n: int, *serve_args: str, env: Mapping[str, str] | None = None,
                   model: str = LATENCY) -> list[TeacherProcess]:
    """``n`` teacher processes of ``model`` started in parallel (each takes seconds to import torch and load).

    If one fails to start, every one is closed again and its error raised.
    """
    procs = [TeacherProcess(model, *serve_args, env=env) for _ in range(n)]
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        outcomes = [ex.submit(p.start) for p in procs]
    errors = [f.exception() for f in outcomes if f.exception() is not None]
    if errors:
        close_all(procs)
        raise errors[0]
    return procs
