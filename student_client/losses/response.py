"""Response-based knowledge distillation (Hinton et al., 2015) and the hard-label term.

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
B·L rows. ``reduction="mean"`` averages the KD term over rows (the
"batchmean" KL, the mathematically correct one; ``torch``'s
``kl_div(reduction="mean")`` would also divide by C) and the CE term over the
*labelled* rows, ``"sum"`` sums both, ``"none"`` returns ``KD + λ·CE`` per row
with the leading shape.

Partly labelled batches: a label equal to ``ignore_index`` (default -100, as
``F.cross_entropy``) contributes no CE, and the mean CE is over the labelled
rows only; with no labelled row the CE term is 0 (not NaN). So KD runs on
every row and CE on the labelled ones, in one call.

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

Temperature
-----------
Answers carry the transform and temperature they were computed with
(:class:`~student_client.outputs.Dense`, :class:`~student_client.outputs.TopK`),
so ``temperature=None`` uses the answer's own. Probabilities and
log-probabilities are fixed at their T: another explicit T is a
:class:`~student_client.errors.ConfigError`. Raw logits (an answer's T is then
1.0) may be softened at any T. A plain tensor holds raw logits unless
``teacher_transform=`` says otherwise, and ``temperature`` defaults to 1.0.

The teacher side is a constant (no gradient flows into it). Computation is in
float32 (float64 stays float64), whatever the student's precision.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..outputs import Dense, OutputSpec, TeacherValue, TopK
from .base import Loss, OneOutputLoss, student_output, teacher_answer

__all__ = ["CELoss", "KDLoss", "kd_loss"]

_REDUCTIONS = ("mean", "sum", "none")
_TRANSFORMS = ("raw", "probs", "log_probs")


def _check_temperature(temperature: Any) -> None:
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                                             and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check(ce_weight: float, reduction: str) -> None:
    if not (isinstance(ce_weight, (int, float)) and math.isfinite(ce_weight) and ce_weight >= 0):
        raise ConfigError(f"ce_weight must be a finite number >= 0, got {ce_weight!r}")
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); half precision is upcast to float32 for a stable softmax."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _resolve(teacher: Any, temperature: float | None, teacher_transform: str | None) -> tuple[str, float]:
    """(transform, T) for this answer: its own metadata, or the caller's for a plain tensor."""
    if teacher_transform is not None and teacher_transform not in _TRANSFORMS:
        raise ConfigError(f"teacher_transform must be one of {', '.join(_TRANSFORMS)}, got {teacher_transform!r}")
    if temperature is not None:
        _check_temperature(temperature)
    if not isinstance(teacher, (TopK, Dense)):
        if not isinstance(teacher, torch.Tensor):
            raise ConfigError(f"the teacher answer must be a tensor, Dense or TopK, got {type(teacher).__name__}"
                              + ("; pass one output, e.g. teacher['logits']" if isinstance(teacher, Mapping) else ""))
        return teacher_transform or "raw", 1.0 if temperature is None else float(temperature)
    transform, own = teacher.transform, float(teacher.temperature)
    if teacher_transform is not None and teacher_transform != transform:
        raise ConfigError(f"teacher_transform={teacher_transform!r}, but the teacher answer holds {transform} "
                          "(answers carry their transform); drop teacher_transform=")
    if temperature is None:
        return transform, own
    if transform != "raw" and not math.isclose(own, temperature, rel_tol=1e-6):
        raise ConfigError(f"teacher {transform} were computed at temperature {own}, the loss uses {temperature}; "
                          "request the teacher output at the loss's temperature, or pass temperature=None")
    return transform, float(temperature)


def _ce_rows(s: torch.Tensor, labels: torch.Tensor, ignore_index: int,
             lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row CE (0 where the label is ``ignore_index``) and the number of labelled rows."""
    y = labels.reshape(-1).to(device=s.device, dtype=torch.long)  # (N,)
    if y.shape[0] != s.shape[0]:
        raise ConfigError(f"labels of shape {tuple(labels.shape)} do not match the student's rows {tuple(lead)}")
    rows = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="none")  # (N,), 0 where ignored
    return rows, (y != ignore_index).sum()


def _reduce(kd_rows: torch.Tensor | None, ce: tuple[torch.Tensor, torch.Tensor] | None, ce_weight: float,
            lead: torch.Size, reduction: str) -> torch.Tensor:
    """Reduce the KD rows and the weighted CE rows; the CE mean is over labelled rows (0 if none)."""
    parts = []
    if kd_rows is not None:
        parts.append(kd_rows.mean() if reduction == "mean" else kd_rows.sum() if reduction == "sum" else kd_rows)
    if ce is not None:
        rows, labelled = ce
        if reduction == "mean":
            term = rows.sum() / labelled.clamp(min=1)
        else:
            term = rows.sum() if reduction == "sum" else rows
        parts.append(ce_weight * term)
    total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return total.reshape(lead) if reduction == "none" else total


def _constant(x: torch.Tensor) -> torch.Tensor:
    """The teacher side as a constant autograd may save: a tensor made under ``torch.inference_mode()``
    (an in-process teacher's answer) cannot be saved for backward, so it is cloned (once, (N, C) or (N, k))."""
    x = x.detach()
    return x.clone() if x.is_inference() else x


def _dense_rows(s: torch.Tensor, t: torch.Tensor, transform: str, temperature: float) -> torch.Tensor:
    """``T²·KL(q ‖ softmax(s/T))`` per row; s, t (N, C)."""
    log_p = F.log_softmax(s / temperature, dim=-1)  # (N, C)
    if transform == "raw":
        log_q = F.log_softmax(t / temperature, dim=-1)
        q = log_q.exp()
        plogq = q * log_q
    elif transform == "probs":
        q = t
        plogq = torch.xlogy(q, q)  # 0·log 0 = 0
    else:
        q = t.exp()
        plogq = torch.where(q > 0, q * t, torch.zeros_like(q))
    return (plogq - q * log_p).sum(-1) * (temperature ** 2)  # (N,)


def _topk_rows(s: torch.Tensor, teacher: TopK, temperature: float) -> torch.Tensor:
    """``T²·KL_k`` per row (see the module docstring); s (N, C)."""
    C, k = s.shape[-1], teacher.k
    v = _constant(teacher.values).reshape(-1, k).to(device=s.device, dtype=s.dtype)  # (N, k)
    idx = _constant(teacher.indices).reshape(-1, k).to(device=s.device, dtype=torch.long)  # (N, k)
    log_p = F.log_softmax(s / temperature, dim=-1)  # (N, C)
    log_p_k = log_p.gather(-1, idx)  # (N, k)
    if teacher.transform == "raw":
        log_q = F.log_softmax(v / temperature, dim=-1)  # renormalised over the k kept logits
        rows = (log_q.exp() * (log_q - log_p_k)).sum(-1)
    else:
        q = v if teacher.transform == "probs" else v.exp()  # (N, k) true teacher probabilities
        q = q.clamp(0.0, 1.0)
        kept = (torch.xlogy(q, q) - q * log_p_k).sum(-1)  # (N,)
        if k >= C:  # nothing outside the top-k: no tail bucket (its rounding residue is noise)
            rows = kept
        else:
            q_tail = (1.0 - q.sum(-1)).clamp(0.0, 1.0)  # (N,) teacher mass outside the top-k
            # log Σ_{j∉K} p_j: the kept classes masked with -inf; with k < C
            # at least one class is left, so the logsumexp is finite.
            log_p_tail = log_p.scatter(-1, idx, float("-inf")).logsumexp(-1)  # (N,)
            rows = kept + torch.xlogy(q_tail, q_tail) - q_tail * log_p_tail
    return rows * (temperature ** 2)


def kd_loss(student_logits: torch.Tensor, teacher: TeacherValue | torch.Tensor, *, temperature: float | None = None,
            labels: torch.Tensor | None = None, ce_weight: float = 0.0, ignore_index: int = -100,
            reduction: str = "mean", teacher_transform: str | None = None) -> torch.Tensor:
    """Hinton KD ``T²·KL(q ‖ softmax(s/T)) + λ·CE(s, y)`` (Hinton et al. 2015, arXiv:1503.02531).

    The formulas, the top-k approximation and the reductions are in the
    module docstring.

    Args:
        student_logits: ``(..., C)`` raw student logits.
        teacher: the teacher's answer: a :class:`~student_client.outputs.Dense`
            or :class:`~student_client.outputs.TopK` (they carry their
            transform and temperature), or a plain ``(..., C)`` tensor.
        temperature: T; ``None`` takes the answer's own (1.0 for a plain tensor).
        labels: ``(...)`` class indices, needed when ``ce_weight > 0``; rows
            labelled ``ignore_index`` get no CE, and the mean CE is over the
            labelled rows (0 when there are none).
        ce_weight: λ, the weight of the hard-label cross-entropy.
        ignore_index: the label of unlabelled rows.
        reduction: ``"mean"`` over rows, ``"sum"`` or ``"none"``.
        teacher_transform: what a plain tensor holds (``"raw"``, ``"probs"``
            or ``"log_probs"``, computed at ``temperature``); default raw logits.

    Raises:
        ConfigError: bad settings, shapes that do not match, ``ce_weight``
            without labels, or a temperature other than a probs/log_probs
            answer's own (the message names both).
    """
    transform, T = _resolve(teacher, temperature, teacher_transform)
    _check(ce_weight, reduction)
    if ce_weight and labels is None:
        raise ConfigError(f"ce_weight={ce_weight} needs labels=")
    shape = tuple(teacher.dense_shape) if isinstance(teacher, TopK) else tuple(teacher.shape)
    if shape != tuple(student_logits.shape):
        raise ConfigError(f"teacher {'dense ' if isinstance(teacher, TopK) else 'output '}shape {shape} != "
                          f"student logits shape {tuple(student_logits.shape)}")
    C = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, C).to(_compute_dtype(student_logits))  # (N, C); >= float32 under autocast
    if isinstance(teacher, TopK):
        kd_rows = _topk_rows(s, teacher, T)
    else:
        t = _constant(teacher).reshape(-1, C).to(device=s.device, dtype=s.dtype)  # (N, C), a plain tensor
        kd_rows = _dense_rows(s, t, transform, T)
    ce = _ce_rows(s, labels, ignore_index, lead) if labels is not None and ce_weight else None
    return _reduce(kd_rows, ce, ce_weight, lead, reduction)


class KDLoss(OneOutputLoss):
    """Hinton KD as a :class:`~student_client.losses.Loss`: it asks for one teacher output and distils it.

    ``L = T²·KL(q ‖ softmax(s/T)) + λ·CE(s, y)`` (Hinton et al. 2015,
    arXiv:1503.02531); see :func:`kd_loss` and the module docstring.

    Args:
        temperature: T, the softening temperature.
        top_k: 0 for the dense answer, k for the teacher's top-k (with a tail
            bucket for probs/log_probs).
        output: the teacher output's name.
        transform: what to ask the teacher for: ``"log_probs"`` (default; the
            teacher does the softmax at T), ``"probs"`` or ``"raw"`` logits
            (softened here at T, so requested at 1.0).
        dtype: the answer's dtype on the wire (float32/float16/bfloat16).
        ce_weight, ignore_index, reduction: as in :func:`kd_loss`.
        student_output: the key of the student's logits when the student is a
            dict of outputs (default: ``output``).

    The answer's own metadata decides how it is read, so a reader asked for
    another spec still gets a correct loss; a plain tensor is taken to hold
    ``transform`` at ``temperature``. Example::

        criterion = KDLoss(temperature=4.0, ce_weight=0.1)
        with DistillReader(loader, teachers=[...], outputs=criterion) as reader:
            for (x, y), teacher in reader:
                loss = criterion(student(x), teacher, labels=y)
    """

    def __init__(self, temperature: float = 4.0, top_k: int = 0, output: str = "logits",
                 transform: str = "log_probs", dtype: str = "float32", ce_weight: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", student_output: str | None = None) -> None:
        _check_temperature(temperature)
        _check(ce_weight, reduction)
        # Validates name, transform, top_k and dtype; raw logits are asked for unsoftened.
        super().__init__(OutputSpec(output, transform, float(temperature) if transform != "raw" else 1.0, top_k,
                                    dtype), student_output)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(self, student: torch.Tensor | Mapping[str, torch.Tensor], teacher: Any,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch.

        Args:
            student: the student's logits, or a dict holding them under ``student_output``.
            teacher: the reader's ``{name: answer}`` dict, or the answer itself.
            labels: class indices for the CE term (``ignore_index`` for unlabelled rows).
        """
        answer = teacher_answer(teacher, self._spec.name, self)
        plain = not isinstance(answer, (TopK, Dense))
        return kd_loss(student_output(student, self.student_output, self), answer, temperature=self.temperature,
                       labels=labels, ce_weight=self.ce_weight, ignore_index=self.ignore_index,
                       reduction=self.reduction, teacher_transform=self._spec.transform if plain else None)

    def extra_repr(self) -> str:
        """Settings shown in ``repr(module)``."""
        spec = self._spec
        return (f"temperature={self.temperature}, top_k={spec.top_k}, output={spec.name!r}, "
                f"transform={spec.transform!r}, dtype={spec.dtype!r}, ce_weight={self.ce_weight}, "
                f"reduction={self.reduction!r}")


class CELoss(Loss):
    """Cross-entropy with the hard labels: the second objective of Hinton et al. 2015 (§2).

    ``CE = −(1/|L|) Σ_{i∈L} log softmax(s_i)_{y_i}`` over the labelled rows
    ``L = {i : y_i ≠ ignore_index}``, and 0 when no row is labelled (not NaN),
    so it adds to a KD term over a partly labelled batch. Needs no teacher
    output. ``reduction="sum"`` sums over the labelled rows, ``"none"`` gives
    per-row values (0 for unlabelled rows).

    Args:
        ignore_index: the label of unlabelled rows.
        student_output: the key of the student's logits when the student is a dict.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", student_output: str = "logits") -> None:
        super().__init__()
        _check(0.0, reduction)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.student_output = student_output

    def forward(self, student: torch.Tensor | Mapping[str, torch.Tensor], teacher: Any = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch; ``teacher`` is not read."""
        if labels is None:
            raise ConfigError("CELoss needs labels=; label unlabelled rows with ignore_index "
                              f"({self.ignore_index})")
        logits = student_output(student, self.student_output, self)
        C = logits.shape[-1]
        lead = logits.shape[:-1]
        s = logits.reshape(-1, C).to(_compute_dtype(logits))  # (N, C)
        return _reduce(None, _ce_rows(s, labels, self.ignore_index, lead), 1.0, lead, self.reduction)

    def extra_repr(self) -> str:
        """Settings shown in ``repr(module)``."""
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
