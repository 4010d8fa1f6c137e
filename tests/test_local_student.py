"""The student side of the same-host local transport, against real teacher processes.

A teacher on this machine offers its Unix socket (``Describe.local_socket``);
once it passes its gRPC health check the pool sends it batches over that
socket, passing the batch's shared memory (``student_client.local``). These
tests check what a user would notice: the switch happens (``stats()`` says
``local``), answers are the right ones for shared, private and
non-contiguous batches, a killed teacher loses and duplicates nothing,
``local_transport="off"`` keeps gRPC, a bad batch gets the gRPC path's clear
error, tokens are honoured, and the student leaks no file descriptors.

Teachers are ``teacher_server.zoo:latency`` (``logits[:, 0] == input[:, 0]``),
so each answer is matched to its batch.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader

from student_client import DistillReader, PoolConfig, SourceRequest, TeacherPool, TeacherRequestError
from student_client.errors import ConfigError
from tests.helpers.datasets import IdDataset
from tests.helpers.redis_proc import wait_until
from tests.helpers.teacher_proc import TeacherProcess

LATENCY = "teacher_server.zoo:latency"
FEATURES = 8


def _latency(delay_ms: float = 5.0, *extra: str, env: dict | None = None) -> TeacherProcess:
    return TeacherProcess(LATENCY, "--model-kwargs", f'{{"delay_ms": {delay_ms}, "features": {FEATURES}}}',
                          "--max-batch-size", "64", *extra, env=env)


def _warm(pool: TeacherPool, n: int = 1) -> None:
    """Send batches until the pool has switched ``n`` teachers to the local transport."""
    def switched() -> bool:
        pool.submit(SourceRequest({"input": torch.zeros(2, FEATURES)}, "warm")).result(timeout=30)
        return sum(t.transport == "local" for t in pool.stats().teachers.values()) >= n
    wait_until(switched, timeout_s=30, interval_s=0.05, what=f"{n} teacher(s) on the local transport")


def _batch(i: int, rows: int = 16) -> torch.Tensor:
    x = torch.randn(rows, FEATURES)
    x[:, 0] = torch.arange(i * rows, (i + 1) * rows, dtype=torch.float32)
    return x


def test_same_host_teacher_is_used_over_the_local_socket_for_shared_private_and_strided_batches():
    with _latency() as t, TeacherPool([t.address]) as pool:
        _warm(pool)
        shared = _batch(0).share_memory_()
        private = _batch(1)
        strided = _batch(2, rows=32)[::2]  # not contiguous: copied before sending
        offset = torch.cat([torch.zeros(3, FEATURES), _batch(3)]).share_memory_()[3:]  # shared, storage offset 3 rows
        for x in (shared, private, strided, offset):
            out = pool.submit(SourceRequest({"input": x}, "b")).result(timeout=30)["logits"]
            assert out.shape == (x.shape[0], 10)
            assert torch.equal(out[:, 0], x[:, 0]), "answer does not belong to the batch sent"
        stats = pool.stats()
        (ts,) = stats.teachers.values()
        assert ts.transport == "local" and ts.failures == {}


def test_reader_over_a_dataloader_with_workers_delivers_every_batch_once_in_order_over_shared_memory():
    loader = DataLoader(IdDataset(640, features=FEATURES), batch_size=32, num_workers=1,
                        multiprocessing_context="forkserver")
    with _latency() as t, DistillReader(loader, teachers=[t.address], window=4) as reader:
        pool_ready = False
        ids = []
        for epoch in range(2):
            for (x, _), out in reader:
                assert torch.equal(out["logits"][:, 0], x[:, 0])
                ids.extend(int(v) for v in x[:, 0])
            if epoch == 0:
                pool_ready = any(s.transport == "local" for s in reader.stats().teachers.values())
        assert ids == list(range(640)) * 2
        assert pool_ready, "the second epoch should have started on the local transport"
        (ts,) = reader.stats().teachers.values()
        assert ts.transport == "local" and ts.failures == {}


def test_local_transport_off_keeps_grpc(monkeypatch):
    with _latency() as t:
        with TeacherPool([t.address], config=PoolConfig(local_transport="off")) as pool:
            for i in range(5):
                pool.submit(SourceRequest({"input": _batch(i)}, i)).result(timeout=30)
            (ts,) = pool.stats().teachers.values()
            assert ts.transport == "grpc" and ts.successes == 5
        monkeypatch.setenv("EDISTILL_LOCAL_TRANSPORT", "off")
        with TeacherPool([t.address]) as pool:
            for i in range(5):
                pool.submit(SourceRequest({"input": _batch(i)}, i)).result(timeout=30)
            assert pool.stats().teachers[t.address].transport == "grpc"
    monkeypatch.setenv("EDISTILL_LOCAL_TRANSPORT", "sometimes")
    with pytest.raises(ConfigError, match="local_transport must be 'auto' or 'off'"):
        PoolConfig.from_env()  # what a pool made without a config reads
    with pytest.raises(ConfigError, match="local_transport must be 'auto' or 'off'"):
        TeacherPool(["127.0.0.1:1"])
    assert PoolConfig().local_transport == "auto"  # an explicit config is what it says
    assert TeacherPool(["127.0.0.1:1"], trust_env=False).config.local_transport == "auto"


def test_a_bad_batch_over_the_local_socket_gets_the_same_clear_error_as_over_grpc():
    with _latency() as t:
        messages = []
        for mode in ("auto", "off"):
            with TeacherPool([t.address], config=PoolConfig(local_transport=mode)) as pool:
                if mode == "auto":
                    _warm(pool)
                with pytest.raises(TeacherRequestError) as info:
                    pool.submit(SourceRequest({"input": torch.zeros(4, FEATURES + 1)}, "bad")).result(timeout=30)
                assert info.value.code == "INVALID_ARGUMENT"
                messages.append(info.value.details)
                # the teacher is still fine for good batches
                x = _batch(0)
                assert torch.equal(pool.submit(SourceRequest({"input": x}, 1)).result(timeout=30)["logits"][:, 0], x[:, 0])
                assert pool.stats().teachers[t.address].transport == ("local" if mode == "auto" else "grpc")
        assert messages[0] == messages[1] and str(FEATURES) in messages[0]


def test_killing_a_local_teacher_mid_run_loses_and_duplicates_nothing():
    loader = DataLoader(IdDataset(3000, features=FEATURES), batch_size=10, num_workers=1,
                        multiprocessing_context="forkserver")
    with _latency(20.0) as a, _latency(20.0) as b:
        with DistillReader(loader, teachers=[a.address, b.address], window=8) as reader:
            ids, killed = [], False
            for (x, _), out in reader:
                assert torch.equal(out["logits"][:, 0], x[:, 0])
                ids.extend(int(v) for v in x[:, 0])
                if not killed and len(ids) >= 600:
                    assert {s.transport for s in reader.stats().teachers.values()} == {"local"}
                    a.kill()
                    killed = True
            assert ids == list(range(3000))
            stats = reader.stats().teachers
            assert stats[b.address].transport == "local"
            assert stats[a.address].failovers >= 1  # its in-flight batches were re-sent to b


def test_a_teacher_requiring_a_token_is_used_locally_with_the_token_and_never_without():
    env = {"EDISTILL_AUTH_TOKEN": "s3cret-token"}
    with _latency(env=env) as t:
        with TeacherPool([t.address]) as pool:
            # No token here: health checks are open, but Describe and Predict are not, so the
            # local socket is never offered and the batch is refused over gRPC.
            with pytest.raises(TeacherRequestError) as info:
                pool.submit(SourceRequest({"input": _batch(0)}, 0)).result(timeout=30)
            assert info.value.code == "UNAUTHENTICATED"
            assert pool.stats().teachers[t.address].transport == "grpc"
        from student_client.credentials import TeacherCredentials

        creds = TeacherCredentials(auth_token="s3cret-token")
        with TeacherPool([t.address], credentials=creds) as pool:
            _warm(pool)
            x = _batch(1)
            assert torch.equal(pool.submit(SourceRequest({"input": x}, 1)).result(timeout=30)["logits"][:, 0], x[:, 0])


def test_the_student_leaks_no_file_descriptors_over_many_local_requests():
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with _latency(1.0) as t, TeacherPool([t.address]) as pool:
        _warm(pool)
        for i in range(20):  # settle: lazily created fds (selectors, memfds already closed)
            pool.submit(SourceRequest({"input": _batch(i)}, i)).result(timeout=30)
        before = open_fds()
        futs = [pool.submit(SourceRequest({"input": _batch(i) if i % 2 else _batch(i).share_memory_()}, i))
                for i in range(300)]
        for i, f in enumerate(futs):
            assert f.result(timeout=60)["logits"][0, 0] == i * 16
        assert open_fds() <= before + 2
        assert pool.stats().teachers[t.address].transport == "local"


def test_a_teacher_stopped_with_sigterm_closes_its_local_connection_and_the_other_teacher_carries_on():
    with _latency() as a, _latency() as b, TeacherPool([a.address, b.address]) as pool:
        _warm(pool, 2)
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=20) == 0
        for i in range(40):
            x = _batch(i)
            assert torch.equal(pool.submit(SourceRequest({"input": x}, i)).result(timeout=30)["logits"][:, 0], x[:, 0])
        stats = pool.stats().teachers
        assert stats[b.address].transport == "local"
        assert stats[a.address].transport == "grpc"  # its local connection was closed by the drain


def test_private_batches_of_varying_sizes_reuse_staging_buffers_without_mixing_answers():
    # Private-memory batches are copied into reused staging buffers; many in flight at
    # once, of different sizes, must each get the answer for their own rows.
    with _latency(2.0) as t, TeacherPool([t.address], config=PoolConfig(max_in_flight_per_teacher=8)) as pool:
        _warm(pool)
        batches = [_batch(i, rows=1 + (i * 7) % 64) for i in range(120)]
        futs = [pool.submit(SourceRequest({"input": x}, i)) for i, x in enumerate(batches)]
        for x, f in zip(batches, futs):
            out = f.result(timeout=60)["logits"]
            assert out.shape[0] == x.shape[0] and torch.equal(out[:, 0], x[:, 0])
        assert pool.stats().teachers[t.address].transport == "local"


def test_cancelling_a_batch_from_another_thread_ends_a_wait_on_it_at_once():
    # The waiting thread reads local answers itself, blocked in poll(); a cancel from
    # another thread must wake it, not leave it waiting for the (slow) answer.
    t = TeacherProcess(LATENCY, "--model-kwargs", f'{{"delay_ms": 1, "per_sample_ms": 100, "features": {FEATURES}}}',
                       "--max-batch-size", "64")
    with t, TeacherPool([t.address]) as pool:
        _warm(pool)  # 2 rows: 0.2 s per batch
        fut = pool.submit(SourceRequest({"input": _batch(0, rows=60).share_memory_()}, "slow"))  # 6 s
        timer = threading.Timer(0.3, fut.cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(timeout=30)
        waited = time.monotonic() - t0
        timer.join()
        # The answer needs 6 s: a wait that only the answer ended would last >= 5.7 s after the cancel.
        assert waited < 5.0, f"the wait outlived the cancel by {waited - 0.3:.1f} s"
        stats = pool.stats()
        assert stats.cancelled == 1
        # The pool goes on: the next batch is served locally.
        x = _batch(1, rows=2)
        assert torch.equal(pool.submit(SourceRequest({"input": x}, "next")).result(timeout=30)["logits"][:, 0], x[:, 0])
        assert stats.teachers[t.address].transport == "local"
