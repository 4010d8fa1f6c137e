"""edistill student side: pipeline teacher outputs into a PyTorch training loop.

Public names (imported lazily, so ``import student_client`` stays cheap and
torch/grpc are loaded only when used):

* :class:`DistillReader` — the data loader with teacher outputs attached.
* :class:`KnowledgeSource`, :class:`SourceRequest` — the source contract;
  :class:`TeacherPool`, :class:`InProcessTeacher`, :class:`FallbackSource`,
  :class:`EnsembleSource` — where the outputs come from.
* :class:`CachedTeacher`, :func:`record`, :class:`RecordResult`, :class:`TeacherInfo` —
  the offline mode: answers recorded to disk by sample key and served from there.
* :class:`OutputSpec`, :class:`TopK` — what is requested and returned.
* :class:`PoolConfig`, :class:`ExponentialBackoff` — pool configuration.
* :func:`kd_loss` and :class:`KDLoss` (Hinton knowledge distillation),
  :class:`CELoss`, :class:`WeightedLoss` and the :class:`Loss` protocol —
  losses that say which teacher outputs they need (:mod:`student_client.losses`).
* :class:`Dense`, :class:`TopK` — dense and sparse teacher answers, carrying
  their transform and temperature.
* the error tree rooted at :class:`StudentError` (see :mod:`student_client.errors`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AnswerMissingError,
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    ConfigError,
    NoTeacherAvailableError,
    SourceClosedError,
    StudentError,
    TeacherRequestError,
    TeacherResponseError,
)

__all__ = [
    "AnswerMissingError",
    "CELoss",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "CachedTeacher",
    "ConfigError",
    "Dense",
    "DistillReader",
    "EnsembleSource",
    "ExponentialBackoff",
    "FallbackSource",
    "InProcessTeacher",
    "KDLoss",
    "KnowledgeSource",
    "Loss",
    "NoTeacherAvailableError",
    "OutputSpec",
    "PoolConfig",
    "PoolStats",
    "ReaderStats",
    "RecordResult",
    "SourceClosedError",
    "SourceRequest",
    "SourceStats",
    "StudentError",
    "TeacherCredentials",
    "TeacherInfo",
    "TeacherPool",
    "TeacherRequestError",
    "TeacherResponseError",
    "TeacherStats",
    "TopK",
    "WeightedLoss",
    "kd_loss",
    "record",
]

_LAZY = {
    "CELoss": "losses",
    "CachedTeacher": "cache",
    "Dense": "outputs",
    "DistillReader": "reader",
    "EnsembleSource": "compose",
    "ExponentialBackoff": "backoff",
    "FallbackSource": "compose",
    "InProcessTeacher": "sources",
    "KDLoss": "losses",
    "KnowledgeSource": "sources",
    "Loss": "losses",
    "OutputSpec": "outputs",
    "PoolConfig": "config",
    "PoolStats": "stats",
    "ReaderStats": "stats",
    "RecordResult": "recording",
    "SourceRequest": "sources",
    "SourceStats": "stats",
    "TeacherCredentials": "credentials",
    "TeacherInfo": "cache",
    "TeacherPool": "pool",
    "TeacherStats": "stats",
    "TopK": "outputs",
    "WeightedLoss": "losses",
    "kd_loss": "losses",
    "record": "recording",
}

if TYPE_CHECKING:
    from .backoff import ExponentialBackoff
    from .cache import CachedTeacher, TeacherInfo
    from .compose import EnsembleSource, FallbackSource
    from .config import PoolConfig
    from .credentials import TeacherCredentials
    from .losses import CELoss, KDLoss, Loss, WeightedLoss, kd_loss
    from .outputs import Dense, OutputSpec, TopK
    from .pool import TeacherPool
    from .reader import DistillReader
    from .recording import RecordResult, record
    from .sources import InProcessTeacher, KnowledgeSource, SourceRequest
    from .stats import PoolStats, ReaderStats, SourceStats, TeacherStats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'student_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
