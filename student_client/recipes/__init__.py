"""Training-loop helpers built from knowledge sources and losses (never a second reader).

* :class:`Codistillation` (Anil et al. 2018): peers on their own shards distil
  from each other's stale snapshots, served and discovered through the
  registry (:class:`PeerSource`).
* :class:`DeepMutualLearning` (Zhang et al. 2018): K peers in one process,
  each minimising CE plus the mean KL to the others.
* :class:`DecoupledMeanTeacher` (DKEL, Shao et al. 2023): EMA teachers
  initialised independently of their students, with a decaying ensemble term.
* :class:`BornAgain` (Furlanello et al. 2018): generation g teaches g+1
  through any source (in-process, the service, a recorded cache).
* :class:`PSKD` (Kim et al. 2021): progressive self-distillation from the
  model's own previous-epoch predictions, fed back through ``observe()``
  (:class:`PastPredictions`).
* :class:`BYOT` (Zhang et al. 2019): auxiliary heads on forward hooks
  distilled from the deepest head.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BYOT",
    "BornAgain",
    "CodistillConfig",
    "Codistillation",
    "DecoupledMeanTeacher",
    "DeepMutualLearning",
    "PSKD",
    "PastPredictions",
    "PeerSource",
    "PeerSourceStats",
    "PeerStats",
]

_LAZY = {
    "BYOT": "byot",
    "BornAgain": "born_again",
    "CodistillConfig": "codistill",
    "Codistillation": "codistill",
    "DecoupledMeanTeacher": "mean_teacher",
    "DeepMutualLearning": "dml",
    "PSKD": "pskd",
    "PastPredictions": "pskd",
    "PeerSource": "peers",
    "PeerSourceStats": "peers",
    "PeerStats": "peers",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'student_client.recipes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
