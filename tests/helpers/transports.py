"""Real-process fault tests run over both student-teacher transports.

A teacher on this host is reached over its Unix socket when the pool's
``local_transport`` is ``"auto"`` (the default), over gRPC when it is
``"off"`` -- the path of every teacher on another machine, where a signal cuts
gRPC calls in flight. :data:`TRANSPORTS` parametrizes a test over both;
:func:`wait_for_transport` makes sure the calls under test use the one asked for.
"""

from __future__ import annotations

from typing import Iterable

import pytest

from tests.helpers.redis_proc import wait_until

__all__ = ["TRANSPORTS", "wait_for_transport"]

#: ``@TRANSPORTS`` gives the test a ``local_transport`` argument: "auto" (same-host) and "off" (gRPC).
TRANSPORTS = pytest.mark.parametrize("local_transport", ["auto", "off"], ids=["same-host", "grpc"])


def wait_for_transport(pool, endpoints: Iterable[str], local_transport: str, timeout_s: float = 20.0) -> None:
    """Until ``pool`` reaches every one of ``endpoints`` over the transport ``local_transport`` selects."""
    want = "local" if local_transport == "auto" else "grpc"
    endpoints = set(endpoints)
    wait_until(lambda: {a for a, t in pool.stats().teachers.items() if t.transport == want} >= endpoints,
               timeout_s=timeout_s, what=f"the pool to reach {sorted(endpoints)} over {want}")
