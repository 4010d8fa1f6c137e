"""Errors raised by the student client.

Every error a user can meet derives from :class:`StudentError`, so a training
script (or the ``edistill`` CLI) can catch one base class::

    StudentError
    ├── ConfigError               a bad argument or an unsupported configuration
    │                             (also a ValueError); raised at construction
    ├── SourceClosedError         submit() after close(), or work cut off by close()
    ├── AnswerMissingError        a source has no answer for these samples (e.g. a
    │                             cache miss); a FallbackSource asks the next source
    ├── CacheError                a recorded cache (student_client.cache) cannot be used
    │   ├── CacheCorruptError     a shard's bytes do not match its checksum (names the file)
    │   └── CacheMismatchError    recorded with other outputs / teacher / dataset than asked
    │                             (also a ConfigError); says what differs
    ├── NoTeacherAvailableError   no teacher answered for wait_timeout_s; names every
    │                             endpoint and its last error
    └── TeacherRequestError       a teacher refused a request for a reason that
        │                         retrying elsewhere cannot fix (INVALID_ARGUMENT,
        │                         PERMISSION_DENIED, ...), or a request kept crashing
        │                         teachers; carries ``code``, ``details``, ``endpoint``
        └── TeacherResponseError  a teacher answered with something that cannot be
                                  decoded (missing output, malformed tensor)

``grpc.RpcError`` never escapes this package: it is mapped at the boundary with
``raise ... from exc`` (or, for errors delivered through a future, with
``__cause__`` set to the original RpcError).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AnswerMissingError",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "ConfigError",
    "NoTeacherAvailableError",
    "SourceClosedError",
    "StudentError",
    "TeacherRequestError",
    "TeacherResponseError",
]


class StudentError(Exception):
    """Base class of every error raised by ``student_client``."""


class ConfigError(StudentError, ValueError):
    """A constructor argument or configuration value is invalid or unsupported."""


class SourceClosedError(StudentError):
    """The knowledge source was closed before (or while) the request was served."""


class AnswerMissingError(StudentError):
    """A source has no answer for (some of) the batch's samples, e.g. keys not in a cache.

    Attributes:
        keys: the sample keys it has no answer for (None if unknown).
    """

    def __init__(self, message: str, *, keys: Any = None) -> None:
        super().__init__(message)
        self.keys = keys


class CacheError(StudentError):
    """A recorded cache of teacher answers cannot be read or written as asked."""


class CacheCorruptError(CacheError):
    """A cache file is damaged (checksum mismatch, truncated, unreadable).

    Attributes:
        path: the damaged file; delete it and record again to refill its samples.
    """

    def __init__(self, message: str, *, path: Any = None) -> None:
        super().__init__(message)
        self.path = path


class CacheMismatchError(CacheError, ConfigError):
    """The cache was recorded with other outputs, teacher or dataset than the caller asks for."""


class NoTeacherAvailableError(StudentError):
    """No teacher has answered for ``wait_timeout_s`` while work was waiting.

    Attributes:
        endpoints: ``{address: description of its state and last error}`` at the
            time the pool gave up (empty when the pool had no endpoints at all).
        wait_timeout_s: the configured wait.
    """

    def __init__(self, message: str, *, endpoints: dict[str, str] | None = None,
                 wait_timeout_s: float | None = None) -> None:
        super().__init__(message)
        self.endpoints = dict(endpoints or {})
        self.wait_timeout_s = wait_timeout_s


class TeacherRequestError(StudentError):
    """A teacher rejected a request in a way that retrying cannot fix.

    Attributes:
        code: the gRPC status code name (``"INVALID_ARGUMENT"``), or ``None``.
        details: the teacher's own message.
        endpoint: the teacher that answered.
        batch_id: the batch the request carried.
    """

    def __init__(self, message: str, *, code: str | None = None, details: str = "",
                 endpoint: str | None = None, batch_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details
        self.endpoint = endpoint
        self.batch_id = batch_id


class TeacherResponseError(TeacherRequestError):
    """A teacher's answer could not be decoded into the requested outputs."""
