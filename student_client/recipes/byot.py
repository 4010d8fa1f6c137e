"""Be your own teacher (BYOT): auxiliary heads on shallow layers, taught by the deepest one.

Reference: L. Zhang, J. Song, A. Gao, J. Chen, C. Bao, K. Ma, "Be Your Own
Teacher: Improve the Performance of Convolutional Neural Networks via Self
Distillation", ICCV 2019, arXiv:1905.08094.

The network is cut into sections; after each shallow section ``i`` a head
(a bottleneck to the deepest feature's width, then a classifier) gives a
feature ``f_i`` and logits ``z_i``. The deepest classifier (the model's own
output ``z_D``, its input feature ``f_D``) is the teacher::

    L = CE(z_D, y) + Σ_i [ (1-α)·CE(z_i, y) + α·T²·KL(softmax(z_D/T) ‖ softmax(z_i/T)) + λ·‖f_i − f_D‖² ]

with ``z_D`` and ``f_D`` constants in the shallow terms (the deep head is
trained by its CE only, as in the paper). Here the heads are attached to an
unmodified model by forward hooks (``taps``: the submodules whose outputs
feed the heads; ``final``: the classifier whose input is ``f_D``), so any
``nn.Module`` works and :meth:`BYOT.remove` leaves it exactly as it was.
Defaults ``α = 0.3, λ = 0.03, T = 3`` follow the authors' public code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..losses import kd_loss

__all__ = ["BYOT", "BYOTOutput"]


@dataclass
class BYOTOutput:
    """One forward pass: the deepest logits and feature, and each head's logits and feature."""

    logits: torch.Tensor  # (B, C), the model's own output
    feature: torch.Tensor  # (B, D), the deepest classifier's input
    head_logits: list[torch.Tensor]  # per tap, (B, C)
    head_features: list[torch.Tensor]  # per tap, (B, D)


class BYOT(nn.Module):
    """A model with auxiliary heads on forward hooks, and BYOT's loss.

    Args:
        model: the network (unchanged; its output must be ``(B, C)`` logits).
        taps: names of submodules (``model.get_submodule``), shallow to deep,
            whose outputs feed an auxiliary head each.
        final: name of the classifier submodule whose input is the deepest feature.
        example_input: one batch, used once to size the heads.
        alpha, feature_weight, temperature: α, λ and T of the loss.

    ``parameters()`` are the model's and the heads'; optimise them together.
    Not thread-safe: a forward pass records its activations on the module.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str], *, final: str, example_input: torch.Tensor,
                 alpha: float = 0.3, feature_weight: float = 0.03, temperature: float = 3.0) -> None:
        super().__init__()
        if not taps:
            raise ConfigError("BYOT needs at least one tap (a submodule name whose output feeds a head)")
        if not (0 <= alpha <= 1 and feature_weight >= 0 and temperature > 0):
            raise ConfigError(f"need 0 <= alpha <= 1, feature_weight >= 0, temperature > 0; got {alpha}, "
                              f"{feature_weight}, {temperature}")
        self.model = model
        self.taps = tuple(taps)
        self.alpha, self.feature_weight, self.temperature = float(alpha), float(feature_weight), float(temperature)
        self._seen: dict[str, torch.Tensor] = {}
        self._hooks = [self._module(name).register_forward_hook(self._keep_output(name)) for name in self.taps]
        self._hooks.append(self._module(final).register_forward_pre_hook(self._keep_input))
        with torch.no_grad():
            logits = self._run(example_input)
        width = self._seen["__final__"].flatten(1).shape[1]
        classes = logits.shape[-1]
        self.bottlenecks = nn.ModuleList(
            nn.Sequential(nn.Flatten(), nn.Linear(self._seen[n].flatten(1).shape[1], width), nn.ReLU())
            for n in self.taps)
        self.heads = nn.ModuleList(nn.Linear(width, classes) for _ in self.taps)

    def _module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            names = [n for n, _ in self.model.named_modules() if n]
            raise ConfigError(f"the model has no submodule {name!r}; it has {', '.join(names)}") from None

    def _keep_output(self, name: str):
        def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            self._seen[name] = output
        return hook

    def _keep_input(self, _module: nn.Module, inputs: tuple) -> None:
        self._seen["__final__"] = inputs[0]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        self._seen.clear()
        logits = self.model(x)
        missing = [n for n in (*self.taps, "__final__") if n not in self._seen]
        if missing:
            raise ConfigError(f"the forward pass did not run {', '.join(missing)} (final= names the classifier)")
        return logits

    def forward(self, x: torch.Tensor) -> BYOTOutput:
        """The model's logits plus every head's logits and feature."""
        logits = self._run(x)
        feats = [b(self._seen[n]) for b, n in zip(self.bottlenecks, self.taps)]  # (B, D) each
        return BYOTOutput(logits, self._seen["__final__"].flatten(1), [h(f) for h, f in zip(self.heads, feats)],
                          feats)

    def loss(self, out: BYOTOutput, labels: torch.Tensor) -> torch.Tensor:
        """BYOT's loss (module docstring): CE of the deepest head plus each shallow head's three terms."""
        a, T = self.alpha, self.temperature
        deep, deep_feat = out.logits.detach(), out.feature.detach()
        total = F.cross_entropy(out.logits, labels)
        for z, f in zip(out.head_logits, out.head_features):
            total = total + (1 - a) * F.cross_entropy(z, labels) + a * kd_loss(z, deep, temperature=T)
            total = total + self.feature_weight * (f - deep_feat).pow(2).sum(1).mean()
        return total

    def remove(self) -> None:
        """Detach the hooks: the model is left exactly as it was given."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
