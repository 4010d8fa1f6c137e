"""Where each sample key's answer lives: shard number and row, built from the shards' headers.

Dataset indices (small non-negative ints, the default keys) are looked up in
two numpy arrays indexed by key, a batch at once; other keys (strings,
sparse ints) in a dict. A key recorded twice (two recorders given the same
samples) is answered from the first shard in name order.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

__all__ = ["KeyIndex"]

_DENSE_SLACK = 1 << 20  # int keys up to (4 x count + this) use the arrays


class KeyIndex:
    """key -> (shard number, row); ``add()`` is safe beside ``lookup()`` from other threads."""

    def __init__(self) -> None:
        # (shard numbers, rows) by int key, replaced as one tuple so a lookup reads a matching pair
        self._arrays = (np.full(0, -1, dtype=np.int32), np.full(0, -1, dtype=np.int64))
        self._other: dict[Any, tuple[int, int]] = {}  # str / out-of-range int keys
        self.count = 0
        self.duplicates = 0
        self._lock = threading.Lock()

    def add(self, shard_no: int, keys: Sequence[Any]) -> None:
        """Register a shard's keys (row i holds keys[i]); keys already known keep their first shard."""
        with self._lock:
            ints = [k for k in keys if type(k) is int and k >= 0]
            top = max(ints, default=-1)
            old_shard, old_row = self._arrays
            if ints and top >= len(old_shard) and top < 4 * (self.count + len(keys)) + _DENSE_SLACK:
                size = max(top + 1, 2 * len(old_shard))
                shard, row = np.full(size, -1, dtype=np.int32), np.full(size, -1, dtype=np.int64)
                shard[:len(old_shard)], row[:len(old_row)] = old_shard, old_row
                self._arrays = (shard, row)
            shard_arr, row_arr = self._arrays
            n = len(shard_arr)
            for i, k in enumerate(keys):
                if type(k) is int and 0 <= k < n:
                    if shard_arr[k] >= 0:
                        self.duplicates += 1
                        continue
                    row_arr[k] = i
                    shard_arr[k] = shard_no  # set last: a concurrent lookup that sees it sees the row
                elif k in self._other:
                    self.duplicates += 1
                    continue
                else:
                    self._other[k] = (shard_no, i)
                self.count += 1

    def __contains__(self, key: Any) -> bool:
        shard, _ = self.lookup([key])
        return bool(shard[0] >= 0)

    def lookup(self, keys: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(shard numbers, rows)`` per key, shard -1 where the key is not recorded."""
        shard_arr, row_arr = self._arrays
        n = len(keys)
        shard, row = np.full(n, -1, dtype=np.int32), np.zeros(n, dtype=np.int64)
        if not self._other and all(type(k) is int for k in keys):
            k = np.fromiter(keys, dtype=np.int64, count=n)
            ok = (k >= 0) & (k < len(shard_arr))
            shard[ok], row[ok] = shard_arr[k[ok]], row_arr[k[ok]]
            return shard, row
        size = len(shard_arr)
        for i, key in enumerate(keys):
            if type(key) is int and 0 <= key < size:
                shard[i], row[i] = shard_arr[key], row_arr[key]
            else:
                shard[i], row[i] = self._other.get(key, (-1, 0))
        return shard, row
