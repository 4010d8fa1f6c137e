"""Data, model, training settings and metrics shared by ``bench/recipes.py`` (not a public API).

Data: scikit-learn's digits (ships with scikit-learn, nothing downloaded),
the same 70/30 stratified split as the demo (1257 train / 540 test, 64
features, 10 classes). Model: ``teacher_server.zoo.mlp(hidden=64)``
(64 -> 64 -> 64 -> 10, ReLU). Every recipe uses the same optimizer (SGD,
lr 0.05 falling linearly to 0, momentum 0.9), batch size 32 and no weight
decay, so the rows of the table differ by the recipe only.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from student_client._demo_data import Digits
from teacher_server.zoo import mlp

BATCH = 32
LR = 0.05
MOMENTUM = 0.9
ECE_BINS = 15
#: Two-sided 95% t quantiles by degrees of freedom (n - 1), for "inside the noise".
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mlp(hidden=64)


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def decay(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate falls linearly to 0 at the last step (call ``.step()`` after each optimizer
    step), so every run ends converged: its metrics and churn describe what it learnt, not where SGD
    happened to stop. Every setting uses it."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / steps))


def loader(data: Digits, seed: int, ids: torch.Tensor | None = None) -> DataLoader:
    """Shuffled batches of ``(x, y)`` over ``ids`` of the training set (default: all); keys = dataset indices."""
    x, y = (data.x_train, data.y_train) if ids is None else (data.x_train[ids], data.y_train[ids])
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def shard(data: Digits, i: int, n: int) -> torch.Tensor:
    """Training-set indices of shard ``i`` of ``n`` (every n-th sample)."""
    return torch.arange(len(data.y_train))[i::n]


@torch.no_grad()
def test_probs(net: torch.nn.Module, data: Digits) -> torch.Tensor:
    """Softmax predictions on the test set, (540, 10)."""
    was = net.training
    net.eval()
    p = F.softmax(net(data.x_test), -1)
    net.train(was)
    return p


def metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL (mean -log p_y) and expected calibration error (15 equal-width confidence bins)."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    nll = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()
    ece = 0.0
    edges = torch.linspace(0, 1, ECE_BINS + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean().item() * abs(correct[inside].mean().item() - conf[inside].mean().item())
    return {"acc": correct.mean().item(), "nll": nll, "ece": ece}


def churn(p: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    """Prediction churn between two models on the same inputs.

    ``mad``: mean over samples of ½·Σ_c |p_c − q_c| (total variation), which
    for two classes is the paper's |p − p'| of the predicted probability;
    ``flip``: share of samples whose top-1 class differs.
    """
    return {"mad": 0.5 * (p - q).abs().sum(1).mean().item(), "flip": (p.argmax(1) != q.argmax(1)).float().mean().item()}


@dataclass
class Summary:
    mean: float
    std: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def summarize(xs: Sequence[float]) -> Summary:
    return Summary(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs))


def paired(xs: Sequence[float], base: Sequence[float]) -> dict:
    """The paired difference ``xs - base`` (same seeds): mean ± std and whether its 95% CI contains 0."""
    d = [a - b for a, b in zip(xs, base)]
    s = summarize(d)
    half = T95.get(s.n - 1, 1.96) * s.std / math.sqrt(s.n) if s.n > 1 else math.inf
    return {**s.as_dict(), "ci95": half, "inside_noise": abs(s.mean) <= half}
