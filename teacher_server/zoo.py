"""Small models to serve by factory spec, e.g. ``--model teacher_server.zoo:mlp``.

Each factory returns an ``nn.Module`` with an ``edistill_inputs`` attribute,
so no ``--input-spec`` is needed:

* :func:`mlp` -- the digits demo teacher (64 features -> 10 classes).
* :func:`resnet18_cifar` -- ResNet-18 adapted to 3x32x32 (3x3 stem, no max-pool).
* :func:`latency` -- a stand-in for an accelerator-hosted teacher: it sleeps
  (no CPU use) for a fixed time per forward pass and returns cheap,
  deterministic logits that carry a per-sample id, so tests can check that
  each answer belongs to its request.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from teacher_server.signature import TensorSpec

__all__ = ["LatencyTeacher", "latency", "mlp", "resnet18_cifar"]


def mlp(in_features: int = 64, hidden: int = 128, num_classes: int = 10, depth: int = 2) -> nn.Module:
    """ReLU MLP: (B, in_features) float32 -> logits (B, num_classes)."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    model = nn.Sequential(*layers)
    model.edistill_inputs = [TensorSpec("input", torch.float32, (in_features,))]
    return model


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class _ResNetCifar(nn.Module):
    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, c_in = [], width
        for i, mult in enumerate((1, 2, 4, 8)):  # 32 -> 32, 16, 8, 4 spatial
            c_out = width * mult
            stride = 1 if i == 0 else 2
            stages += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32)
        h = self.stages(self.stem(x))  # (B, 8*width, 4, 4)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))  # (B, num_classes)


def resnet18_cifar(num_classes: int = 10, width: int = 64, seed: int = 0) -> nn.Module:
    """ResNet-18 for 3x32x32 images (He et al. 2016, CIFAR variant); ``width`` scales channels."""
    torch.manual_seed(seed)  # deterministic weights for benchmarks and tests
    model = _ResNetCifar(num_classes, width)
    model.edistill_inputs = [TensorSpec("image", torch.float32, (3, 32, 32))]
    return model


class LatencyTeacher(nn.Module):
    """Emulates a teacher on an accelerator: fixed latency, negligible CPU.

    Input ``input`` is (B, features) float32 whose column 0 is a per-sample id.
    Output ``logits`` is (B, num_classes) with ``logits[:, j] = id + j / num_classes``,
    so ``logits[:, 0]`` recovers the id and the softmax is non-trivial.
    """

    def __init__(self, delay_ms: float, per_sample_ms: float, num_classes: int, features: int) -> None:
        super().__init__()
        self.delay_ms = delay_ms
        self.per_sample_ms = per_sample_ms
        self.num_classes = num_classes
        self.register_buffer("offsets", torch.arange(num_classes, dtype=torch.float32) / num_classes)
        self.edistill_inputs = [TensorSpec("input", torch.float32, (features,))]
        self.forward_calls = 0  # read by in-process tests

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sleep ``delay_ms + per_sample_ms * B``, then return (B, num_classes) logits ``id + j / num_classes``."""
        self.forward_calls += 1
        # time.sleep releases the GIL and burns no CPU, like waiting on a GPU.
        time.sleep((self.delay_ms + self.per_sample_ms * x.shape[0]) / 1000.0)
        return x[:, :1].float() + self.offsets  # (B, 1) + (num_classes,) -> (B, num_classes)


def latency(delay_ms: float = 20.0, per_sample_ms: float = 0.0, num_classes: int = 10,
            features: int = 4) -> nn.Module:
    """A :class:`LatencyTeacher` (see there); serve with ``--model teacher_server.zoo:latency``."""
    return LatencyTeacher(delay_ms, per_sample_ms, num_classes, features)
