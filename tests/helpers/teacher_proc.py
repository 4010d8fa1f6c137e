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

import pathlib

from teacher_server import process as _process
from teacher_server.process import READY_PREFIX, TeacherStartError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

__all__ = ["READY_PREFIX", "REPO_ROOT", "TeacherProcess", "TeacherStartError"]


class TeacherProcess(_process.TeacherProcess):
    """A teacher server subprocess started from :data:`REPO_ROOT` (see the module docstring)."""

    def __init__(self, model: str, *serve_args: str, **kwargs) -> None:
        kwargs.setdefault("cwd", REPO_ROOT)
        kwargs["pythonpath"] = [REPO_ROOT, *kwargs.get("pythonpath", ())]
        super().__init__(model, *serve_args, **kwargs)
