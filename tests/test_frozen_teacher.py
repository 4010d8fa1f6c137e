"""A teacher frozen mid-run (SIGSTOP) under a real reader, over each transport.

A frozen teacher resets no connection: its calls neither fail nor answer, so
only hedging (``PoolConfig.hedge_after_s``, default ``"auto"``) keeps batches
flowing before ``timeout_s``. Two real latency teachers, a DistillReader over
a fixed list of them, and the default hedge; one teacher is SIGSTOPped with
calls in flight and SIGCONTed once it has been hedged. What a user would
notice is checked: every sample delivered once and in order with its own
answer, no batch waited for its deadline, the frozen teacher was hedged
(``HEDGED``, breaker open), the calls that lost the race were withdrawn (none
of the answers it computed for them after waking reaches the pool), and it
serves again after SIGCONT. The README's SIGSTOP figure (longest gap ~0.45 s)
is measured by ``bench/failover.py --signal STOP``, not asserted here.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader

from student_client import DistillReader, PoolConfig, TeacherPool
from tests.helpers.datasets import IdDataset
from tests.helpers.teacher_proc import start_teachers
from tests.helpers.transports import TRANSPORTS, wait_for_transport

FREEZE_AT = 40  # batches delivered before the freeze: both teachers have the 8 answers "auto" needs
TIMEOUT_S = 20.0  # per-call deadline: far beyond the hedge (0.5 s), so a batch it rescues was not hedged
DEADLINE_S = 90.0


@pytest.fixture(scope="module")
def two_teachers():
    """Two latency teachers for both transports' runs (each run thaws the one it froze)."""
    procs = start_teachers(2, "--model-kwargs", '{"delay_ms": 10}', env={"OMP_NUM_THREADS": "1"})
    try:
        yield procs
    finally:
        for p in procs:
            p.close()


@TRANSPORTS
def test_a_frozen_teacher_is_hedged_its_losing_calls_withdrawn_and_nothing_lost(two_teachers, local_transport):
    procs = two_teachers
    victim = None
    resumed = False
    config = PoolConfig(timeout_s=TIMEOUT_S, local_transport=local_transport)  # hedge_after_s="auto"
    loader = DataLoader(IdDataset(10**6), batch_size=8)
    try:
        with TeacherPool([p.address for p in procs], config=config) as pool, \
                DistillReader(loader, pool, window=8) as reader:
            wait_for_transport(pool, [p.address for p in procs], local_transport)
            seen: list[int] = []
            frozen_at_batch = successes_at_resume = None
            deadline = time.monotonic() + DEADLINE_S
            for n, ((x, _), out) in enumerate(reader):
                assert torch.equal(out["logits"][:, 0], x[:, 0]), "an answer was delivered with the wrong batch"
                seen.extend(x[:, 0].long().tolist())
                assert time.monotonic() < deadline, f"stuck: {pool.stats()}"
                if n == FREEZE_AT:
                    st = pool.stats()
                    victim = max(procs, key=lambda p: st.teachers[p.address].outstanding)
                    assert st.teachers[victim.address].outstanding > 0, "no call in flight to freeze"
                    victim.send_signal(signal.SIGSTOP)
                    frozen_at_batch = n
                elif victim is not None and not resumed:
                    v = pool.stats().teachers[victim.address]
                    if v.failures.get("HEDGED") and n >= frozen_at_batch + 40:  # trained on while it was frozen
                        victim.send_signal(signal.SIGCONT)
                        resumed, successes_at_resume = True, v.successes
                elif resumed and pool.stats().teachers[victim.address].successes > successes_at_resume:
                    break  # it serves again: its replies to the withdrawn calls came before this one
            st = reader.stats().source
    finally:
        if victim is not None and not resumed:
            victim.send_signal(signal.SIGCONT)  # the next run, and close(), need it awake
    assert seen == list(range(len(seen))), "a batch was lost, duplicated or reordered"
    assert st.failed == 0 and st.completed >= len(seen) // 8
    frozen = st.teachers[victim.address]
    assert st.hedges >= 1 and frozen.failures.get("HEDGED", 0) >= 1
    assert "DEADLINE_EXCEEDED" not in frozen.failures, "a batch waited for its deadline instead of a hedge"
    # The losing calls were cancelled (gRPC) or withdrawn (same-host): what the teacher
    # computed for them after SIGCONT never reached the pool.
    assert st.late_answers_dropped == 0
    assert frozen.transport == ("local" if local_transport == "auto" else "grpc")
