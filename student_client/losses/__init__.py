"""Distillation losses: what each needs from the teacher, and the loss of a batch.

Every loss is a :class:`Loss` (an ``nn.Module``) with ``needs`` (the teacher
outputs it reads, as :class:`~student_client.outputs.OutputSpec`) and a call
``loss(student, teacher, labels=None)``. Losses scale and add into a
:class:`WeightedLoss` whose needs are the union of its terms', so the reader
requests what the loss reads (``DistillReader(..., outputs=loss)``) and each
output is stated once::

    criterion = 0.9 * KDLoss(temperature=4.0) + 0.1 * CELoss()

Modules, one family each (each loss cites its paper and gives its formula):

* :mod:`.response` -- Hinton KD over dense or top-k answers (:func:`kd_loss`,
  :class:`KDLoss`) and the hard-label :class:`CELoss`.
* :mod:`.feature` -- FitNets hints with a trainable regressor (:func:`hint_loss`,
  :class:`HintLoss`) and attention transfer (:func:`attention_transfer_loss`,
  :class:`AttentionTransferLoss`).
* :mod:`.relation` -- relational KD (:func:`rkd_loss`, :class:`RKDLoss`) and
  similarity-preserving KD (:func:`similarity_preserving_loss`,
  :class:`SimilarityPreservingLoss`).
* :mod:`.base` -- the protocol (:class:`Loss`) and :class:`WeightedLoss`.

* :mod:`.sequence` -- token-level forward/reverse KL and generalized JSD for
  language models over dense, top-k or sampled teachers, masked and chunked
  (:func:`sequence_kd_loss`, :class:`SequenceKDLoss`).
"""

from __future__ import annotations

from .base import Loss, OneOutputLoss, WeightedLoss
from .feature import AttentionTransferLoss, HintLoss, attention_transfer_loss, hint_loss
from .relation import RKDLoss, SimilarityPreservingLoss, rkd_loss, similarity_preserving_loss
from .response import CELoss, KDLoss, kd_loss
from .sequence import SequenceKDLoss, sequence_kd_loss

__all__ = ["AttentionTransferLoss", "CELoss", "HintLoss", "KDLoss", "Loss", "OneOutputLoss", "RKDLoss", "SequenceKDLoss",
           "SimilarityPreservingLoss", "WeightedLoss", "attention_transfer_loss", "hint_loss", "kd_loss", "rkd_loss",
           "sequence_kd_loss", "similarity_preserving_loss"]
