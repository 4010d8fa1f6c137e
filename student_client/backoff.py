"""Jittered exponential backoff, a small value object (after redis-py's ``backoff.py``).

The delay before the n-th retry (n >= 1) is ``min(cap_s, base_s * 2**(n-1))``,
scaled down by a random factor in ``[1 - jitter, 1]`` so that many students
retrying one recovering teacher do not arrive in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError

__all__ = ["ExponentialBackoff"]


@dataclass(frozen=True)
class ExponentialBackoff:
    """Delays for successive failures of one teacher.

    Attributes:
        base_s: delay after the first failure. 0.1 s: a teacher restarting at
            the same address is retried almost at once.
        cap_s: longest delay. 5 s: a teacher that is down for good costs one
            failed probe per 5 s, and one that comes back is used within 5 s.
        jitter: fraction of the delay that is randomised (0 = none, 1 = full jitter).
        uniform: ``uniform(a, b)`` random source; injectable for deterministic tests.
    """

    base_s: float = 0.1
    cap_s: float = 5.0
    jitter: float = 0.5
    uniform: Callable[[float, float], float] = random.uniform

    def __post_init__(self) -> None:
        if not self.base_s > 0:
            raise ConfigError(f"backoff base_s must be > 0, got {self.base_s!r}")
        if not self.cap_s >= self.base_s:
            raise ConfigError(f"backoff cap_s must be >= base_s ({self.base_s}), got {self.cap_s!r}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"backoff jitter must be in [0, 1], got {self.jitter!r}")

    def delay_s(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (>= 1)."""
        n = max(1, int(failures))
        # cap the exponent so 2**n cannot overflow for a teacher down for days
        d = min(self.cap_s, self.base_s * (2.0 ** min(n - 1, 62)))
        if self.jitter:
            d = self.uniform(d * (1.0 - self.jitter), d)
        return d
