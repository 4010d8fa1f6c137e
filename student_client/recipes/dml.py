"""Deep mutual learning: K peers in one process, each taught by the others.

Reference: Y. Zhang, T. Xiang, T. M. Hospedales, H. Lu, "Deep Mutual
Learning", CVPR 2018, arXiv:1706.00384.

Peer ``k`` with logits ``z_k`` minimises (eq. 10 of the paper)::

    L_k = CE(z_k, y) + 1/(K-1) · Σ_{j≠k} T²·KL( softmax(z_j/T) ‖ softmax(z_k/T) )

The other peers' predictions are constants in ``L_k`` (detached), so each
peer's gradient comes from its own loss only; summing the losses and taking
one backward pass equals the paper's per-peer updates on the same batch
(the paper alternates updates within a step; with one shared forward pass
the difference is the order of updates only). The paper uses T=1.

Usage::

    dml = DeepMutualLearning([net_a, net_b])
    opt = torch.optim.SGD(dml.parameters(), lr=0.1)
    for x, y in loader:
        losses = dml.losses([net(x) for net in dml.peers], y)
        opt.zero_grad(); sum(losses).backward(); opt.step()
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..losses import CELoss, kd_loss

__all__ = ["DeepMutualLearning"]


def mean_kd(z: torch.Tensor, teachers: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """``mean_j kd_loss(z, t_j)`` over ``teachers`` ``(B, C)`` each, detached: no gradient reaches a teacher.

    The mimicry term of DML and the individual term of DKEL (:mod:`.mean_teacher`).
    """
    return sum(kd_loss(z, t.detach(), temperature=temperature) for t in teachers) / len(teachers)


class DeepMutualLearning(nn.Module):
    """K peers that learn from each other's current predictions (DML).

    Args:
        peers: two or more models with the same output shape.
        temperature: T of the mimicry term (the paper: 1).
        kl_weight: weight of the mean KL beside the CE (the paper: 1).
    """

    def __init__(self, peers: Sequence[nn.Module], *, temperature: float = 1.0, kl_weight: float = 1.0) -> None:
        super().__init__()
        if len(peers) < 2:
            raise ConfigError(f"DeepMutualLearning needs at least 2 peers, got {len(peers)}")
        if not (temperature > 0 and kl_weight >= 0):
            raise ConfigError(f"need temperature > 0 and kl_weight >= 0, got {temperature}, {kl_weight}")
        self.peers = nn.ModuleList(peers)
        self.temperature = float(temperature)
        self.kl_weight = float(kl_weight)
        self._ce = CELoss()

    @staticmethod
    def teachers_of(logits: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
        """The predictions peer ``k`` learns from: every other peer's logits, detached (never its own)."""
        return [z.detach() for j, z in enumerate(logits) if j != k]

    def losses(self, logits: Sequence[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        """``[L_1, ..., L_K]`` for the peers' logits ``(B, C)`` each on one batch (see the module docstring)."""
        if len(logits) != len(self.peers):
            raise ConfigError(f"got logits of {len(logits)} peers, this DML has {len(self.peers)}")
        out = []
        for k, z in enumerate(logits):
            mimicry = mean_kd(z, self.teachers_of(logits, k), self.temperature)
            out.append(self._ce(z, None, labels) + self.kl_weight * mimicry)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every peer's logits on ``x``."""
        return [peer(x) for peer in self.peers]
