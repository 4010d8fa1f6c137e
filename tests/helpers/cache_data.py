"""Datasets for ``edistill record --data tests.helpers.cache_data:...`` in the cache's process tests."""

from __future__ import annotations

import os

from tests.helpers.datasets import IdDataset

#: samples of :func:`id_dataset`; the tests read the same variable
SIZE_ENV = "EDISTILL_TEST_CACHE_N"


def id_dataset() -> IdDataset:
    """``IdDataset($EDISTILL_TEST_CACHE_N)`` (features 4: the latency teacher echoes the id)."""
    return IdDataset(int(os.environ.get(SIZE_ENV, "600")), features=4)
