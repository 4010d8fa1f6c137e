"""Progress reporting for :class:`~student_client.reader.DistillReader`.

Two optional outputs of the same numbers (:meth:`ReaderStats.summary`):

* a tqdm progress bar (``progress=True``) per epoch, whose postfix shows
  samples/s, live teachers, the share of time the training loop waited on
  teachers and the reader's own CPU per batch;
* a log line every ``log_every`` batches (``logging``, INFO, logger
  ``student_client.reader``).

Both read :meth:`DistillReader.stats`, which takes the pool's lock and sorts
latency samples, so the bar's postfix is refreshed at most every
``_POSTFIX_EVERY_S`` instead of on every batch.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

from .stats import ReaderStats

__all__ = ["ReaderProgress"]

# How often the bar's numbers are recomputed (the bar itself ticks per batch).
_POSTFIX_EVERY_S = 0.5


class ReaderProgress:
    """Bar and/or periodic log lines for one reader; driven from the training loop's thread.

    Args:
        stats: returns the reader's current :class:`ReaderStats`.
        logger: where ``log_every`` lines go.
        bar: show a tqdm bar on stderr.
        log_every: log every N delivered batches (None or 0: never).
    """

    def __init__(self, stats: Callable[[], ReaderStats], logger: logging.Logger, *, bar: bool,
                 log_every: int | None) -> None:
        self._stats = stats
        self._log = logger
        self._want_bar = bar
        self._log_every = log_every or 0
        self._bar: Any = None
        self._next_postfix = 0.0

    def start_epoch(self, epoch: int, total: int | None) -> None:
        """Open the bar of a new epoch (``total``: batches per epoch, if known)."""
        self.close()
        if self._want_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"distill epoch {epoch}", unit="batch", file=sys.stderr,
                             dynamic_ncols=True, leave=True)
            self._next_postfix = 0.0

    def batch_delivered(self, batches: int) -> None:
        """One more batch reached the training loop (``batches``: the reader's total so far)."""
        bar = self._bar
        if bar is not None:
            bar.update(1)
            now = time.monotonic()
            if now >= self._next_postfix:
                self._next_postfix = now + _POSTFIX_EVERY_S
                bar.set_postfix_str(_postfix(self._stats()), refresh=False)
        if self._log_every and batches % self._log_every == 0:
            self._log.info("DistillReader: %s", self._stats().summary())

    def close(self) -> None:
        """Close the current bar, with final numbers (idempotent)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.set_postfix_str(_postfix(self._stats()), refresh=False)
            bar.close()


def _postfix(s: ReaderStats) -> str:
    return (f"{s.samples_per_s:.0f} samples/s, {s.live_teachers} teachers, wait {s.wait_fraction:.0%}, "
            f"reader {s.cpu_ms_per_batch:.2f} ms/batch")
