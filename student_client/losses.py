"""Response-based knowledge-distillation losses (Hinton et al., 2015).

Reference: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a
Neural Network", NIPS Deep Learning Workshop 2015, arXiv:1503.02531.

Dense teacher outputs
---------------------
With student logits ``s`` and teacher distribution ``q`` over ``C`` classes,
temperature ``T``, hard labels ``y`` and weight ``λ`` (``ce_weight``)::

    p   = softmax(s / T)
    q   = softmax(t / T)         for raw teacher logits t ("raw"),
          the teacher's answer   for "probs" / "log_probs" (already at T)
    L   = T² · KL(q ‖ p) + λ · CE(s, y)
    KL(q ‖ p) = Σ_c q_c · (log q_c − log p_c)
    CE(s, y)  = −log softmax(s)_y          (temperature 1, as in the paper)

``T²`` keeps the gradient of the soft term at the same scale whatever the
temperature (its gradients scale as 1/T², Hinton et al. §2). Every leading
dimension is a sample: ``s`` of shape ``(B, C)`` or ``(B, L, C)`` gives B or
B·L rows. ``reduction="mean"`` averages the per-row loss over rows (the
"batchmean" KL, the mathematically correct one; ``torch``'s
``kl_div(reduction="mean")`` would also divide by C), ``"sum"`` sums it,
``"none"`` returns it with the leading shape.

Top-k teacher outputs (:class:`~student_client.outputs.TopK`)
------------------------------------------------------------
Only the k largest teacher entries are known. Two cases:

* ``probs``/``log_probs`` top-k (recommended): the teacher's true
  probabilities ``q_i`` of the kept classes are known, hence also its tail
  mass ``q_tail = 1 − Σ_{i∈K} q_i``. The loss is the KL over k+1 bins, the
  kept classes plus one "everything else" bucket::

      KL_k = Σ_{i∈K} q_i (log q_i − log p_i) + q_tail (log q_tail − log p_tail),
      p_tail = Σ_{j∉K} p_j   (computed as a log-sum-exp over the student's other classes)

  Why: it keeps the teacher's confidence (how much mass lies outside the
  top-k), it never exceeds the full KL (merging classes cannot increase a KL
  divergence, data-processing inequality), it is zero exactly when the
  student matches the teacher on the kept classes and on the total tail,
  and it equals the full KL when k = C. The student is free in how it spreads
  its tail, which is what the teacher's answer cannot tell.
* ``raw`` top-k logits: the teacher's tail mass is unknown, so the kept
  logits are renormalised, ``q_i = softmax(v / T)`` over the k entries, and the
  loss is ``Σ_{i∈K} q_i (log q_i − log p_i)`` with the student's full
  log-probabilities ``log p_i``: the KL to a teacher with no mass outside
  the top-k. It pulls the student's mass into the teacher's top-k set and is
  exact when the teacher's tail is negligible; prefer probs/log_probs top-k.

The teacher side is a constant (no gradient flows into it).
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .outputs import TopK

__all__ = ["KDLoss", "TopKKDLoss", "kd_loss", "kd_loss_dense", "kd_loss_topk"]

_REDUCTIONS = ("mean", "sum", "none")
_TRANSFORMS = ("raw", "probs", "log_probs")


def _check(temperature: float, ce_weight: float, reduction: str) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(ce_weight, (int, float)) and math.isfinite(ce_weight) and ce_weight >= 0):
        raise ConfigError(f"ce_weight must be a finite number >= 0, got {ce_weight!r}")
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); half precision is upcast to float32 for a stable softmax."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce(rows: torch.Tensor, lead: torch.Size, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows.reshape(lead)


def _with_ce(kd_rows: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, ce_weight: float,
             lead: torch.Size, reduction: str) -> torch.Tensor:
    if labels is not None and ce_weight:
        y = labels.reshape(-1).to(device=s.device, dtype=torch.long)
        if y.shape[0] != s.shape[0]:
            raise ConfigError(f"labels of shape {tuple(labels.shape)} do not match the student's rows {tuple(lead)}")
        kd_rows = kd_rows + ce_weight * F.cross_entropy(s, y, reduction="none")  # (N,)
    elif ce_weight and labels is None:
        raise ConfigError(f"ce_weight={ce_weight} needs labels=")
    return _reduce(kd_rows, lead, reduction)


def kd_loss_dense(student_logits: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
                  labels: torch.Tensor | None = None, ce_weight: float = 0.0, teacher_transform: str = "raw",
                  reduction: str = "mean") -> torch.Tensor:
    """Hinton KD ``T²·KL(q ‖ softmax(s/T)) + λ·CE(s, y)`` against a dense teacher output.

    Args:
        student_logits: ``(..., C)`` raw student logits.
        teacher: ``(..., C)`` teacher logits (``"raw"``), probabilities
            (``"probs"``) or log-probabilities (``"log_probs"``); the latter two
            must have been computed at ``temperature``.
        labels: ``(...)`` class indices, needed when ``ce_weight > 0``.
        ce_weight: λ, the weight of the hard-label cross-entropy.
        teacher_transform: what ``teacher`` holds (the OutputSpec transform it
            was requested with).
        reduction: ``"mean"`` over rows, ``"sum"`` or ``"none"``.
    """
    _check(temperature, ce_weight, reduction)
    if teacher_transform not in _TRANSFORMS:
        raise ConfigError(f"teacher_transform must be one of {', '.join(_TRANSFORMS)}, got {teacher_transform!r}")
    if teacher.shape != student_logits.shape:
        raise ConfigError(f"teacher output shape {tuple(teacher.shape)} != student logits shape "
                          f"{tuple(student_logits.shape)}")
    C = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, C).to(_compute_dtype(student_logits))  # (N, C); >= float32 under autocast
    t = teacher.detach().reshape(-1, C).to(device=s.device, dtype=s.dtype)  # (N, C)
    log_p = F.log_softmax(s / temperature, dim=-1)  # (N, C)
    if teacher_transform == "raw":
        log_q = F.log_softmax(t / temperature, dim=-1)
        q = log_q.exp()
        plogq = q * log_q
    elif teacher_transform == "probs":
        q = t
        plogq = torch.xlogy(q, q)  # 0·log 0 = 0
    else:
        q = t.exp()
        plogq = torch.where(q > 0, q * t, torch.zeros_like(q))
    kd_rows = (plogq - q * log_p).sum(-1) * (temperature ** 2)  # (N,)
    return _with_ce(kd_rows, s, labels, ce_weight, lead, reduction)


def kd_loss_topk(student_logits: torch.Tensor, teacher: TopK, *, temperature: float = 1.0,
                 labels: torch.Tensor | None = None, ce_weight: float = 0.0,
                 reduction: str = "mean") -> torch.Tensor:
    """Hinton KD against a top-k teacher answer (see the module docstring for the approximation).

    Args:
        student_logits: ``(..., C)`` raw student logits.
        teacher: :class:`TopK` with ``(..., k)`` values/indices and ``dense_shape == (..., C)``;
            for probs/log_probs it must have been computed at ``temperature``.
    """
    _check(temperature, ce_weight, reduction)
    if not isinstance(teacher, TopK):
        raise ConfigError(f"kd_loss_topk needs a TopK teacher output, got {type(teacher).__name__}")
    C = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if tuple(teacher.dense_shape) != tuple(student_logits.shape):
        raise ConfigError(f"teacher dense shape {tuple(teacher.dense_shape)} != student logits shape "
                          f"{tuple(student_logits.shape)}")
    if teacher.transform != "raw" and not math.isclose(teacher.temperature, temperature, rel_tol=1e-6):
        raise ConfigError(f"teacher {teacher.transform} were computed at temperature {teacher.temperature}, "
                          f"the loss uses {temperature}; request the teacher output at the loss's temperature")
    k = teacher.k
    s = student_logits.reshape(-1, C).to(_compute_dtype(student_logits))  # (N, C)
    v = teacher.values.detach().reshape(-1, k).to(device=s.device, dtype=s.dtype)  # (N, k)
    idx = teacher.indices.reshape(-1, k).to(device=s.device, dtype=torch.long)  # (N, k)
    log_p = F.log_softmax(s / temperature, dim=-1)  # (N, C)
    log_p_k = log_p.gather(-1, idx)  # (N, k)
    if teacher.transform == "raw":
        log_q = F.log_softmax(v / temperature, dim=-1)  # renormalised over the k kept logits
        kd_rows = (log_q.exp() * (log_q - log_p_k)).sum(-1)
    else:
        q = v if teacher.transform == "probs" else v.exp()  # (N, k) true teacher probabilities
        q = q.clamp(0.0, 1.0)
        kept = (torch.xlogy(q, q) - q * log_p_k).sum(-1)  # (N,)
        if k >= C:  # nothing outside the top-k: no tail bucket (its rounding residue is noise)
            kd_rows = kept
        else:
            q_tail = (1.0 - q.sum(-1)).clamp(0.0, 1.0)  # (N,) teacher mass outside the top-k
            # log Σ_{j∉K} p_j: the kept classes masked with -inf; with k < C
            # at least one class is left, so the logsumexp is finite.
            log_p_tail = log_p.scatter(-1, idx, float("-inf")).logsumexp(-1)  # (N,)
            tail = torch.xlogy(q_tail, q_tail) - q_tail * log_p_tail
            kd_rows = kept + tail
    kd_rows = kd_rows * (temperature ** 2)
    return _with_ce(kd_rows, s, labels, ce_weight, lead, reduction)


def kd_loss(student_logits: torch.Tensor, teacher: Union[torch.Tensor, TopK], *, temperature: float = 1.0,
            labels: torch.Tensor | None = None, ce_weight: float = 0.0, teacher_transform: str = "raw",
            reduction: str = "mean") -> torch.Tensor:
    """Hinton KD from whatever the reader delivered: a dense tensor or a :class:`TopK`.

    ``teacher_transform`` describes a dense tensor; a TopK carries its own.
    """
    if isinstance(teacher, TopK):
        return kd_loss_topk(student_logits, teacher, temperature=temperature, labels=labels,
                            ce_weight=ce_weight, reduction=reduction)
    return kd_loss_dense(student_logits, teacher, temperature=temperature, labels=labels, ce_weight=ce_weight,
                         teacher_transform=teacher_transform, reduction=reduction)


class KDLoss(nn.Module):
    """``nn.Module`` form of :func:`kd_loss` (dense or top-k teacher outputs).

    Example::

        criterion = KDLoss(temperature=4.0, ce_weight=0.5, teacher_transform="log_probs")
        loss = criterion(student(x), teacher_out["logits"], labels)
    """

    def __init__(self, temperature: float = 1.0, ce_weight: float = 0.0, teacher_transform: str = "raw",
                 reduction: str = "mean") -> None:
        super().__init__()
        _check(temperature, ce_weight, reduction)
        if teacher_transform not in _TRANSFORMS:
            raise ConfigError(f"teacher_transform must be one of {', '.join(_TRANSFORMS)}, got {teacher_transform!r}")
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.teacher_transform = teacher_transform
        self.reduction = reduction

    def forward(self, student_logits: torch.Tensor, teacher: Union[torch.Tensor, TopK],
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss for one batch; see :func:`kd_loss`."""
        return kd_loss(student_logits, teacher, temperature=self.temperature, labels=labels,
                       ce_weight=self.ce_weight, teacher_transform=self.teacher_transform,
                       reduction=self.reduction)

    def extra_repr(self) -> str:
        """Settings shown in ``repr(module)``."""
        return (f"temperature={self.temperature}, ce_weight={self.ce_weight}, "
                f"teacher_transform={self.teacher_transform!r}, reduction={self.reduction!r}")


class TopKKDLoss(KDLoss):
    """:class:`KDLoss` that insists on top-k teacher outputs (catches a dense/top-k mix-up early)."""

    def forward(self, student_logits: torch.Tensor, teacher: TopK,  # type: ignore[override]
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss for one batch; see :func:`kd_loss_topk`."""
        if not isinstance(teacher, TopK):
            raise ConfigError("TopKKDLoss got a dense teacher output; request OutputSpec(top_k=k) or use KDLoss")
        return super().forward(student_logits, teacher, labels)
