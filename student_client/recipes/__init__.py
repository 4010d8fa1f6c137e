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

from .born_again import BornAgain, Generation
from .byot import BYOT, BYOTOutput
from .codistill import CodistillConfig, Codistillation
from .dml import DeepMutualLearning
from .mean_teacher import DecoupledMeanTeacher
from .peers import PeerSource, PeerSourceStats, PeerStats
from .pskd import PSKD, PastPredictions

__all__ = [
    "BYOT",
    "BYOTOutput",
    "BornAgain",
    "CodistillConfig",
    "Codistillation",
    "DecoupledMeanTeacher",
    "DeepMutualLearning",
    "Generation",
    "PSKD",
    "PastPredictions",
    "PeerSource",
    "PeerSourceStats",
    "PeerStats",
]
