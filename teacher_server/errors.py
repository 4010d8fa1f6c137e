"""Exceptions raised by the teacher server.

One tree, so the CLI (and callers) can catch :class:`TeacherError` and print
one clear line::

    TeacherError
    ├── ConfigError          a TeacherConfig / CLI value is invalid  (also ValueError)
    ├── ModelLoadError       the model file or factory cannot be loaded or run
    │   └── SignatureError   the model's input signature is unknown or unusable
    ├── TeacherUnreachable   a client-side helper (describe/health) got no answer
    └── RequestError         one Predict request cannot be served; carries the
        │                    gRPC status code the servicer answers with
        ├── InvalidRequest   INVALID_ARGUMENT: the request does not match the model
        ├── QueueFull        RESOURCE_EXHAUSTED: the batch queue is at max_queue_size
        ├── ServerClosing    UNAVAILABLE: the server is draining; retry elsewhere
        └── InferenceFailed  INTERNAL: the forward pass or a transform raised

Request errors are created on the hot path, so they are cheap plain
exceptions; their message is sent to the client as the status details.
"""

from __future__ import annotations

import grpc

__all__ = [
    "ConfigError",
    "InferenceFailed",
    "InvalidRequest",
    "ModelLoadError",
    "QueueFull",
    "RequestError",
    "ServerClosing",
    "SignatureError",
    "TeacherError",
    "TeacherUnreachable",
]


class TeacherError(Exception):
    """Base class of every error raised by :mod:`teacher_server`."""


class ConfigError(TeacherError, ValueError):
    """A configuration value is invalid; the message names it and the bad value."""


class ModelLoadError(TeacherError):
    """The model could not be loaded or failed its warm-up forward pass."""


class SignatureError(ModelLoadError):
    """No usable input signature: pass ``--input-spec`` or embed one when saving."""


class TeacherUnreachable(TeacherError):
    """A teacher address did not answer (CLI ``describe``/``health``)."""


class RequestError(TeacherError):
    """A single request failed; ``code`` is the gRPC status to answer with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(RequestError):
    """The request does not match the model's signature or the server's limits."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class QueueFull(RequestError):
    """The batch queue holds ``max_queue_size`` requests already."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ServerClosing(RequestError):
    """The server is draining and accepts no new work."""

    code = grpc.StatusCode.UNAVAILABLE


class InferenceFailed(RequestError):
    """The model's forward pass (or an output transform) raised."""

    code = grpc.StatusCode.INTERNAL
