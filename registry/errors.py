"""The registry's exceptions, one tree for the whole package.

::

    RegistryError                      base: catch this to handle any registry failure
    ├── RegistryConfigError            bad URL, service name or option (also a ValueError)
    ├── RegistryUnavailableError       Redis cannot be reached or answered with an error
    │   └── RegistryAuthError          Redis refused the password/ACL user or lacks a permission
    ├── BadRecordError                 a teacher record is malformed, oversized or of an
    │                                  unknown schema (also a ValueError)
    └── EmbeddedRedisError             the embedded redis-server could not start or stop

Redis errors are mapped at the boundary (``raise RegistryUnavailableError(...)
from exc``) by :func:`registry.connection.map_redis_error`. Every message that
names a Redis URL goes through :func:`registry.urls.redact_url` first, so a
password never appears in an exception or a log line.
"""

from __future__ import annotations

__all__ = [
    "BadRecordError",
    "EmbeddedRedisError",
    "RegistryAuthError",
    "RegistryConfigError",
    "RegistryError",
    "RegistryUnavailableError",
]


class RegistryError(Exception):
    """Base class of every error raised by the ``registry`` package."""


class RegistryConfigError(RegistryError, ValueError):
    """A URL, service name or option is invalid; the message names it and the fix."""


class RegistryUnavailableError(RegistryError):
    """Redis could not be reached, timed out, or failed a command.

    The message names the Redis URL with its password redacted.
    """


class RegistryAuthError(RegistryUnavailableError):
    """Redis rejected the credentials in the URL, or the ACL user lacks a permission."""


class BadRecordError(RegistryError, ValueError):
    """A teacher record is not valid JSON, too large, or does not match the schema."""


class EmbeddedRedisError(RegistryError):
    """The embedded redis-server failed to start (the message carries its log) or stop."""
