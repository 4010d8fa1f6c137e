"""Decoupled mean teachers with a decaying ensemble (DKEL).

Reference: B. Shao, Y. Chen, "Decoupled Knowledge with Ensemble Learning for
Online Distillation", arXiv:2312.11218 (2023); it builds on peer
collaborative learning (PCL, Wu & Gong, AAAI 2021).

K students ``z_k`` train together; each has a *mean teacher* ``m_k``, an
exponential moving average of the student's weights that is initialised
**independently** of it (another seed), so early on the teachers' knowledge
is decoupled from the students' and they do not collapse into copies. With
``ens = mean_k z_k`` (the students' online ensemble, detached), peer ``k``
minimises, in epoch ``e``::

    L_k = CE(z_k, y) + r(e)·KD(z_k, ens)
          + r(e)·[ w(e)·KD(z_k, mean_{j≠k} m_j) + (1 - w(e))·mean_{j≠k} KD(z_k, m_j) ]

    KD(z, t)  = T²·KL(softmax(t/T) ‖ softmax(z/T)),   T = 3
    w(e)      = exp(-0.5·e), and 0 once below 0.01   (the decaying ensemble of teachers)
    r(e)      = λ·exp(-5·(1 - e/E_r)²) for e < E_r, else λ   (the usual sigmoid ramp-up)

With one student, ``j≠k`` is the student's own teacher and the students'
ensemble term is left out. After each optimizer step, :meth:`update` moves
each teacher: ``m ← α_t·m + (1-α_t)·s`` with ``α_t = min(1 - 1/(t+2), decay)``
for update ``t = 0, 1, ...``: the true mean of the independent
initialisation and the students' weights until the EMA takes over.

The reference code has two bugs this avoids: its ``α_t = min(1 - 1/(t+1),
decay)`` is 0 at ``t = 0``, which copies the student into the teacher and
throws the independent initialisation away; and its ramp-up computes
``exp(-5·(1 - e/λ)²)`` (dividing by the weight λ=0.1 instead of the ramp
length), which is ~0 from epoch 1 on and switches the distillation terms off.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..losses import CELoss, kd_loss
from .dml import mean_kd

__all__ = ["DecoupledMeanTeacher"]


class DecoupledMeanTeacher(nn.Module):
    """K students, each with an independently initialised EMA teacher (DKEL).

    Args:
        students: the models trained by the optimizer (``parameters()`` are theirs).
        teachers: one per student, same architecture, **initialised
            independently** (e.g. built under another seed); their weights
            are only ever moved by :meth:`update`.
        ema_decay: the EMA's cap on α (0.999 in the reference code).
        temperature: T of every distillation term (3).
        ensemble_decay / ensemble_floor: ``w(e) = exp(-ensemble_decay·e)``,
            0 below ``ensemble_floor`` (0.5 and 0.01).
        consistency_weight / rampup_epochs: λ and E_r of the ramp-up ``r(e)``
            (0.1 and 80, the reference code's; scale E_r to a shorter run).

    Raises:
        ConfigError: mismatched lists, a teacher that *is* its student or
            starts with the student's weights (not decoupled), bad numbers.
    """

    def __init__(self, students: Sequence[nn.Module], teachers: Sequence[nn.Module], *, ema_decay: float = 0.999,
                 temperature: float = 3.0, ensemble_decay: float = 0.5, ensemble_floor: float = 0.01,
                 consistency_weight: float = 0.1, rampup_epochs: float = 80.0) -> None:
        super().__init__()
        if not students or len(students) != len(teachers):
            raise ConfigError(f"need one teacher per student, got {len(students)} students, {len(teachers)} teachers")
        for s, t in zip(students, teachers):
            if s is t:
                raise ConfigError("a mean teacher must be a separate module, not its student")
            if all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), t.state_dict().values())):
                raise ConfigError("a mean teacher starts with its student's weights: build it under another seed "
                                  "(DKEL initialises teachers independently of their students)")
        if not (0 < ema_decay < 1 and temperature > 0 and ensemble_decay >= 0 and ensemble_floor >= 0
                and consistency_weight >= 0 and rampup_epochs > 0):
            raise ConfigError(f"bad settings: ema_decay={ema_decay} (0..1), temperature={temperature} (>0), "
                              f"ensemble_decay={ensemble_decay}, ensemble_floor={ensemble_floor}, "
                              f"consistency_weight={consistency_weight} (>=0), rampup_epochs={rampup_epochs} (>0)")
        self.students = nn.ModuleList(students)
        self._teachers = list(teachers)  # not submodules: parameters() are the students' only
        for t in self._teachers:
            t.requires_grad_(False)
        self.ema_decay = float(ema_decay)
        self.temperature = float(temperature)
        self.ensemble_decay = float(ensemble_decay)
        self.ensemble_floor = float(ensemble_floor)
        self.consistency_weight = float(consistency_weight)
        self.rampup_epochs = float(rampup_epochs)
        self.updates = 0
        self._ce = CELoss()

    @property
    def teachers(self) -> list[nn.Module]:
        """The mean teachers (EMA models), one per student."""
        return list(self._teachers)

    # ------------------------------------------------------------ schedules

    def ensemble_weight(self, epoch: float) -> float:
        """``w(e) = exp(-0.5·e)``, set to 0 once it falls below 0.01 (from epoch 10 on with the defaults)."""
        w = math.exp(-self.ensemble_decay * epoch)
        return w if w >= self.ensemble_floor else 0.0

    def rampup_weight(self, epoch: float) -> float:
        """``r(e) = λ·exp(-5·(1 - e/E_r)²)`` before epoch ``E_r``, then λ (ramp over epochs, not over λ)."""
        if epoch >= self.rampup_epochs:
            return self.consistency_weight
        return self.consistency_weight * math.exp(-5.0 * (1.0 - epoch / self.rampup_epochs) ** 2)

    def ema_alpha(self, t: int) -> float:
        """α of update ``t`` (0-based): ``min(1 - 1/(t+2), decay)``; 0.5 at t=0, never 0."""
        return min(1.0 - 1.0 / (t + 2), self.ema_decay)

    # ------------------------------------------------------------ training

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(students' logits, teachers' logits)`` on ``x``; the teachers' without gradient."""
        students = [s(x) for s in self.students]
        with torch.no_grad():
            teachers = [t(x) for t in self._teachers]
        return students, teachers

    def losses(self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], labels: torch.Tensor,
               epoch: float) -> list[torch.Tensor]:
        """``[L_1, ..., L_K]`` for epoch ``epoch`` (see the module docstring)."""
        T, K = self.temperature, len(students)
        r, w = self.rampup_weight(epoch), self.ensemble_weight(epoch)
        ens = torch.stack([z.detach() for z in students]).mean(0)  # (B, C)
        out = []
        for k, z in enumerate(students):
            mine = [m.detach() for j, m in enumerate(teachers) if j != k] if K > 1 else [teachers[k].detach()]
            individual = mean_kd(z, mine, T)
            loss = self._ce(z, None, labels)
            if K > 1:
                loss = loss + r * kd_loss(z, ens, temperature=T)
            if w > 0:
                ensemble = kd_loss(z, torch.stack(mine).mean(0), temperature=T)
                loss = loss + r * (w * ensemble + (1.0 - w) * individual)
            else:
                loss = loss + r * individual
            out.append(loss)
        return out

    @torch.no_grad()
    def update(self) -> float:
        """Move every teacher towards its student (after the optimizer step); returns the α used."""
        alpha = self.ema_alpha(self.updates)
        for s, t in zip(self.students, self._teachers):
            for (name, m), v in zip(t.state_dict().items(), s.state_dict().values()):
                if m.dtype.is_floating_point:
                    m.mul_(alpha).add_(v.detach(), alpha=1.0 - alpha)
                else:  # e.g. BatchNorm's num_batches_tracked
                    m.copy_(v)
        self.updates += 1
        return alpha
