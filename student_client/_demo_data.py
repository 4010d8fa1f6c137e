"""``edistill demo``'s data and teacher: scikit-learn digits, noisy views of them, a trained teacher MLP.

Nothing is downloaded (the digits ship with scikit-learn). Private to
:mod:`student_client.demo`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from student_client.demo import DemoConfig

__all__ = ["Digits", "EpochOrder", "NoisyDataset", "accuracy", "check_epoch", "train_teacher"]


class Digits:
    """scikit-learn digits as float32 tensors, split 70/30 stratified."""

    def __init__(self) -> None:
        import numpy as np
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)  # pixel values 0..16 -> 0..1
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
        self.x_train = torch.from_numpy(xtr)  # (N, 64)
        self.y_train = torch.from_numpy(ytr).long()
        self.x_test = torch.from_numpy(xte)
        self.y_test = torch.from_numpy(yte).long()


class NoisyDataset:
    """Indexable (x + noise, label or -1, sample id); noise fixed per (seed, epoch)."""

    def __init__(self, x, y, ids, labelled_mask, noise_std: float, seed: int) -> None:
        self.x, self.y, self.ids, self.mask = x, y, ids, labelled_mask
        self.noise_std, self.seed, self.epoch = noise_std, seed, 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        import torch

        sid = int(self.ids[i])
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, sid)) & 0x7FFFFFFF)
        x = self.x[sid] + self.noise_std * torch.randn(self.x.shape[1], generator=g)
        label = int(self.y[sid]) if bool(self.mask[sid]) else -1  # -1: no label (ignored by CE)
        return x, label, sid


class EpochOrder:
    """A DataLoader sampler: a seeded permutation of the dataset per epoch (set :attr:`epoch` first).

    The run knows from it which samples every batch of an epoch must hold, so
    what the training loop receives can be checked batch by batch, also for
    an epoch the step budget cuts short.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def order(self, epoch: int) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def batches(self, epoch: int, batch_size: int, ids) -> list[tuple[int, ...]]:
        """The sample ids of each batch the loader yields in ``epoch``, in order."""
        order = self.order(epoch)
        return [tuple(int(ids[i]) for i in order[j:j + batch_size]) for j in range(0, self.n, batch_size)]

    def __iter__(self):
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.n


def check_epoch(expected: list[tuple[int, ...]], delivered: list[tuple[int, ...]], *,
                complete: bool) -> tuple[int, int]:
    """``(lost, duplicated)`` batches of one epoch: ``delivered`` (what the loop got) vs ``expected``.

    Delivery is in order, so an epoch stopped early (``complete=False``: the
    step budget ran out) must hold the first ``k`` expected batches, ``k``
    being the number of distinct batches it got; a complete one, all of them.
    A duplicate counts once as duplicated, never also as lost.
    """
    distinct = set(delivered)
    want = expected if complete else expected[:len(distinct)]
    return len(set(want) - distinct), len(delivered) - len(distinct)


def train_teacher(data: Digits, cfg: DemoConfig):
    """The teacher MLP (64 -> hidden -> hidden -> 10) trained on every labelled training sample."""
    import torch
    import torch.nn.functional as F

    from teacher_server.zoo import mlp

    torch.manual_seed(0)
    model = mlp(hidden=cfg.teacher_hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n = len(data.x_train)
    for _ in range(cfg.teacher_epochs):
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            x = data.x_train[idx] + cfg.noise_std * torch.randn(len(idx), 64)
            loss = F.cross_entropy(model(x), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def accuracy(model, data: Digits) -> float:
    """Test accuracy of ``model`` (left in training mode afterwards)."""
    import torch

    model.eval()
    with torch.inference_mode():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    model.train()
    return acc
