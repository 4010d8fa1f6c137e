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
  :class:`HintLoss`/:func:`hint_loss`, :class:`AttentionTransferLoss`/:func:`attention_transfer_loss`,
  :class:`RKDLoss`/:func:`rkd_loss`, :class:`SimilarityPreservingLoss`/:func:`similarity_preserving_loss`,
  :class:`CELoss`, :class:`WeightedLoss` and the :class:`Loss` protocol —
  losses that say which teacher outputs they need (:mod:`student_client.losses`).
* :class:`SequenceKDLoss`/:func:`sequence_kd_loss` — token-level KL / JSD for language models;
  :class:`Sampled` — sampled per-token answers.
* :class:`Dense`, :class:`TopK` — dense and sparse teacher answers, carrying
  their transform and temperature.
* recipes (:mod:`student_client.recipes`): :class:`Codistillation` over a
  :class:`PeerSource`, :class:`DeepMutualLearning`, :class:`DecoupledMeanTeacher`,
  :class:`BornAgain`, :class:`PSKD` over :class:`PastPredictions`, :class:`BYOT`.
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
    "AttentionTransferLoss",
    "BYOT",
    "BornAgain",
    "CELoss",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "CachedTeacher",
    "CodistillConfig",
    "Codistillation",
    "ConfigError",
    "DecoupledMeanTeacher",
    "DeepMutualLearning",
    "Dense",
    "DistillReader",
    "EnsembleSource",
    "ExponentialBackoff",
    "FallbackSource",
    "HintLoss",
    "InProcessTeacher",
    "KDLoss",
    "KnowledgeSource",
    "Loss",
    "NoTeacherAvailableError",
    "OutputSpec",
    "PSKD",
    "PastPredictions",
    "PeerSource",
    "PoolConfig",
    "PoolStats",
    "RKDLoss",
    "ReaderStats",
    "RecordResult",
    "Sampled",
    "SequenceKDLoss",
    "SimilarityPreservingLoss",
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
    "attention_transfer_loss",
    "hint_loss",
    "kd_loss",
    "record",
    "rkd_loss",
    "sequence_kd_loss",
    "similarity_preserving_loss",
]

_LAZY = {
    "AttentionTransferLoss": "losses",
    "BYOT": "recipes",
    "BornAgain": "recipes",
    "CELoss": "losses",
    "CachedTeacher": "cache",
    "CodistillConfig": "recipes",
    "Codistillation": "recipes",
    "DecoupledMeanTeacher": "recipes",
    "DeepMutualLearning": "recipes",
    "Dense": "outputs",
    "DistillReader": "reader",
    "EnsembleSource": "compose",
    "ExponentialBackoff": "backoff",
    "FallbackSource": "compose",
    "HintLoss": "losses",
    "InProcessTeacher": "sources",
    "KDLoss": "losses",
    "KnowledgeSource": "sources",
    "Loss": "losses",
    "OutputSpec": "outputs",
    "PSKD": "recipes",
    "PastPredictions": "recipes",
    "PeerSource": "recipes",
    "PoolConfig": "config",
    "PoolStats": "stats",
    "RKDLoss": "losses",
    "ReaderStats": "stats",
    "RecordResult": "recording",
    "Sampled": "outputs",
    "SequenceKDLoss": "losses",
    "SimilarityPreservingLoss": "losses",
    "SourceRequest": "sources",
    "SourceStats": "stats",
    "TeacherCredentials": "credentials",
    "TeacherInfo": "cache",
    "TeacherPool": "pool",
    "TeacherStats": "stats",
    "TopK": "outputs",
    "WeightedLoss": "losses",
    "attention_transfer_loss": "losses",
    "hint_loss": "losses",
    "kd_loss": "losses",
    "record": "recording",
    "rkd_loss": "losses",
    "sequence_kd_loss": "losses",
    "similarity_preserving_loss": "losses",
}

if TYPE_CHECKING:
    from .recipes import (BYOT, PSKD, BornAgain, CodistillConfig, Codistillation, DecoupledMeanTeacher,
                          DeepMutualLearning, PastPredictions, PeerSource)
    from .backoff import ExponentialBackoff
    from .cache import CachedTeacher, TeacherInfo
    from .compose import EnsembleSource, FallbackSource
    from .config import PoolConfig
    from .credentials import TeacherCredentials
    from .losses import (AttentionTransferLoss, CELoss, HintLoss, KDLoss, Loss, RKDLoss, SimilarityPreservingLoss,
                         WeightedLoss, attention_transfer_loss, hint_loss, kd_loss, rkd_loss,
                         similarity_preserving_loss)
    from .losses import SequenceKDLoss, sequence_kd_loss
    from .outputs import Dense, OutputSpec, Sampled, TopK
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
