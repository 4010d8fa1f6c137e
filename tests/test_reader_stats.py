"""DistillReader.stats(), the progress bar and periodic log lines, against real teachers where it matters."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from torch.utils.data import DataLoader

from student_client import DistillReader, PoolConfig, TeacherPool
from student_client.errors import ConfigError
from student_client.sources import KnowledgeSource
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig, zoo
from tests.helpers.datasets import IdDataset
from tests.helpers.redis_proc import wait_until
from tests.helpers.teacher_proc import start_teachers


class _TimedSource(KnowledgeSource):
    """Answers each batch after ``delay_s`` from a timer thread (0: already answered at submit)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._timers: list[threading.Timer] = []

    def submit(self, request):
        fut: Future = Future()
        out = {"logits": next(iter(request.inputs.values()))}
        if self.delay_s == 0:
            fut.set_result(out)
        else:
            t = threading.Timer(self.delay_s, fut.set_result, (out,))
            self._timers.append(t)
            t.start()
        return fut

    def close(self) -> None:
        for t in self._timers:
            t.cancel()



def test_stats_after_a_teacher_is_killed_add_up_to_the_batches_delivered() -> None:
    procs = start_teachers(2, "--model-kwargs", '{"delay_ms": 5}')
    n_batches = 40
    try:
        loader = DataLoader(IdDataset(4 * n_batches), batch_size=4)
        seen: list[int] = []
        cfg = PoolConfig(timeout_s=10.0, wait_timeout_s=20.0)
        with TeacherPool([p.address for p in procs], config=cfg) as pool, DistillReader(loader, pool, window=8) as reader:
            # Teachers count as live once they passed their first health check (a loopback round trip).
            wait_until(lambda: reader.stats().live_teachers == 2, timeout_s=10, what="both teachers live")
            for n, ((x, _), out) in enumerate(reader, 1):
                assert out["logits"][:, 0].tolist() == x[:, 0].tolist()
                seen += x[:, 0].long().tolist()
                if n == 8:
                    # kill the teacher holding the most batches: they must be re-sent to the other one
                    teachers = reader.stats().teachers
                    victim = max(procs, key=lambda p: teachers[p.address].outstanding)
                    victim.kill()
                    victim.wait(10)
            stats = reader.stats()
    finally:
        for p in procs:
            p.close()

    assert seen == list(range(4 * n_batches))  # nothing lost, nothing duplicated
    assert stats.batches == n_batches and stats.samples == 4 * n_batches and stats.epochs == 1
    assert stats.failovers >= 1 and stats.retries >= 1
    killed = stats.teachers[victim.address]
    survivor = next(t for e, t in stats.teachers.items() if e != victim.address)
    assert killed.failovers >= 1 and killed.failures  # e.g. {"UNAVAILABLE": 3}
    assert sum(t.successes for t in stats.teachers.values()) == stats.batches
    assert sum(t.requests for t in stats.teachers.values()) == \
        stats.batches + sum(sum(t.failures.values()) for t in stats.teachers.values())
    assert survivor.latency_p50_s <= survivor.latency_p90_s <= survivor.latency_p99_s
    assert stats.live_teachers == 1
    assert 0.0 <= stats.wait_s <= stats.wall_s and 0.0 <= stats.wait_fraction <= 1.0
    summary = stats.as_dict()
    assert summary["failovers"] == stats.failovers and summary["samples"] == 4 * n_batches
    assert summary["live_teachers"] == 1 and summary["teachers"] == 2


def test_wait_fraction_tells_a_starved_training_loop_from_a_fed_one() -> None:
    loader = DataLoader(IdDataset(40), batch_size=4)
    with DistillReader(loader, source=_TimedSource(0.05), window=1) as slow:
        before = slow.stats()
        assert (before.wait_fraction, before.samples_per_s) == (0.0, 0.0)
        for _ in slow:
            pass  # a training step that takes no time: all time is spent waiting
        starved = slow.stats()
    with DistillReader(loader, source=_TimedSource(0.0), window=1) as fast:
        for _ in fast:
            pass
        fed = fast.stats()
    # Each wait starts a little after its timer did (at submit), so it is a bit under 50 ms.
    assert starved.wait_fraction > 0.5 and starved.wait_s >= 0.8 * 10 * 0.05
    assert fed.wait_fraction == 0.0 and fed.wait_s == 0.0  # every answer was ready when asked for
    assert starved.samples == fed.samples == 40 and fed.samples_per_s > 0


def test_wall_time_counts_only_time_inside_epochs() -> None:
    loader = DataLoader(IdDataset(8), batch_size=4)
    with DistillReader(loader, source=_TimedSource(0.0)) as reader:
        list(reader)
        first = reader.stats().wall_s
        threading.Event().wait(0.2)  # "evaluation" between epochs
        assert reader.stats().wall_s == first
        t0 = time.perf_counter()  # the clock wall_s uses
        list(reader)
        inside = time.perf_counter() - t0
        second = reader.stats()
    assert second.epochs == 2 and second.batches == 4 and second.wall_s > first
    # The pause between epochs was not counted: the second epoch added at most the time spent in it.
    assert second.wall_s - first <= inside


@pytest.fixture(scope="module")
def teacher():
    cfg = TeacherConfig(model_name="latency", max_queue_delay_ms=0)
    with BackgroundTeacher(cfg, LoadedModel.from_module(zoo.latency(delay_ms=1))) as t:
        yield t


def test_progress_bar_shows_samples_per_second_teachers_and_wait(teacher, capsys) -> None:
    loader = DataLoader(IdDataset(24), batch_size=4)
    with DistillReader(loader, teachers=[teacher.address], progress=True) as reader:
        assert len(list(reader)) == 6
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "distill epoch 1" in last and "6/6" in last
    assert "samples/s" in last and "1 teachers" in last and "wait " in last and "%" in last


def test_log_every_n_batches_logs_the_same_numbers(teacher, caplog) -> None:
    loader = DataLoader(IdDataset(40), batch_size=4)
    with caplog.at_level(logging.INFO, logger="student_client.reader"), \
            DistillReader(loader, teachers=[teacher.address], log_every=4) as reader:
        list(reader)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DistillReader:")]
    assert len(lines) == 2  # after batches 4 and 8 of 10
    assert lines[0].startswith("DistillReader: 4 batches") and lines[1].startswith("DistillReader: 8 batches")
    for line in lines:
        assert "samples/s" in line and "1 live teacher(s)" in line and "waiting on teachers" in line


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_log_every_is_validated(bad) -> None:
    with pytest.raises(ConfigError, match="log_every"):
        DistillReader([torch.zeros(1, 4)], source=_TimedSource(0.0), log_every=bad)


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class _BusyLoader:
    """Batches that cost ``loader_s`` of CPU to produce (like a heavy collate in the main process)."""

    def __init__(self, n: int, loader_s: float) -> None:
        self.n, self.loader_s = n, loader_s

    def __iter__(self):
        for i in range(self.n):
            _burn(self.loader_s)
            yield torch.full((2, 3), float(i))

    def __len__(self) -> int:
        return self.n


class _BusySource(_TimedSource):
    """Answers at once, after spending ``submit_s`` of CPU in submit (a costly serializer)."""

    def __init__(self, submit_s: float) -> None:
        super().__init__(0.0)
        self.submit_s = submit_s

    def submit(self, request):
        _burn(self.submit_s)
        return super().submit(request)


def test_reader_cpu_per_batch_counts_the_readers_work_and_not_the_loaders() -> None:
    with DistillReader(_BusyLoader(10, loader_s=0.03), source=_BusySource(submit_s=0.0)) as cheap:
        list(cheap)
        cheap_stats = cheap.stats()
    with DistillReader(_BusyLoader(10, loader_s=0.0), source=_BusySource(submit_s=0.01)) as costly:
        list(costly)
        costly_stats = costly.stats()
    # 30 ms of loader CPU per batch is not the reader's; 10 ms in submit is.
    assert 0 < cheap_stats.cpu_ms_per_batch < 10, cheap_stats.cpu_ms_per_batch
    assert costly_stats.cpu_ms_per_batch >= 9, costly_stats.cpu_ms_per_batch
    assert costly_stats.as_dict()["cpu_ms_per_batch"] == costly_stats.cpu_ms_per_batch


def test_str_of_stats_is_one_line_and_repr_is_complete(teacher) -> None:
    loader = DataLoader(IdDataset(16), batch_size=4)
    with DistillReader(loader, teachers=[teacher.address]) as reader:
        list(reader)
        stats = reader.stats()
    line = str(stats)
    assert "\n" not in line and len(line) < 200 and not line.startswith("ReaderStats(")
    assert line.startswith("4 batches, ") and "1 live teacher(s)" in line and "reader CPU " in line
    assert "ms/batch" in line and "waiting on teachers" in line
    full = repr(stats)
    assert full.startswith("ReaderStats(") and teacher.address in full and "latency_p99_s" in full
    (t,) = stats.teachers.values()
    assert (t.state, t.breaker) == ("healthy", "closed")  # the breaker in words, and its machine name


def test_a_teacher_that_left_keeps_the_transport_it_was_used_over(teacher) -> None:
    from student_client import SourceRequest

    with TeacherPool([teacher.address]) as pool:
        def over_the_socket() -> bool:  # same host: the socket, once the pool has switched to it
            pool.submit(SourceRequest({"": torch.zeros(1, 4)}, "probe")).result(timeout=20)
            return pool.stats().teachers[teacher.address].transport == "local"

        wait_until(over_the_socket, timeout_s=20, what="the pool to use the local transport")
        pool.submit(SourceRequest({"": torch.zeros(1, 4)}, "over the socket")).result(timeout=20)
        pool.set_endpoints([])
        left = pool.stats().teachers[teacher.address]
    assert (left.live, left.transport) == (False, "local")
