"""DistillReader + TeacherPool against real teacher server processes on loopback.

Teachers are ``teacher_server.zoo:latency`` (a fixed delay per batch, logits
whose column 0 is the sample id), so every delivered output can be matched to
the batch it belongs to and every sample id counted.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader

from student_client import (
    DistillReader,
    NoTeacherAvailableError,
    OutputSpec,
    PoolConfig,
    TeacherPool,
    TeacherRequestError,
    TopK,
)
from tests.helpers.teacher_proc import start_teachers
from tests.helpers import datasets

IdDataset = datasets.IdDataset


@pytest.fixture(scope="module")
def two_teachers():
    procs = start_teachers(2, "--model-kwargs", '{"delay_ms": 5}')
    yield procs
    for p in procs:
        p.close()


def check_epoch(reader, n: int) -> list[int]:
    """Iterate one epoch; assert each output belongs to its batch; return the ids in delivery order."""
    seen: list[int] = []
    for (x, y), out in reader:
        ids = x[:, 0]
        logits = out["logits"].dense() if isinstance(out["logits"], TopK) else out["logits"]
        assert torch.equal(logits[:, 0], ids), "teacher output does not belong to this batch"
        assert torch.equal(y, ids.long() % 10)
        seen.extend(ids.long().tolist())
    return seen


def test_dataloader_with_workers_over_two_teachers_exactly_once_in_order(two_teachers):
    loader = DataLoader(IdDataset(203), batch_size=8, num_workers=2)
    addresses = [t.address for t in two_teachers]
    with TeacherPool(addresses, config=PoolConfig(timeout_s=10, wait_timeout_s=20)) as pool, \
            DistillReader(loader, pool, window=6) as reader:
        for _ in range(2):  # two epochs through the same reader
            assert check_epoch(reader, 203) == list(range(203))
        st = reader.stats().source
    assert st.completed == 2 * 26 and st.failed == 0 and st.late_answers_dropped == 0
    assert all(st.teachers[a].successes > 0 for a in addresses), "load was not spread over both teachers"


def test_top_k_probs_come_back_sparse_and_consistent(two_teachers):
    loader = DataLoader(IdDataset(16), batch_size=4)
    spec = OutputSpec("logits", "probs", temperature=2.0, top_k=3, dtype="float16")
    with DistillReader(loader, teachers=[two_teachers[0].address], outputs=[spec]) as reader:
        for (x, _), out in reader:
            tk = out["logits"]
            assert isinstance(tk, TopK) and tk.values.shape == (4, 3) and tk.dense_shape == (4, 10)
            assert tk.values.dtype == torch.float16 and tk.transform == "probs"
            # logits = id + j/10: the largest are the last classes
            assert tk.indices.tolist() == [[9, 8, 7]] * 4


def test_invalid_argument_surfaces_at_once_and_is_not_retried(two_teachers):
    bad = DataLoader([torch.zeros(5) for _ in range(8)], batch_size=4)  # 5 features, teacher wants 4
    with DistillReader(bad, teachers=[t.address for t in two_teachers], teacher_input=lambda b: b) as reader:
        delivered = []
        with pytest.raises(TeacherRequestError) as ei:
            for b in reader:
                delivered.append(b)
        st = reader.stats().source
    assert delivered == []  # at once: the first batch raised, nothing waited for a deadline or a retry
    assert st.retries == 0 and st.failed >= 1
    assert ei.value.code == "INVALID_ARGUMENT"
    assert "input" in ei.value.details and "4" in ei.value.details  # the teacher's own explanation
    assert sum(t.requests for t in st.teachers.values()) <= 2  # the window's two batches, each sent once


def test_sigkilled_teacher_mid_epoch_loses_and_duplicates_no_batch():
    procs = start_teachers(2, "--model-kwargs", '{"delay_ms": 20}')
    try:
        loader = DataLoader(IdDataset(400), batch_size=8, num_workers=2)
        cfg = PoolConfig(timeout_s=10, wait_timeout_s=20, max_in_flight_per_teacher=3)
        with TeacherPool([p.address for p in procs], config=cfg) as pool, \
                DistillReader(loader, pool, window=8) as reader:
            seen: list[int] = []
            killed = None
            for n, ((x, _), out) in enumerate(reader):
                assert torch.equal(out["logits"][:, 0], x[:, 0])
                seen.extend(x[:, 0].long().tolist())
                if n == 10:
                    # kill the teacher holding the most requests right now: its batches must be re-sent
                    st = reader.stats().source
                    victim = max(procs, key=lambda p: st.teachers[p.address].outstanding)
                    victim.kill()
                    victim.wait(10)
                    killed = victim.address
            st = reader.stats().source
        assert seen == list(range(400)), "a batch was lost, duplicated or reordered"
        survivor = next(p.address for p in procs if p.address != killed)
        assert st.teachers[killed].failovers >= 1 and st.retries >= 1
        summary = reader.stats().as_dict()
        assert summary["failovers"] >= 1 and summary["batches"] == 50 and reader.stats().get("retries") >= 1
        assert st.teachers[survivor].successes > st.teachers[killed].successes
        # every delivered batch was answered exactly once, by one of the two teachers
        assert sum(t.successes for t in st.teachers.values()) == st.completed == 50
    finally:
        for p in procs:
            p.close()


def test_every_teacher_dead_raises_within_wait_timeout_never_hangs():
    (proc,) = start_teachers(1, "--model-kwargs", '{"delay_ms": 5}')
    wait_timeout_s = 1.5
    timeout_s = 60.0  # per call: far beyond wait_timeout_s, so only the watchdog can end the wait
    try:
        loader = DataLoader(IdDataset(10_000), batch_size=4)
        cfg = PoolConfig(timeout_s=timeout_s, wait_timeout_s=wait_timeout_s)
        with TeacherPool([proc.address], config=cfg) as pool, DistillReader(loader, pool) as reader:
            killed_at = None
            with pytest.raises(NoTeacherAvailableError) as ei:
                for n, _ in enumerate(reader):
                    if n == 5:
                        proc.kill()
                        proc.wait(10)
                        killed_at = time.monotonic()
            elapsed = time.monotonic() - killed_at
    finally:
        proc.close()
    # Gave up after wait_timeout_s (named in the message), well before any call's deadline.
    assert elapsed < timeout_s / 2, f"took {elapsed:.1f} s to give up"
    msg = str(ei.value)
    assert proc.address in msg and "UNAVAILABLE" in msg and "wait_timeout_s=1.5" in msg


def test_registry_discovery_follows_teachers_live(two_teachers):
    registry = pytest.importorskip("registry")
    from registry.embedded import EmbeddedRedis

    a, b = (t.address for t in two_teachers)
    with EmbeddedRedis() as redis_server:
        url = redis_server.url

        def register(address):
            rec = registry.TeacherRecord(endpoint=address, service="ids", model_name="latency", max_batch_size=64)
            return registry.TeacherRegistration(url, "ids", rec, heartbeat_s=0.2, ttl_s=0.6).start()

        reg_a = register(a)
        try:
            loader = DataLoader(IdDataset(4000), batch_size=8)
            with TeacherPool.from_registry(url, "ids", poll_s=0.2, config=PoolConfig(wait_timeout_s=20)) as pool, \
                    DistillReader(loader, pool) as reader:
                seen: list[int] = []
                reg_b = None
                for n, ((x, _), out) in enumerate(reader):
                    seen.extend(x[:, 0].long().tolist())
                    if n == 5:
                        assert pool.endpoints == [a]
                        reg_b = register(b)  # a teacher joins mid-epoch
                    if reg_b is not None and pool.stats().teachers.get(b, None) and \
                            pool.stats().teachers[b].successes >= 3:
                        break
                else:
                    pytest.fail("the teacher that joined through the registry never served a batch")
                reg_b.close()
        finally:
            reg_a.close()
    assert seen == list(range(len(seen)))
