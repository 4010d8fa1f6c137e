"""Run a teacher server on a private event loop in a background thread.

For tests and for programs that serve a model while doing other work (e.g.
codistillation peers)::

    with BackgroundTeacher(TeacherConfig(), LoadedModel.from_module(net)) as t:
        channel = grpc.insecure_channel(t.address)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Callable

from teacher_server.config import TeacherConfig
from teacher_server.model import LoadedModel
from teacher_server.server import TeacherServer

__all__ = ["BackgroundTeacher"]


class BackgroundTeacher:
    """A :class:`TeacherServer` on its own loop thread: ``start()``/``close()`` or ``with``."""

    def __init__(self, config: TeacherConfig, model: LoadedModel, *, start_timeout_s: float = 30.0,
                 configure: Callable[[TeacherServer], None] | None = None) -> None:
        self.config = config
        self.model = model
        self.start_timeout_s = start_timeout_s
        # Runs before the server starts, e.g. lambda s: RegistryHook(s, url, service), as serve(configure=).
        self.configure = configure
        self.server: TeacherServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edistill-teacher-loop", daemon=True)

    @property
    def address(self) -> str:
        """``host:port`` to connect to."""
        assert self.server is not None, "call start() first"
        return self.server.address

    def start(self) -> "BackgroundTeacher":
        """Start the loop thread and the server; raises what ``TeacherServer.start`` raises."""
        self._thread.start()

        async def _start() -> TeacherServer:
            server = TeacherServer(self.config, self.model)
            if self.configure is not None:
                self.configure(server)
            await server.start()
            return server

        try:
            self.server = self.call(_start(), timeout_s=self.start_timeout_s)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def call(self, coro, timeout_s: float | None = None):
        """Run ``coro`` on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def swap_model(self, model: Any, version: str, *, timeout_s: float = 30.0,
                   source: str = "<swapped-in module>") -> LoadedModel:
        """Serve ``model`` (a fresh module or a LoadedModel) as ``version`` from the next forward pass on.

        The warm-up runs in this thread; the reference swap runs on the
        server's loop, between requests (:mod:`teacher_server.swap`).
        Raises SignatureError when ``model`` takes or returns other tensors.
        """
        from teacher_server.swap import install_model, prepare_model

        assert self.server is not None, "call start() first"
        loaded = prepare_model(self.server, model, source=source)  # source: names it in logs

        async def _install() -> None:
            install_model(self.server, loaded, version)

        self.call(_install(), timeout_s=timeout_s)
        return loaded

    def close(self, grace_s: float = 0.0) -> None:
        """Drain for up to ``grace_s``, stop the server and the loop thread."""
        if self.server is not None and self._thread.is_alive():
            try:
                self.call(self.server.stop(grace_s), timeout_s=grace_s + 30.0)
            except concurrent.futures.TimeoutError:
                pass
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "BackgroundTeacher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
