"""Small datasets for reader tests whose samples carry their own id."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class IdDataset(Dataset):
    """Sample i: (features (features,) with column 0 = i, label i % num_classes).

    The latency teacher (``teacher_server.zoo:latency``) echoes column 0 in
    ``logits[:, 0]``, so a test can check that each answer belongs to its sample.
    """

    def __init__(self, n: int, *, num_classes: int = 10, features: int = 4) -> None:
        self.n, self.num_classes, self.features = n, num_classes, features

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = torch.zeros(self.features)
        x[0] = i
        return x, i % self.num_classes
