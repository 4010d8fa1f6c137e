"""Feature-based distillation: hints (FitNets) and attention transfer.

The teacher side is an intermediate activation the teacher returns by name
(a teacher served with ``--features layer3`` answers the output
``layer3``, a raw :class:`~student_client.outputs.Dense`); the student side
is the student's own activation, read from a dict of student outputs.
The teacher side is a constant (no gradient flows into it); computation is
in float32 (float64 stays float64).

Hints -- FitNets
    A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio,
    "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550, eq. (3)::

        L_HT = ½ ‖ u_h(x) − r(v_g(x)) ‖²

    ``u_h`` the teacher's hint layer, ``v_g`` the student's guided layer and
    ``r`` a learned regressor that maps the student's features to the
    teacher's shape (the paper uses a convolution; :class:`HintLoss` owns a
    1x1 convolution for maps, a linear layer for vectors, trained with the
    student). Here the squared distance is averaged over elements (the MSE,
    ``reduction="mean"``) so its scale does not grow with the layer size;
    ``reduction="sum"`` gives ``‖·‖²`` summed (twice the paper's ½-sum).

Attention transfer
    S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention:
    Improving the Performance of Convolutional Neural Networks via Attention
    Transfer", ICLR 2017, arXiv:1612.03928, eq. (2), in the authors' code
    form (github.com/szagoruyko/attention-transfer, ``at`` / ``at_loss``)::

        Q(A)  = vec(mean_c A_c²) / ‖vec(mean_c A_c²)‖₂     A: (C, H, W) (or (C, L)) activation
        L_AT  = mean_{b, j} (Q(S_b)_j − Q(T_b)_j)²

    The paper's weight is β = 1000: the authors' code adds
    ``β/2 · Σ_groups L_AT`` to the cross-entropy, i.e. multiply
    :func:`attention_transfer_loss` by 500 per pair of maps
    (``500 * AttentionTransferLoss(...)``), the setting of their CIFAR results.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..outputs import OutputSpec, TopK
from .base import Loss, OneOutputLoss, student_output, teacher_answer
from .response import _compute_dtype, _constant

__all__ = ["AttentionTransferLoss", "HintLoss", "PairLoss", "attention_map", "attention_transfer_loss", "hint_loss"]

_REDUCTIONS = ("mean", "sum")


def teacher_features(teacher: Any, name: str, loss: Loss) -> torch.Tensor:
    """The teacher activation ``name`` as a plain tensor (a dense answer, never top-k).

    Not detached here: the loss functions it feeds (:func:`hint_loss`, ...) make their teacher side a
    constant themselves, since they are also called directly.
    """
    answer = teacher_answer(teacher, name, loss)
    if isinstance(answer, TopK) or not isinstance(answer, torch.Tensor):
        raise ConfigError(f"{type(loss).__name__} needs the dense teacher activation {name!r}, got "
                          f"{type(answer).__name__}; request it with top_k=0 and transform='raw'")
    return torch.Tensor.as_subclass(answer, torch.Tensor)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, regressor: nn.Module | None = None,
              reduction: str = "mean") -> torch.Tensor:
    """FitNets hint loss ``‖T − r(S)‖²`` averaged (``"mean"``) or summed over elements (see the module docstring).

    Args:
        student_feat: the student's guided-layer activation, batch first.
        teacher_feat: the teacher's hint-layer activation, the shape of ``r(student_feat)``.
        regressor: ``r``; None: the identity (shapes must already agree).
    """
    _check_reduction(reduction)
    guided = regressor(student_feat) if regressor is not None else student_feat
    if guided.shape != teacher_feat.shape:
        raise ConfigError(f"hint: the (regressed) student features have shape {tuple(guided.shape)}, the "
                          f"teacher's {tuple(teacher_feat.shape)}; pick layers with the same spatial size "
                          "and give HintLoss the two channel counts")
    dtype = _compute_dtype(guided)
    diff = guided.to(dtype) - _constant(teacher_feat).to(dtype)
    return diff.pow(2).mean() if reduction == "mean" else diff.pow(2).sum()


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """``Q(A)``: the L2-normalised mean over channels of the squared activation, ``(B, C, ...) -> (B, H·W)``."""
    if x.dim() < 3:
        raise ConfigError(f"an attention map needs a (B, C, H, W) or (B, C, L) activation, got shape "
                          f"{tuple(x.shape)}; use a convolutional layer's output")
    return F.normalize(x.to(_compute_dtype(x)).pow(2).mean(1).reshape(x.shape[0], -1), dim=1)


def attention_transfer_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """``mean (Q(S) − Q(T))²`` of two activations with the same spatial size (channel counts may differ).

    Zagoruyko & Komodakis 2017 in the authors' code form; the paper's weight
    β = 1000 enters as ``β/2 = 500`` times this value per pair of maps (see
    the module docstring).
    """
    if student_map.shape[0] != teacher_map.shape[0] or student_map.shape[2:] != teacher_map.shape[2:]:
        raise ConfigError(f"attention transfer: student activation {tuple(student_map.shape)} and teacher "
                          f"activation {tuple(teacher_map.shape)} must share batch and spatial sizes "
                          "(channels may differ); pick layers of the same resolution")
    return (attention_map(student_map) - attention_map(_constant(teacher_map))).pow(2).mean()


class PairLoss(OneOutputLoss):
    """A loss between one student output and one raw teacher output, both by name (the base of the
    feature and relation losses): it needs ``OutputSpec(teacher_output, "raw", dtype=dtype)``."""

    def __init__(self, teacher_output: str, student_output: str | None, dtype: str) -> None:
        super().__init__(OutputSpec(teacher_output, "raw", dtype=dtype), student_output)

    def pair(self, student: Any, teacher: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(student[student_output], teacher[teacher_output])``; the loss functions detach the teacher side."""
        return (student_output(student, self.student_output, self),
                teacher_features(teacher, self._spec.name, self))

    def extra_repr(self) -> str:
        """Settings shown in ``repr(module)``."""
        return f"teacher_output={self._spec.name!r}, student_output={self.student_output!r}"


class HintLoss(PairLoss):
    """FitNets hints with the regressor ``r`` as a trainable part of the loss.

    Put the loss's parameters in the optimizer with the student's
    (``optim.SGD([*student.parameters(), *hint.parameters()])``); the paper
    trains them together in its first stage.

    Args:
        student_channels, teacher_channels: channel counts (dim 1) of the two activations.
        teacher_output: the teacher activation's name (what the teacher serves, e.g. ``"layer3"``).
        student_output: the key of the student's activation in its dict of outputs (default: the same name).
        adapter: the regressor: ``"conv2d"`` (1x1 convolution, (B, C, H, W) maps),
            ``"conv1d"`` ((B, C, L) maps) or ``"linear"`` ((B, C) vectors).
        dtype: the teacher answer's dtype on the wire.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, teacher_output: str = "features",
                 student_output: str | None = None, adapter: str = "conv2d",
                 dtype: str = "float32", reduction: str = "mean") -> None:
        super().__init__(teacher_output, student_output, dtype)
        _check_reduction(reduction)
        if adapter == "linear":
            self.regressor = nn.Linear(student_channels, teacher_channels)
        elif adapter in ("conv1d", "conv2d"):
            conv = nn.Conv1d if adapter == "conv1d" else nn.Conv2d
            self.regressor = conv(student_channels, teacher_channels, kernel_size=1)
        else:
            raise ConfigError(f"adapter must be 'conv2d', 'conv1d' or 'linear', got {adapter!r}")
        self.reduction = reduction

    def forward(self, student: Mapping[str, torch.Tensor] | torch.Tensor, teacher: Any,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """``hint_loss(student[student_output], teacher[teacher_output], self.regressor)``."""
        s, t = self.pair(student, teacher)
        return hint_loss(s.to(self.regressor.weight.dtype), t, self.regressor, self.reduction)


class AttentionTransferLoss(PairLoss):
    """:func:`attention_transfer_loss` between a student activation and a teacher activation (no parameters).

    Weight it as the paper does with ``500 * AttentionTransferLoss(...)`` (β/2, β = 1000).
    """

    def __init__(self, teacher_output: str = "features", student_output: str | None = None,
                 dtype: str = "float32") -> None:
        super().__init__(teacher_output, student_output, dtype)

    def forward(self, student: Mapping[str, torch.Tensor] | torch.Tensor, teacher: Any,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch."""
        return attention_transfer_loss(*self.pair(student, teacher))
