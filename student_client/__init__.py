"""edistill student side: pipeline teacher outputs into a PyTorch training loop.

Public names (imported lazily, so ``import student_client`` stays cheap and
torch/grpc are loaded only when used):

* :class:`DistillReader` — the data loader with teacher outputs attached.
* :class:`KnowledgeSource`, :class:`TeacherPool`, :class:`InProcessTeacher` —
  where the outputs come from.
* :class:`OutputSpec`, :class:`TopK` — what is requested and returned.
* :class:`PoolConfig`, :class:`ExponentialBackoff` — pool configuration.
* :func:`kd_loss`, :func:`kd_loss_dense`, :func:`kd_loss_topk`, :class:`KDLoss`,
  :class:`TopKKDLoss` — Hinton knowledge distillation.
* the error tree rooted at :class:`StudentError` (see :mod:`student_client.errors`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    NoTeacherAvailableError,
    SourceClosedError,
    StudentError,
    TeacherRequestError,
    TeacherResponseError,
)

__all__ = [
    "ConfigError",
    "DistillReader",
    "ExponentialBackoff",
    "InProcessTeacher",
    "KDLoss",
    "KnowledgeSource",
    "NoTeacherAvailableError",
    "OutputSpec",
    "PoolConfig",
    "PoolStats",
    "ReaderStats",
    "SourceClosedError",
    "StudentError",
    "TeacherCredentials",
    "TeacherPool",
    "TeacherRequestError",
    "TeacherResponseError",
    "TeacherStats",
    "TopK",
    "TopKKDLoss",
    "kd_loss",
    "kd_loss_dense",
    "kd_loss_topk",
]

_LAZY = {
    "DistillReader": "reader",
    "ExponentialBackoff": "backoff",
    "InProcessTeacher": "sources",
    "KDLoss": "losses",
    "KnowledgeSource": "sources",
    "OutputSpec": "outputs",
    "PoolConfig": "config",
    "PoolStats": "stats",
    "ReaderStats": "stats",
    "TeacherCredentials": "credentials",
    "TeacherPool": "pool",
    "TeacherStats": "stats",
    "TopK": "outputs",
    "TopKKDLoss": "losses",
    "kd_loss": "losses",
    "kd_loss_dense": "losses",
    "kd_loss_topk": "losses",
}

if TYPE_CHECKING:
    from .backoff import ExponentialBackoff
    from .config import PoolConfig
    from .credentials import TeacherCredentials
    from .losses import KDLoss, TopKKDLoss, kd_loss, kd_loss_dense, kd_loss_topk
    from .outputs import OutputSpec, TopK
    from .pool import TeacherPool
    from .reader import DistillReader
    from .sources import InProcessTeacher, KnowledgeSource
    from .stats import PoolStats, ReaderStats, TeacherStats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'student_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
