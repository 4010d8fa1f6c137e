"""Progressive self-knowledge distillation (PS-KD): the model's own last-epoch predictions as soft targets.

Reference: K. Kim, B. Ji, D. Yoon, S. Hwang, "Self-Knowledge Distillation
with Progressive Refinement of Targets", ICCV 2021, arXiv:2006.12000.

In epoch ``t`` of ``T`` (0-based), sample ``i`` with one-hot label ``y_i`` is
trained towards::

    target_i = (1 - α_t)·y_i + α_t·p_i^{(t-1)},      α_t = α_T · t / T,   α_T = 0.8
    L        = -Σ_c target_{i,c} · log softmax(z_i)_c

where ``p_i^{(t-1)}`` is the model's own prediction (softmax, T=1) for the
same sample in the previous epoch. The previous predictions travel through
the source contract: :class:`PastPredictions` is a
:class:`~student_client.sources.KnowledgeSource` whose ``observe(keys,
outputs)`` (called by ``DistillReader.observe`` after each step) stores the
predictions by sample key, and whose ``submit`` answers a batch, by its keys,
with what was stored in the previous epoch. Keys are dataset indices by
default (:mod:`student_client.keys`), so shuffling is fine. A sample with no
previous prediction (the first epoch, or one ``drop_last`` skipped) gets the
plain one-hot target; ``known`` in the answer says which rows had one.

Usage::

    pskd = PSKD(epochs=E)
    with DistillReader(loader, pskd.source) as reader:
        for epoch in range(E):
            pskd.start_epoch(epoch)
            for (x, y), past in reader:
                logits = model(x)
                loss = pskd.loss(logits, past, y)
                opt.zero_grad(); loss.backward(); opt.step()
                reader.observe(logits)          # this epoch's predictions, for the next one
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, SourceClosedError
from ..outputs import dense_answer
from ..sources import KnowledgeSource, SourceRequest, check_request, require_keys
from ..stats import SourceStats

__all__ = ["PSKD", "PastPredictions"]


class PastPredictions(KnowledgeSource):
    """Answers each sample with the model's own prediction from the previous epoch (by sample key).

    ``observe(keys, logits)`` stores ``softmax(logits)`` (``(B, C)``, detached,
    on the CPU) for the current epoch; :meth:`start_epoch` makes the current
    epoch's predictions the ones answered (a sample not seen in an epoch keeps
    its older prediction). ``submit`` answers ``{"logits": Dense probs (B, C),
    "known": bool (B,)}``; rows without a stored prediction are uniform and
    ``known`` False.
    """

    def __init__(self, output: str = "logits") -> None:
        self._output = output
        self._lock = threading.Lock()
        self._previous: dict[Any, torch.Tensor] = {}
        self._current: dict[Any, torch.Tensor] = {}
        self._classes: int | None = None
        self._closed = False
        self._n = {"submitted": 0, "completed": 0}

    def start_epoch(self) -> None:
        """From now on answer with the predictions observed so far (call before each epoch's batches)."""
        with self._lock:
            self._previous.update(self._current)
            self._current = {}

    def observe(self, keys: Sequence[Any], student_outputs: Any) -> None:
        """Store ``softmax(logits)`` per key; ``student_outputs`` is ``(B, C)`` logits or a dict holding them."""
        logits = student_outputs[self._output] if isinstance(student_outputs, Mapping) else student_outputs
        if logits.dim() != 2 or logits.shape[0] != len(keys):
            raise ConfigError(f"observe() needs (B, C) logits for {len(keys)} keys, got shape {tuple(logits.shape)}")
        probs = F.softmax(logits.detach().float(), dim=-1).cpu()  # (B, C)
        with self._lock:
            if self._classes is None:
                self._classes = probs.shape[1]
            for key, row in zip(keys, probs):
                self._current[key] = row

    def submit(self, request: SourceRequest) -> "Future[dict[str, Any]]":
        """An already resolved future with the previous predictions of the batch's samples."""
        inputs, batch_id, keys = check_request(request)
        require_keys(keys, "PS-KD answers each sample with its own previous prediction")
        if self._closed:
            raise SourceClosedError("PastPredictions is closed")
        with self._lock:
            C = self._classes
            rows = [self._previous.get(k) for k in keys]
            self._n["submitted"] += 1
            self._n["completed"] += 1
        known = torch.tensor([r is not None for r in rows])  # (B,)
        if C is None:
            probs = torch.full((len(keys), 1), 1.0)
        else:
            probs = torch.stack([r if r is not None else torch.full((C,), 1.0 / C) for r in rows])  # (B, C)
        fut: Future = Future()
        fut.set_result({self._output: dense_answer(probs, "probs", 1.0), "known": known})
        return fut

    def stats(self) -> SourceStats:
        """Batches answered; ``teachers`` is empty (the model is its own teacher)."""
        with self._lock:
            return SourceStats(kind="past-predictions", **self._n)

    def __len__(self) -> int:
        """Samples with a prediction available to the next epoch's answers."""
        with self._lock:
            return len(self._previous.keys() | self._current.keys())

    def close(self) -> None:
        """Drop the stored predictions; refuse further batches."""
        self._closed = True
        with self._lock:
            self._previous.clear()
            self._current.clear()


class PSKD:
    """PS-KD's schedule and loss over a :class:`PastPredictions` source.

    Args:
        epochs: T, the number of training epochs.
        alpha_T: α at the last epoch (0.8 in the paper).
        output: the student output name the predictions are stored under.
    """

    def __init__(self, epochs: int, alpha_T: float = 0.8, output: str = "logits") -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
        if not 0 <= alpha_T <= 1:
            raise ConfigError(f"alpha_T must be in [0, 1], got {alpha_T!r}")
        self.epochs = epochs
        self.alpha_T = float(alpha_T)
        self.epoch = 0
        self.source = PastPredictions(output)
        self._output = output

    @property
    def alpha(self) -> float:
        """``α_t = α_T · t / T`` for the current epoch ``t``."""
        return self.alpha_T * self.epoch / self.epochs

    def start_epoch(self, epoch: int) -> None:
        """Enter epoch ``epoch`` (0-based): α moves on, last epoch's predictions become the targets."""
        self.epoch = int(epoch)
        self.source.start_epoch()

    def targets(self, past: Mapping[str, Any], labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``(1-α)·one-hot + α·previous prediction`` per row ``(B, C)``; one-hot where none is known."""
        onehot = F.one_hot(labels.long(), num_classes).float()  # (B, C)
        prev = past[self._output]
        known = past["known"].to(onehot.device)
        if prev.shape[-1] != num_classes:  # nothing observed yet (first epoch): one-hot only
            return onehot
        prev = prev.as_subclass(torch.Tensor).detach().float().to(onehot.device)  # (B, C), a plain tensor
        alpha = torch.where(known, torch.tensor(self.alpha), torch.tensor(0.0)).to(onehot.device).unsqueeze(1)
        return (1.0 - alpha) * onehot + alpha * prev

    def loss(self, logits: torch.Tensor, past: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """Mean over rows of ``-Σ_c target_c · log softmax(logits)_c``."""
        target = self.targets(past, labels, logits.shape[-1])
        return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
