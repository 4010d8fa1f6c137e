"""Relation-based distillation: how samples of a batch relate, not what each one is.

Both losses compare structures computed *within* a batch on each side, so
student and teacher features may have different sizes (no adapter). The
teacher side is a raw activation or embedding the teacher returns by name;
it is a constant (no gradient). Computation in float32 (float64 stays).

Relational KD (RKD)
    W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation",
    CVPR 2019, arXiv:1904.05068, eqs. (4)-(7), with the authors' choices
    (github.com/lenscloth/RKD): embeddings flattened to ``(b, d)``;
    ``ℓ_δ`` is the Huber loss (``smooth_l1``, δ = 1) averaged over entries::

        ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ,   μ = mean of ‖t_i − t_j‖₂ over pairs i ≠ j
        L_D = mean_{i,j} ℓ_δ(ψ_D(t_i, t_j), ψ_D(s_i, s_j))
        ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩,   e_ij = (t_i − t_j) / ‖t_i − t_j‖₂
        L_A = mean_{i,j,k} ℓ_δ(ψ_A(t_i, t_j, t_k), ψ_A(s_i, s_j, s_k))
        L_RKD = λ_D · L_D + λ_A · L_A,   λ_D = 25, λ_A = 50 (the paper's weights)

Similarity-preserving KD (SP)
    F. Tung, G. Mori, "Similarity-Preserving Knowledge Distillation",
    ICCV 2019, arXiv:1907.09682, eqs. (1)-(4)::

        G = Q Qᵀ,  Q = features flattened to (b, d);   G̃ = G / ‖G_row‖₂  (each row L2-normalised)
        L_SP = (1 / b²) · ‖G̃_T − G̃_S‖_F²

    The paper weights it by γ = 3000 against the cross-entropy (CIFAR-10).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .feature import PairLoss
from .response import _compute_dtype, _constant

__all__ = ["RKDLoss", "SimilarityPreservingLoss", "rkd_loss", "similarity_preserving_loss"]


def _flat(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() < 2 or x.shape[0] < 2:
        raise ConfigError(f"{what} needs a batch of at least 2 samples with features, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).to(_compute_dtype(x))


def _distances(e: torch.Tensor) -> torch.Tensor:
    """``(b, b)`` Euclidean distances divided by their mean over pairs i ≠ j (ψ_D); 0 on the diagonal."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt()  # (b, b)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    d = d * off  # exact zeros on the diagonal (the clamp left sqrt(1e-12) there)
    return d / d[off].mean()


def _angles(e: torch.Tensor) -> torch.Tensor:
    """``(b, b, b)`` cosines ⟨e_ij, e_kj⟩ (ψ_A), indexed [j, i, k]."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # (b, b, d): [j, i] = e_i - e_j normalised
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """``λ_D · L_D + λ_A · L_A`` (Park et al. 2019; see the module docstring). Either weight may be 0."""
    s, t = _flat(student_emb, "rkd_loss"), _flat(_constant(teacher_emb), "rkd_loss")
    if s.shape[0] != t.shape[0]:
        raise ConfigError(f"rkd_loss: {s.shape[0]} student and {t.shape[0]} teacher samples; give the same batch")
    total = s.new_zeros(())
    if distance_weight:
        with torch.no_grad():
            td = _distances(t)
        total = total + distance_weight * F.smooth_l1_loss(_distances(s), td)
    if angle_weight:
        with torch.no_grad():
            ta = _angles(t)
        total = total + angle_weight * F.smooth_l1_loss(_angles(s), ta)
    return total


def _gram(q: torch.Tensor) -> torch.Tensor:
    return F.normalize(q @ q.t(), p=2, dim=1)  # (b, b), rows L2-normalised


def similarity_preserving_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """``‖G̃_T − G̃_S‖_F² / b²`` (Tung & Mori 2019; see the module docstring)."""
    s, t = _flat(student_feat, "similarity_preserving_loss"), _flat(_constant(teacher_feat),
                                                                     "similarity_preserving_loss")
    if s.shape[0] != t.shape[0]:
        raise ConfigError(f"similarity_preserving_loss: {s.shape[0]} student and {t.shape[0]} teacher samples")
    with torch.no_grad():
        gt = _gram(t)
    return (gt - _gram(s)).pow(2).sum() / s.shape[0] ** 2


class RKDLoss(PairLoss):
    """:func:`rkd_loss` between a student embedding and a teacher embedding (by output names)."""

    def __init__(self, teacher_output: str = "features", student_output: str | None = None, *,
                 distance_weight: float = 25.0, angle_weight: float = 50.0, dtype: str = "float32") -> None:
        super().__init__(teacher_output, student_output, dtype)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def forward(self, student: Mapping[str, torch.Tensor] | torch.Tensor, teacher: Any,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch."""
        return rkd_loss(*self.pair(student, teacher), self.distance_weight, self.angle_weight)


class SimilarityPreservingLoss(PairLoss):
    """:func:`similarity_preserving_loss` between a student and a teacher activation (by output names)."""

    def __init__(self, teacher_output: str = "features", student_output: str | None = None, *,
                 dtype: str = "float32") -> None:
        super().__init__(teacher_output, student_output, dtype)

    def forward(self, student: Mapping[str, torch.Tensor] | torch.Tensor, teacher: Any,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch."""
        return similarity_preserving_loss(*self.pair(student, teacher))
