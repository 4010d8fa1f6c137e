"""Elastic teachers end to end (issue 3): a real Redis server process, real teacher
processes started with ``--registry URL --service NAME``, and a student reading
through ``DistillReader(loader, registry=URL, service=NAME)``.

Teachers are ``teacher_server.zoo:latency`` (``logits[:, 0] == input[:, 0]``), the
dataset yields sample ids, so every delivered answer is matched to its batch and
every sample id is counted: "nothing lost, nothing duplicated" is
``delivered ids == range(n)`` (delivery is in order). The SIGKILL and SIGTERM
tests run twice: over the same-host socket (what ``local_transport="auto"``
picks for these teachers) and over gRPC (``"off"``), the path of every teacher
on another machine, where the signal cuts gRPC calls in flight.

Timing: most tests use a short heartbeat (0.5 s, TTL 1.5 s) to stay fast; the
join and SIGTERM tests run on the defaults (1 s / 3 s). Registry expiry is
checked on the Redis server's own clock (member scores are expiry times in server
milliseconds), not on this machine's wall clock, so a loaded CI box cannot make
it flaky. Cost: about 65 s on an idle 2-core box, up to ~110 s when it is shared
(the Redis outage test alone holds Redis down for 10 s; a teacher process takes
~2.5 s to start, and 3 started in parallel ~4 s idle, up to ~17 s when loaded).
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import redis
import torch
from torch.utils.data import DataLoader, Dataset

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from registry import EmbeddedRedis, TeacherRecord, connect, encode_record, fetch_service, keys
from registry.connection import server_time_ms
from student_client import DistillReader, NoTeacherAvailableError, PoolConfig, TeacherPool
from tests.helpers.redis_proc import children, pid_alive, wait_until
from tests.helpers.teacher_proc import LATENCY, TeacherProcess, start_teachers
from tests.helpers.transports import TRANSPORTS, wait_for_transport

SERVICE = "elastic"
SHORT = ("--heartbeat-s", "0.5", "--ttl-s", "1.5")
SHORT_TTL_S = 1.5
STEP_S = 0.005  # a simulated training step, so epochs span the events under test


class Ids(Dataset):
    """Sample i: features (4,) with column 0 = i (the latency teacher's input)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.zeros(4)
        x[0] = i
        return x


def loader(n: int, batch_size: int = 8) -> DataLoader:
    return DataLoader(Ids(n), batch_size=batch_size)


def teacher_args(url: str, *timing: str, delay_ms: float = 20, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return ("--registry", url, "--service", SERVICE, *timing,
            "--model-kwargs", f'{{"delay_ms": {delay_ms}}}', *extra)


def close_all(procs: list[TeacherProcess]) -> None:
    """SIGTERM every live teacher first, then wait for each: they drain in parallel."""
    for p in procs:
        if p.returncode is None and p._proc is not None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.close()


def check(x: torch.Tensor, out: dict) -> list[int]:
    """The teacher's answer belongs to this batch; return its sample ids."""
    assert torch.equal(out["logits"][:, 0], x[:, 0]), "a teacher answer was delivered with the wrong batch"
    return x[:, 0].long().tolist()


def live_endpoints(client: redis.Redis) -> set[str]:
    return set(fetch_service(client, SERVICE).teachers)


def expiry_ms(client: redis.Redis, endpoint: str) -> int:
    """The member score (expiry time, Redis server ms) of the teacher registered at ``endpoint``."""
    record = fetch_service(client, SERVICE).teachers[endpoint]
    return int(client.zscore(keys.members_key(SERVICE), record.teacher_id))


@contextlib.contextmanager
def registry_reader(url: str, n_or_loader, *, poll_s: float | None = None, local_transport: str = "auto",
                    **kwargs) -> Iterator[DistillReader]:
    """A reader over a registry pool (closed with it); ``kwargs`` go to the reader."""
    data = loader(n_or_loader) if isinstance(n_or_loader, int) else n_or_loader
    config = PoolConfig(timeout_s=10, wait_timeout_s=30, max_in_flight_per_teacher=3, local_transport=local_transport)
    with TeacherPool.from_registry(url, SERVICE, poll_s=poll_s, config=config) as pool, \
            DistillReader(data, pool, teacher_input=lambda b: b, **kwargs) as reader:
        yield reader


@pytest.fixture
def redis_server():
    with EmbeddedRedis() as server:
        yield server


# ------------------------------------------------------------------ SIGKILL


@TRANSPORTS
def test_sigkill_one_of_three_teachers_under_load_loses_and_duplicates_nothing(redis_server, local_transport):
    client = connect(redis_server.url)
    procs = start_teachers(3, *teacher_args(redis_server.url, *SHORT))
    try:
        everyone = {p.address for p in procs}
        n_batches = 400
        # poll_s far above the TTL: joins arrive as events, and the silent departure of
        # the killed teacher must be noticed when its entry expires, not at a poll.
        with registry_reader(redis_server.url, n_batches * 8, window=9, poll_s=60,
                             local_transport=local_transport) as reader:
            pool = reader.source
            wait_until(lambda: set(pool.endpoints) == everyone, timeout_s=10, what="the reader to find 3 teachers")
            wait_for_transport(pool, everyone, local_transport)  # the kill cuts calls in flight on it
            seen: list[int] = []
            victim = None
            for n, (x, out) in enumerate(reader):
                seen.extend(check(x, out))
                if n == 40:
                    # Kill the teacher holding the most batches: they must be re-sent.
                    st = pool.stats()
                    assert all(st.teachers[a].successes > 0 for a in everyone), "load not spread over 3 teachers"
                    victim = max(procs, key=lambda p: st.teachers[p.address].outstanding)
                    assert st.teachers[victim.address].outstanding > 0, "no call in flight to cut"
                    victim.kill()
                    victim.wait(10)
                    killed_ms = server_time_ms(client)
                    # The heartbeat stopped: the stored expiry is the last heartbeat + TTL.
                    assert expiry_ms(client, victim.address) <= killed_ms + SHORT_TTL_S * 1000
                time.sleep(STEP_S)
            st = reader.stats()
            # The record expires on its own (TTL) and the reader stops using the dead teacher.
            wait_until(lambda: victim.address not in live_endpoints(client), timeout_s=SHORT_TTL_S + 20,
                       what="the killed teacher's record to expire")
            wait_until(lambda: victim.address not in pool.endpoints, timeout_s=30,
                       what="the reader to drop the killed teacher (before its next poll, 60 s away)")
            assert live_endpoints(client) == everyone - {victim.address}
    finally:
        close_all(procs)
    assert seen == list(range(n_batches * 8)), "a batch was lost, duplicated or reordered"
    assert st.batches == n_batches and st.source.completed == n_batches and st.source.failed == 0
    # The calls the kill cut failed at once (connection reset) and were re-sent: not left
    # to a hedge or to the registry dropping the teacher (which would also lose nothing).
    assert st.source.teachers[victim.address].failures.get("UNAVAILABLE", 0) >= 1
    assert st.source.teachers[victim.address].failovers >= 1 or st.source.retries >= 1


# --------------------------------------------------------------------- join


def test_teacher_started_mid_epoch_gets_requests_and_nothing_is_lost(redis_server):
    """Default heartbeat (1 s). The ready line is printed after the teacher has
    registered, and registering publishes a join event, so the reader normally
    sends to the newcomer within tens of milliseconds (polling, poll_s = 1
    heartbeat, is the fallback if the event is lost). What is asserted is the
    behaviour, not that figure: the newcomer gets requests and answers them
    while training goes on, within a deadline a loaded shared box meets; the
    delay from the ready line to its first request is in the failure message."""
    (first,) = start_teachers(1, *teacher_args(redis_server.url))
    newcomer = TeacherProcess(LATENCY, *teacher_args(redis_server.url))
    started = threading.Event()
    ready_at: list[float] = []
    errors: list[BaseException] = []

    def start_newcomer():
        try:
            newcomer.start()
            ready_at.append(time.monotonic())
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    starter = threading.Thread(target=start_newcomer)
    try:
        with registry_reader(redis_server.url, 10**6) as reader:
            pool = reader.source
            seen: list[int] = []
            first_request_at = None
            deadline = time.monotonic() + 60
            for n, (x, out) in enumerate(reader):
                seen.extend(check(x, out))
                if n == 10:
                    assert pool.endpoints == [first.address]
                    starter.start()  # mid-epoch; the loop keeps training while it starts
                    started.set()
                assert not errors, errors
                if ready_at and first_request_at is None:
                    t = pool.stats().teachers.get(newcomer.address)
                    if t is not None and t.requests > 0:
                        first_request_at = time.monotonic()
                if first_request_at is not None and pool.stats().teachers[newcomer.address].successes >= 5:
                    break
                assert time.monotonic() < deadline, (
                    "the new teacher never served 5 batches" if first_request_at is None else
                    f"the new teacher got its first request {first_request_at - ready_at[0]:.2f} s after its "
                    "ready line but did not serve 5 batches")
                time.sleep(STEP_S)
        assert seen == list(range(len(seen)))
    finally:
        if started.is_set():
            starter.join(60)
        newcomer.close()
        first.close()


# ------------------------------------------------------------ Redis outage


def test_redis_down_for_10s_mid_epoch_training_continues_and_teachers_reregister(redis_server):
    client = connect(redis_server.url)
    procs = start_teachers(2, *teacher_args(redis_server.url, *SHORT))
    everyone = {p.address for p in procs}
    outage_s = 10.0
    try:
        with registry_reader(redis_server.url, 10**6, poll_s=0.5) as reader:
            pool = reader.source
            wait_until(lambda: set(pool.endpoints) == everyone, timeout_s=10, what="the reader to find 2 teachers")
            seen: list[int] = []
            delivered: list[float] = []
            fewest_endpoints = len(everyone)
            stopped_at = restarted_at = back_at = None
            next_check = 0.0
            for n, (x, out) in enumerate(reader):
                seen.extend(check(x, out))
                now = time.monotonic()
                delivered.append(now)
                fewest_endpoints = min(fewest_endpoints, len(pool.endpoints))
                if n == 20:
                    redis_server.stop()
                    stopped_at = time.monotonic()
                elif stopped_at is not None and restarted_at is None and now - stopped_at >= outage_s:
                    redis_server.restart()  # same port, empty: teachers must register again by themselves
                    restarted_at = time.monotonic()
                elif restarted_at is not None and back_at is None and now >= next_check:
                    next_check = now + 0.1
                    if live_endpoints(client) == everyone:
                        back_at = now
                elif back_at is not None and now - back_at > 1.0:
                    break  # trained on for a second with the registry back
                assert restarted_at is None or now - restarted_at < 30, "teachers did not re-register"
                time.sleep(STEP_S)
            st = reader.stats()
    finally:
        logs = [p.stderr_text() for p in procs]
        close_all(procs)
    assert seen == list(range(len(seen))), "a batch was lost, duplicated or reordered"
    during = [t for t in delivered if stopped_at < t < restarted_at]
    gaps = [b - a for a, b in zip(delivered, delivered[1:])]
    # Training never stopped: batches kept coming all through the outage, with
    # no pause anywhere near its length (typical gap: one training step).
    assert len(during) > 100, f"only {len(during)} batches during a {outage_s:.0f} s Redis outage"
    assert max(gaps) < outage_s / 2, f"delivery paused for {max(gaps):.1f} s"
    assert fewest_endpoints == len(everyone), "the reader dropped known teachers while Redis was away"
    assert st.source.failed == 0
    assert back_at is not None  # both records reappeared in the restarted (empty) Redis
    assert all("registered again" in log for log in logs), "a teacher did not re-register by itself"


# ------------------------------------------------------------------ SIGTERM


def _direct_request(first_id: int, n: int = 8) -> pb.PredictRequest:
    x = np.zeros((n, 4), np.float32)
    x[:, 0] = np.arange(first_id, first_id + n)
    req = pb.PredictRequest(request_id=f"direct-{first_id}")
    codec.encode(x, req.inputs.add(), name="input")
    return req


@TRANSPORTS
def test_sigterm_deregisters_at_once_answers_in_flight_and_exits_0(redis_server, local_transport):
    """Default heartbeat/TTL (1 s / 3 s). One forward pass per 8-sample request
    (max batch 8) of 100 ms each, so requests queue at the victim."""
    client = connect(redis_server.url)
    extra = ("--max-batch-size", "8", "--max-queue-delay-ms", "0")
    procs = start_teachers(2, *teacher_args(redis_server.url, delay_ms=100, extra=extra))
    victim, survivor = procs
    n_batches = 48
    try:
        with registry_reader(redis_server.url, n_batches * 8, window=8, local_transport=local_transport) as reader, \
                grpc.insecure_channel(victim.address) as channel:
            pool = reader.source
            wait_until(lambda: len(pool.endpoints) == 2, timeout_s=10, what="the reader to find 2 teachers")
            wait_for_transport(pool, {victim.address, survivor.address}, local_transport)
            stub = pb_grpc.TeacherStub(channel)
            seen: list[int] = []
            direct = []
            for n, (x, out) in enumerate(reader):
                seen.extend(check(x, out))
                if n == 10:
                    # Six requests of our own, queued at the victim behind the reader's.
                    direct = [stub.Predict.future(_direct_request(10**6 + 8 * k), timeout=30) for k in range(6)]
                    # Once one is answered (>= 100 ms after they were sent together), the server holds them all.
                    wait_until(lambda: any(f.done() for f in direct), timeout_s=20, what="a direct answer")
                    lower_bound_expiry = expiry_ms(client, victim.address)
                    victim.send_signal(signal.SIGTERM)
                    wait_until(lambda: victim.address not in live_endpoints(client), timeout_s=10,
                               what="the SIGTERMed teacher to deregister", interval_s=0.005)
                    # Gone before its heartbeat would have expired: it deregistered, not timed out.
                    assert server_time_ms(client) < lower_bound_expiry
                time.sleep(STEP_S)
            answers = [codec.to_numpy(f.result().outputs[0].values)[:, 0].tolist() for f in direct]
            st = reader.stats()
        assert victim.wait(timeout=30) == 0
        victim_log = victim.stderr_text()
        assert live_endpoints(client) == {survivor.address}
    finally:
        close_all(procs)
    assert answers == [list(range(10**6 + 8 * k, 10**6 + 8 * k + 8)) for k in range(6)], "in-flight work dropped"
    assert seen == list(range(n_batches * 8)), "a batch was lost, duplicated or reordered"
    assert st.source.failed == 0 and st.source.completed == n_batches
    assert "deregistered" in victim_log


# ----------------------------------------------------------- --registry local


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_registry_local_runs_an_embedded_redis_and_leaves_no_orphan(sig):
    with TeacherProcess(LATENCY, "--registry", "local", "--service", SERVICE) as proc:
        match = wait_until(lambda: re.search(r"embedded Redis for the registry at (redis://\S+?);",
                                             proc.stderr_text()), timeout_s=10, what="the embedded Redis URL")
        url = match.group(1)
        (redis_pid,) = [c for c in children(proc.pid) if "redis" in Path(f"/proc/{c}/cmdline").read_bytes().decode(
            errors="replace")]
        client = connect(url)
        assert live_endpoints(client) == {proc.address}
        with registry_reader(url, 64) as reader:  # a student finds the teacher through it
            assert sum(len(check(x, out)) for x, out in reader) == 64
        client.close()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    wait_until(lambda: not pid_alive(redis_pid), timeout_s=10, what="the embedded redis-server to exit")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# -------------------------------------------------------- malformed records


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_malformed_records_are_skipped_and_an_unreachable_endpoint_costs_only_a_health_check(redis_server, caplog):
    caplog.set_level(logging.WARNING)
    client = connect(redis_server.url)
    (proc,) = start_teachers(1, *teacher_args(redis_server.url, *SHORT))
    dead = f"127.0.0.1:{_closed_port()}"
    unreachable = TeacherRecord(endpoint=dead, service=SERVICE, model_name="latency", teacher_id="byhand")
    wrong_schema = TeacherRecord(endpoint="127.0.0.1:9", service=SERVICE, model_name="latency",
                                 teacher_id="wrongschema")
    hand_made = {
        "garbage": b"\x00\xff this is not a record",
        "wrongschema": encode_record(wrong_schema).replace(b'"schema":1', b'"schema":99'),
        "notadict": b"[1, 2, 3]",
        "byhand": encode_record(unreachable),
    }
    now_ms = server_time_ms(client)
    for teacher_id, blob in hand_made.items():
        client.set(keys.record_key(SERVICE, teacher_id), blob, px=120_000)
        client.zadd(keys.members_key(SERVICE), {teacher_id: now_ms + 120_000})
    n_batches = 60
    try:
        with registry_reader(redis_server.url, n_batches * 8, window=6) as reader:
            pool = reader.source
            wait_until(lambda: set(pool.endpoints) == {proc.address, dead}, timeout_s=10,
                       what="the reader to see the good and the unreachable teacher")
            seen: list[int] = []
            for x, out in reader:
                seen.extend(check(x, out))
            st = reader.stats().source
    finally:
        proc.close()
    assert seen == list(range(n_batches * 8)), "a batch was lost, duplicated or reordered"
    assert st.failed == 0 and st.completed == n_batches
    dead_stats = st.teachers[dead]
    # It never passed its health check, so it was never given a batch: nothing to re-send.
    assert dead_stats.requests == 0 and dead_stats.successes == 0 and st.retries == 0
    assert "health check failed" in dead_stats.last_error and "UNAVAILABLE" in dead_stats.last_error
    skipped = [r.getMessage() for r in caplog.records if "skipping teacher" in r.getMessage()]
    for teacher_id in ("garbage", "wrongschema", "notadict"):
        assert any(repr(teacher_id) in m for m in skipped), f"no warning for the {teacher_id} record: {skipped}"


# ------------------------------------------------- "no teacher" explained


def test_unreachable_registry_is_named_in_the_no_teacher_error():
    with EmbeddedRedis(password="s3cret-pw") as server:
        url = server.url
    # The server is gone: a wrong port, or Redis not running. The reader keeps trying
    # and, after wait_timeout_s, says why no teacher could be found.
    with TeacherPool.from_registry(url, SERVICE, config=PoolConfig(wait_timeout_s=1.5)) as pool, \
            DistillReader(loader(16), pool) as reader:
        with pytest.raises(NoTeacherAvailableError) as info:
            list(reader)
    message = str(info.value)
    assert "registry" in message and "unreachable" in message and f"127.0.0.1:{server.port}" in message
    assert "s3cret-pw" not in message


def test_a_service_without_teachers_is_named_in_the_no_teacher_error(redis_server):
    with TeacherPool.from_registry(redis_server.url, "no-such-service", config=PoolConfig(wait_timeout_s=1.5)) \
            as pool, DistillReader(loader(16), pool) as reader:
        with pytest.raises(NoTeacherAvailableError) as info:
            list(reader)
    assert "lists no live teacher for service 'no-such-service'" in str(info.value)
