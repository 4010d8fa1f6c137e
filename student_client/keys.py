"""Per-sample keys: which samples a batch holds, stable under shuffling.

Sources that remember samples (a recorded cache, the model's own earlier
predictions) need to know which samples a batch holds; the loader position
``epoch:index`` is meaningless once the loader shuffles. The reader therefore
gives every batch a list of keys, one per row:

* ``sample_keys=callable``: ``callable(batch)`` returns them (a list, tuple,
  1-D tensor or array of ints or strings, one per row), e.g.
  ``sample_keys=lambda b: b["id"]`` for a dataset that carries ids.
* default, for a ``torch.utils.data.DataLoader`` over a map-style dataset
  with automatic batching (``batch_size=`` or ``batch_sampler=``): the
  **dataset indices** of the batch's samples, read from the loader's own
  batch sampler as the loader draws them. They are stable under
  ``shuffle=True``, any sampler (``DistributedSampler`` gives global
  indices), worker processes and ``drop_last``. The reader wraps the loader's
  ``batch_sampler`` in place to see them (before the loader's first
  iteration), so the loader must deliver batches in sampler order (the
  DataLoader default, ``in_order=True``).
* anything else (an ``IterableDataset``, a plain list of batches, a loader
  with ``batch_size=None``): no keys (``None``); a source that needs them
  then says to pass ``sample_keys=``.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

from .errors import ConfigError

__all__ = ["KeyTracker", "make_key_tracker"]


class _RecordingBatchSampler:
    """The loader's batch sampler, recording each batch of indices as the loader draws it."""

    def __init__(self, inner: Iterable, sink: collections.deque) -> None:
        self.inner = inner
        self.sink = sink

    def __iter__(self):
        sink = self.sink
        for indices in self.inner:
            sink.append(indices)
            yield indices

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # batch_size, drop_last, sampler, ...
        return getattr(self.inner, name)


class KeyTracker:
    """Hands out the keys of each batch the reader takes from the loader.

    ``start_epoch()`` before ``iter(loader)``; ``keys(batch, rows)`` right
    after each ``next()``.
    """

    def __init__(self, fn: Callable[[Any], Any] | None = None, sink: collections.deque | None = None) -> None:
        self._fn = fn
        self._sink = sink
        self.available = fn is not None or sink is not None

    def start_epoch(self) -> None:
        if self._sink is not None:
            self._sink.clear()  # indices drawn by an epoch that ended early

    def keys(self, batch: Any, rows: int | None) -> list | None:
        if self._fn is not None:
            keys = _as_list(self._fn(batch))
        elif self._sink is not None:
            keys = list(self._sink.popleft()) if self._sink else None
            if keys is None:
                raise ConfigError("the DataLoader delivered a batch whose indices its batch sampler never drew; "
                                  "pass sample_keys=callable(batch) -> keys")
        else:
            return None
        if rows is not None and len(keys) != rows:
            raise ConfigError(f"sample_keys gave {len(keys)} key(s) for a batch of {rows} sample(s); "
                              "it must give one key per sample")
        return keys


def _as_list(keys: Any) -> list:
    if hasattr(keys, "tolist"):  # tensor / ndarray
        keys = keys.tolist()
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (list, tuple)):
        raise ConfigError(f"sample_keys must return a sequence of keys (one per sample), got {type(keys).__name__}")
    return list(keys)


def make_key_tracker(loader: Any, sample_keys: Callable[[Any], Any] | None) -> KeyTracker:
    """The key tracker for ``loader`` (see the module docstring for the default)."""
    if sample_keys is not None:
        if not callable(sample_keys):
            raise ConfigError(f"sample_keys must be a callable batch -> keys, got {type(sample_keys).__name__}")
        return KeyTracker(fn=sample_keys)
    try:
        from torch.utils.data import DataLoader, IterableDataset
    except ImportError:  # pragma: no cover - torch is a dependency
        return KeyTracker()
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return KeyTracker()
    inner = loader.batch_sampler
    if inner is None or getattr(loader, "in_order", True) is False:
        return KeyTracker()
    if isinstance(inner, _RecordingBatchSampler):  # a second reader over the same loader
        return KeyTracker(sink=inner.sink)
    if getattr(loader, "_iterator", None) is not None:  # persistent workers already hold the old sampler
        return KeyTracker()
    sink: collections.deque = collections.deque()
    # DataLoader refuses to set batch_sampler after construction; the wrapper yields exactly
    # what the original does, so the loader's behaviour is unchanged.
    object.__setattr__(loader, "batch_sampler", _RecordingBatchSampler(inner, sink))
    return KeyTracker(sink=sink)
