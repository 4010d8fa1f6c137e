"""Registry discovery for a teacher pool: follow a service's live teachers.

:meth:`TeacherPool.from_registry <student_client.pool.TeacherPool.from_registry>`
makes a :class:`RegistryFollower`, which runs a
:class:`registry.TeacherWatcher` and hands every change of the service's
live set to :meth:`TeacherPool.set_endpoints`. It also explains an empty
pool: a registry that cannot be reached, or a service with no live teacher,
reads very differently from "every teacher failed", and the pool alone
cannot tell them apart.

At start (the watcher's first read happens in :meth:`RegistryFollower.start`,
so within a connect timeout) it logs a WARNING when Redis is unreachable or
the service has no live teacher, naming the services that do have some;
students may start before their teachers, so this is not an error, and the
pool repeats a "waiting for teachers of SERVICE at REGISTRY" line while
batches wait (:mod:`student_client._pool_members`).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from .errors import ConfigError

__all__ = ["RegistryFollower"]

logger = logging.getLogger(__name__)


class RegistryFollower:
    """Keeps a pool's endpoints equal to a registry service's live teachers.

    Args:
        url: Redis URL of the registry (auth and TLS as redis-py takes them).
        service: the teachers' service name.
        set_endpoints: the pool's :meth:`~student_client.pool.TeacherPool.set_endpoints`.
        poll_s: how often the watcher re-reads the service (None: its default,
            1 s; join/leave events take effect sooner).
    """

    def __init__(self, url: str, service: str, set_endpoints: Callable[[Iterable[str]], None], *,
                 poll_s: float | None = None) -> None:
        from registry import RegistryError, TeacherWatcher, redact_url

        if not isinstance(service, str) or not service:
            raise ConfigError(f"a registry needs service='name' (the teachers' service), got {service!r}")
        self.url, self.service = url, service
        self._url = redact_url(url)  # never the password, in logs or errors
        self.where = f"service {service!r} at {self._url}"
        self._set_endpoints = set_endpoints
        self._last: list[str] | None = None
        kwargs = {} if poll_s is None else {"poll_s": poll_s}
        try:
            self._watcher = TeacherWatcher(url, service, on_change=self._on_change, **kwargs)
        except RegistryError as exc:  # bad URL ('local'), bad option: keep one error tree
            raise ConfigError(f"cannot use the registry: {exc}") from exc

    def start(self, wait_timeout_s: float | None = None) -> None:
        """Start watching: one read now, then the watcher's thread; warn at once if nothing is there.

        Args:
            wait_timeout_s: how long batches will wait for a teacher (named in the warning).
        """
        from registry import RegistryError

        try:
            self._watcher.start()
        except RegistryError as exc:  # refused credentials
            raise ConfigError(f"cannot use the registry: {exc}") from exc
        problem = self.explain(bool(self._watcher.snapshot()))
        if problem is not None:
            until = "" if wait_timeout_s is None else f"; batches wait up to wait_timeout_s={wait_timeout_s:g} s"
            logger.warning("%s Waiting for teachers of %s (students may start before their teachers)%s.",
                           problem, self.where, until)

    @property
    def waiting_for(self) -> str:
        """``"teachers of service 'x' at redis://..."``, for the pool's waiting lines and errors."""
        return f"teachers of {self.where}"

    def _on_change(self, snapshot) -> None:
        """Watcher thread: the live teacher set (or a record's content, e.g. its load) changed."""
        endpoints = sorted(snapshot)
        if endpoints != self._last:  # a join or a leave; load updates are routine
            logger.info("registry: %s has %d live teacher(s): %s", self.where, len(endpoints),
                        ", ".join(endpoints) or "none")
        else:
            logger.debug("registry: teacher records of %s updated", self.where)
        self._last = endpoints
        try:
            self._set_endpoints(endpoints)
        except Exception:  # a closed pool during shutdown, or a bad record: keep the watcher alive
            logger.warning("could not apply the registry's teacher set %s", endpoints, exc_info=True)

    def explain(self, has_endpoints: bool) -> str | None:
        """Why a pool fed by this registry may have no teacher (None: the registry is fine).

        Cheap and lock-free (no Redis call): the pool calls it under its lock.
        """
        cause = self._watcher.last_error
        if cause is not None:
            return (f"The teacher registry {self._url} is unreachable, so no teacher could be discovered: "
                    f"{str(cause).rstrip('.')}. Check the registry URL and that Redis is running.")
        if not has_endpoints:
            others = self._watcher.other_services  # cached by the watcher thread: no Redis call here
            if others is None:
                known = ""
            elif others:
                known = f" Services with live teachers there: {', '.join(others)}."
            else:
                known = " No service has live teachers there yet."
            return (f"The registry {self._url} lists no live teacher for service {self.service!r}.{known} Check "
                    f"the service name (`edistill registry ls` lists them) and that teachers were started with "
                    f"--registry and --service {self.service}.")
        return None

    def close(self) -> None:
        try:
            self._watcher.close()
        except Exception:  # closing must not mask the training loop's own error
            logger.warning("closing the registry watcher failed", exc_info=True)
