"""Log a Redis outage once, not once per heartbeat or poll."""

from __future__ import annotations

import logging
import time

from registry.connection import map_redis_error

__all__ = ["OutageLog"]


class OutageLog:
    """Tracks whether Redis is reachable for one component and logs transitions.

    The first failure logs a WARNING (URL redacted); later failures of the
    same outage log at DEBUG; the first success afterwards logs INFO with
    the outage's duration. Not thread-safe: use from one thread (or under a lock).
    """

    def __init__(self, logger: logging.Logger, url: str, who: str) -> None:
        self._logger = logger
        self._url = url
        self._who = who
        self._down_since: float | None = None
        self.last_error: Exception | None = None

    @property
    def down(self) -> bool:
        """Whether the last attempt failed."""
        return self._down_since is not None

    def failed(self, exc: BaseException, action: str, consequence: str) -> None:
        """Record a failed attempt at ``action``; warn if it starts an outage."""
        error = map_redis_error(exc, self._url, action)
        self.last_error = error
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._logger.warning("%s: %s; %s (logged once until Redis answers again)", self._who, error, consequence)
        else:
            self._logger.debug("%s: still failing: %s", self._who, error)

    def ok(self) -> bool:
        """Record a success; returns True if it ended an outage (logged at INFO)."""
        self.last_error = None
        if self._down_since is None:
            return False
        elapsed = time.monotonic() - self._down_since
        self._down_since = None
        self._logger.info("%s: Redis is reachable again after %.1fs", self._who, elapsed)
        return True
