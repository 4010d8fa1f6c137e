"""Registration, heartbeats, expiry and watching against a real redis-server."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from registry import (
    RegistryAuthError,
    RegistryUnavailableError,
    TeacherRecord,
    TeacherRegistration,
    TeacherWatcher,
    connect,
    fetch_service,
    list_services,
)
from registry import keys
from registry.connection import server_time_ms
from registry.record import MAX_RECORD_BYTES, encode_record
from tests.helpers.redis_proc import PythonChild, redis_server, redis_with_password, wait_until  # noqa: F401

SERVICE = "imagenet-r101"
# Short but realistic ratios (ttl = 3 heartbeats) keep the suite fast.
HEARTBEAT_S = 0.2
TTL_S = 0.6


def make_record(port: int = 50051, **changes) -> TeacherRecord:
    return TeacherRecord(endpoint=f"127.0.0.1:{port}", service=SERVICE, model_name="resnet101",
                         model_version="v1", max_batch_size=32, device="cpu", **changes)


def register(url: str, port: int = 50051, **kwargs) -> TeacherRegistration:
    kwargs.setdefault("heartbeat_s", HEARTBEAT_S)
    kwargs.setdefault("ttl_s", TTL_S)
    return TeacherRegistration(url, SERVICE, make_record(port), **kwargs).start()


class Counter:
    """Counts calls of a wrapped function (thread-safe)."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def wrap(self, fn):
        def counted(*args, **kwargs):
            with self._lock:
                self._n += 1
            return fn(*args, **kwargs)
        return counted

    def count(self) -> int:
        with self._lock:
            return self._n


class Recorder:
    """on_change callback that keeps every snapshot it was given."""

    def __init__(self) -> None:
        self.calls: list[dict[str, TeacherRecord]] = []
        self._lock = threading.Lock()

    def __call__(self, snapshot: dict[str, TeacherRecord]) -> None:
        with self._lock:
            self.calls.append(snapshot)

    def latest(self) -> dict[str, TeacherRecord] | None:
        with self._lock:
            return self.calls[-1] if self.calls else None

    def endpoints(self) -> set[str]:
        return set(self.latest() or {})


def test_register_discover_and_deregister(redis_server):
    client = connect(redis_server.url)
    reg = register(redis_server.url)
    view = fetch_service(client, SERVICE)
    assert list(view.teachers) == ["127.0.0.1:50051"]
    record = view.teachers["127.0.0.1:50051"]
    assert (record.model_name, record.model_version, record.max_batch_size) == ("resnet101", "v1", 32)
    assert record.started_at > 0 and abs(record.updated_at - view.server_time_s) < 5
    assert list_services(client) == [SERVICE]
    # The record key carries a TTL, so it vanishes without anyone cleaning up.
    assert 0 < client.pttl(keys.record_key(SERVICE, record.teacher_id)) <= TTL_S * 1000
    reg.close()
    assert fetch_service(client, SERVICE).teachers == {}
    assert client.zcard(keys.members_key(SERVICE)) == 0


def test_watcher_sees_a_join_and_a_leave_through_pubsub(redis_server):
    # poll_s is far beyond the deadlines below: only an event can deliver in time.
    recorder = Recorder()
    with TeacherWatcher(redis_server.url, SERVICE, on_change=recorder, poll_s=60) as watcher:
        wait_until(lambda: recorder.latest() == {}, what="the initial empty snapshot")
        reg = register(redis_server.url)
        wait_until(lambda: recorder.endpoints() == {"127.0.0.1:50051"}, timeout_s=HEARTBEAT_S * 5, what="join via pub/sub")
        assert set(watcher.snapshot()) == {"127.0.0.1:50051"}
        reg.close()
        wait_until(lambda: recorder.latest() == {}, timeout_s=HEARTBEAT_S * 5, what="leave via pub/sub")


def test_watcher_polls_when_its_user_may_not_use_pubsub(redis_server, caplog):
    admin = connect(redis_server.url)
    admin.execute_command("ACL", "SETUSER", "student", "on", ">studentpw", "~edistill:*", "+@read", "+time", "+ping", "-@pubsub")
    student_url = f"redis://student:studentpw@127.0.0.1:{redis_server.port}/0"
    recorder = Recorder()
    with TeacherWatcher(student_url, SERVICE, on_change=recorder, poll_s=0.3):
        reg = register(redis_server.url)
        wait_until(lambda: recorder.endpoints() == {"127.0.0.1:50051"}, timeout_s=3, what="join via polling")
        reg.close()
        wait_until(lambda: recorder.latest() == {}, timeout_s=3, what="leave via polling")
    assert any("polling every 0.3s instead" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert "studentpw" not in caplog.text


def test_load_updates_reach_watchers_with_the_next_heartbeat(redis_server):
    recorder = Recorder()
    with TeacherWatcher(redis_server.url, SERVICE, on_change=recorder, poll_s=HEARTBEAT_S), register(redis_server.url) as reg:
        wait_until(lambda: recorder.endpoints(), what="the teacher")
        reg.set_load(in_flight=3, queued=2, requests_total=41)
        wait_until(lambda: (recorder.latest() or {}).get("127.0.0.1:50051", make_record()).load == 5,
                   timeout_s=3, what="the new load")


def test_set_serving_false_removes_the_teacher_and_true_brings_it_back(redis_server):
    client = connect(redis_server.url)
    reg = register(redis_server.url)
    reg.set_serving(False)
    assert fetch_service(client, SERVICE).teachers == {}  # at once, not after a TTL
    # It stays away: no heartbeat re-adds it (wait past a TTL).
    deadline = time.monotonic() + TTL_S * 1.5
    while time.monotonic() < deadline:
        assert fetch_service(client, SERVICE).teachers == {}
        time.sleep(HEARTBEAT_S / 2)
    reg.set_serving(True)
    wait_until(lambda: fetch_service(client, SERVICE).teachers, timeout_s=2, what="re-registration")
    reg.close()


_CHILD = """
import os, sys, time
from registry import TeacherRecord, TeacherRegistration
record = TeacherRecord(endpoint="127.0.0.1:50077", service="imagenet-r101", model_name="m")
TeacherRegistration(os.environ["EDISTILL_REGISTRY"], "imagenet-r101", record, heartbeat_s=0.2, ttl_s=0.6).start()
print("registered", flush=True)
time.sleep(600)
"""


def test_a_sigkilled_teacher_disappears_within_one_ttl(redis_server):
    client = connect(redis_server.url)
    recorder = Recorder()
    with TeacherWatcher(redis_server.url, SERVICE, on_change=recorder, poll_s=0.1):
        child = PythonChild(_CHILD, env={"EDISTILL_REGISTRY": redis_server.url})
        try:
            assert child.read_line() == "registered"
            wait_until(lambda: "127.0.0.1:50077" in recorder.endpoints(), what="the child teacher")
            # Let it outlive several TTLs first: heartbeats really keep it alive.
            time.sleep(TTL_S * 2)
            assert "127.0.0.1:50077" in fetch_service(client, SERVICE).teachers
            teacher_id = fetch_service(client, SERVICE).teachers["127.0.0.1:50077"].teacher_id
        finally:
            child.kill()
        # Its last heartbeat set this expiry (Redis server ms); nobody deregisters a SIGKILLed teacher.
        expiry_ms = client.zscore(keys.members_key(SERVICE), teacher_id)
        wait_until(lambda: "127.0.0.1:50077" not in recorder.endpoints(), timeout_s=TTL_S + 10,
                   what="the dead teacher to vanish")
        # It vanished because its entry expired (the TTL alone), checked on the server's clock:
        # no wall-clock bound for a loaded CI box to break.
        assert expiry_ms is not None and server_time_ms(client) >= expiry_ms
    assert fetch_service(client, SERVICE).teachers == {}
    assert client.zcard(keys.members_key(SERVICE)) == 0  # pruned by the readers


def test_redis_restart_teachers_reregister_and_watchers_keep_their_set(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="registry")
    recorder = Recorder()
    regs = [register(redis_server.url, port) for port in (50051, 50052)]
    with TeacherWatcher(redis_server.url, SERVICE, on_change=recorder, poll_s=HEARTBEAT_S) as watcher:
        wait_until(lambda: len(recorder.endpoints()) == 2, what="both teachers")
        calls_before = len(recorder.calls)
        redis_server.stop()
        # Several heartbeats and polls fail while Redis is down.
        wait_until(lambda: all(not reg.registered for reg in regs) and watcher.last_error, timeout_s=5, what="the outage to be noticed")
        time.sleep(1.0)  # a few seconds of outage, shortened
        assert set(watcher.snapshot()) == {"127.0.0.1:50051", "127.0.0.1:50052"}
        redis_server.start()  # same port, empty data
        wait_until(lambda: all(reg.registered for reg in regs), timeout_s=5, what="re-registration by themselves")
        client = connect(redis_server.url)
        wait_until(lambda: len(fetch_service(client, SERVICE).teachers) == 2, what="both teachers in the new Redis")
        wait_until(lambda: watcher.last_error is None, what="the watcher to recover")
        # The watcher never reported an empty or partial set through the outage.
        assert all(len(snapshot) == 2 for snapshot in recorder.calls[calls_before:])
        for reg in regs:
            reg.close()
        wait_until(lambda: recorder.latest() == {}, what="the leave events after recovery")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # One warning per component per outage, not one per heartbeat or poll.
    assert len([r for r in warnings if "heartbeating" in r.getMessage()]) == 2
    assert len([r for r in warnings if "reading teachers" in r.getMessage()]) == 1
    assert any("registered again" in r.getMessage() for r in caplog.records)


def test_malformed_records_are_skipped_with_a_warning(redis_server, caplog, monkeypatch):
    import registry.watcher as watcher_module

    reads = Counter()
    monkeypatch.setattr(watcher_module, "fetch_service", reads.wrap(watcher_module.fetch_service))
    client = connect(redis_server.url)
    now_ms = int(client.time()[0]) * 1000
    good = register(redis_server.url)
    wrong_schema = make_record(51000, teacher_id="wrongschema")
    bad = {
        "garbage": b"\x00\xff not json at all",
        "wrongschema": encode_record(wrong_schema).replace(b'"schema":1', b'"schema":99'),
        "oversized": b'{"schema":1,"pad":"' + b"x" * MAX_RECORD_BYTES + b'"}',
        "impostor": encode_record(make_record(51001, teacher_id="someoneelse")),
    }
    for teacher_id, blob in bad.items():
        client.set(keys.record_key(SERVICE, teacher_id), blob, px=60_000)
        client.zadd(keys.members_key(SERVICE), {teacher_id: now_ms + 60_000})
    view = fetch_service(client, SERVICE)
    assert list(view.teachers) == ["127.0.0.1:50051"]
    assert set(view.bad) == set(bad)
    recorder = Recorder()
    with TeacherWatcher(redis_server.url, SERVICE, on_change=recorder, poll_s=0.05):
        wait_until(lambda: recorder.latest() is not None, what="a snapshot")
        seen = reads.count()
        # Five more real reads of the service: still one warning per bad record.
        wait_until(lambda: reads.count() >= seen + 5, what="five more polls")
        assert set(recorder.endpoints()) == {"127.0.0.1:50051"}
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipping teacher" in r.getMessage()]
    assert len(skipped) == len(bad)
    assert any("schema version 99" in m for m in skipped)
    assert any("over the 4096-byte limit" in m for m in skipped)
    assert any("not valid UTF-8 JSON" in m for m in skipped)
    assert any("stored as 'impostor'" in m for m in skipped)
    good.close()


def test_password_protected_redis_works_and_the_password_never_leaks(redis_with_password, caplog):
    caplog.set_level(logging.DEBUG)
    url = redis_with_password.url
    password = "Pa55-w0rd-xyz"
    assert password in url
    recorder = Recorder()
    with TeacherWatcher(url, SERVICE, on_change=recorder, poll_s=HEARTBEAT_S) as watcher, register(url) as reg:
        wait_until(lambda: recorder.endpoints() == {"127.0.0.1:50051"}, what="the teacher")
        redis_with_password.kill()  # errors get logged now: they must be redacted
        wait_until(lambda: reg.last_error is not None and watcher.last_error is not None,
                   what="both the registration and the watcher to see the outage")
        redis_with_password.start()
        wait_until(lambda: recorder.endpoints() == {"127.0.0.1:50051"} and "reachable again" in caplog.text, what="recovery")
    wrong = url.replace(password, "not-the-password-123")
    with pytest.raises(RegistryAuthError) as info:
        register(wrong, startup_timeout_s=0)
    assert "not-the-password-123" not in str(info.value) and ":***@" in str(info.value)
    assert password not in caplog.text and "not-the-password-123" not in caplog.text
    assert "redis://:***@127.0.0.1" in caplog.text


def test_start_fails_clearly_when_redis_is_unreachable(redis_server):
    url = redis_server.url.replace("127.0.0.1", "user:hidden@127.0.0.1", 1)
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as info:
        register(url, startup_timeout_s=0.5)
    assert time.monotonic() - started >= 0.5  # it retried for the whole startup timeout
    message = str(info.value)
    assert "registering" in message and f"127.0.0.1:{redis_server.port}" in message and "hidden" not in message


def test_a_teacher_restarted_on_the_same_endpoint_replaces_the_old_entry(redis_server):
    client = connect(redis_server.url)
    old = register(redis_server.url)
    # The later start wins by started_at (server clock, ms): make it strictly later.
    wait_until(lambda: client.time()[0] * 1000 + client.time()[1] // 1000 > old.record.started_at * 1000 + 1,
               what="the server clock to move on")
    new = register(redis_server.url)  # same endpoint, new teacher_id (a restarted process)
    view = fetch_service(client, SERVICE)
    assert view.teachers["127.0.0.1:50051"].teacher_id == new.record.teacher_id  # the later start wins
    old.close()  # the old process deregistering must not remove its successor
    assert fetch_service(client, SERVICE).teachers["127.0.0.1:50051"].teacher_id == new.record.teacher_id
    new.close()


def test_watcher_start_rejects_wrong_credentials(redis_with_password, caplog):
    wrong = redis_with_password.url.replace("Pa55-w0rd-xyz", "wrong-pw-456")
    with pytest.raises(RegistryAuthError) as info:
        TeacherWatcher(wrong, SERVICE).start()
    assert "wrong-pw-456" not in str(info.value) and "wrong-pw-456" not in caplog.text
    assert "polling" not in caplog.text  # bad credentials are not "no pub/sub permission"
    assert "retrying" not in caplog.text  # start() raises: nothing is retried


def _plant(client, teacher_id: str, blob: bytes) -> None:
    """Write a raw record and its member entry, as anyone with write access to Redis could."""
    now_ms = int(client.time()[0]) * 1000
    client.set(keys.record_key(SERVICE, teacher_id), blob, px=60_000)
    client.zadd(keys.members_key(SERVICE), {teacher_id: now_ms + 60_000})


def test_a_deeply_nested_record_is_skipped_and_discovery_goes_on(redis_server, caplog):
    client = connect(redis_server.url)
    good = register(redis_server.url)
    _plant(client, "deep", b"[" * MAX_RECORD_BYTES)  # RecursionError in json.loads
    assert set(fetch_service(client, SERVICE).bad) == {"deep"}
    recorder = Recorder()
    with TeacherWatcher(redis_server.url, SERVICE, on_change=recorder, poll_s=0.05):  # start() must not raise
        wait_until(lambda: recorder.endpoints() == {"127.0.0.1:50051"}, what="the good teacher")
        later = register(redis_server.url, 50052)  # discovery is not frozen
        wait_until(lambda: recorder.endpoints() == {"127.0.0.1:50051", "127.0.0.1:50052"}, what="a later join")
        later.close()
    assert any("skipping teacher 'deep'" in r.getMessage() and "nested too deeply" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    good.close()


def test_an_unexpected_read_error_keeps_the_last_teachers_and_is_logged_once(redis_server, caplog, monkeypatch):
    import registry.watcher as watcher_module

    real_fetch = watcher_module.fetch_service
    state = {"broken": True, "failed_calls": 0}
    lock = threading.Lock()

    def flaky_fetch(client, service, **kwargs):
        with lock:
            if state["broken"]:
                state["failed_calls"] += 1
                raise TypeError("a bug below fetch_service")
        return real_fetch(client, service, **kwargs)

    def failed_calls() -> int:
        with lock:
            return state["failed_calls"]

    monkeypatch.setattr(watcher_module, "fetch_service", flaky_fetch)
    good = register(redis_server.url)
    recorder = Recorder()
    watcher = TeacherWatcher(redis_server.url, SERVICE, on_change=recorder, poll_s=0.05)
    watcher.start()  # a broken first read does not make start() raise
    try:
        wait_until(lambda: failed_calls() >= 3, what="several failing reads")
        with lock:
            state["broken"] = False
        wait_until(lambda: recorder.endpoints() == {"127.0.0.1:50051"}, what="recovery once reads work")
        with lock:
            state["broken"] = True
            seen = state["failed_calls"]
        later = register(redis_server.url, 50052)
        wait_until(lambda: failed_calls() >= seen + 5, what="five more failing reads")
        assert watcher.snapshot().keys() == {"127.0.0.1:50051"}  # the last known set is kept
        with lock:
            state["broken"] = False
        wait_until(lambda: recorder.endpoints() == {"127.0.0.1:50051", "127.0.0.1:50052"}, what="the later join")
        later.close()
    finally:
        watcher.close()
        good.close()
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING and "failed unexpectedly" in r.getMessage()]
    assert len(logged) == 2  # once per failing streak, not once per poll
    assert all(r.exc_info and r.exc_info[0] is TypeError for r in logged)


def test_start_warns_once_while_redis_is_unreachable_then_registers(redis_with_password, caplog):
    url = redis_with_password.url
    redis_with_password.stop()
    outcome: dict[str, object] = {}

    def start() -> None:
        try:
            outcome["reg"] = register(url, startup_timeout_s=60)
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    # Not silent for the whole startup timeout: one warning at the first failure.
    wait_until(lambda: "cannot reach Redis" in caplog.text, what="the startup warning")
    redis_with_password.start()
    thread.join(30)
    assert not thread.is_alive() and "error" not in outcome, outcome
    reg = outcome["reg"]
    try:
        assert reg.registered
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        startup = [m for m in warnings if "cannot reach Redis" in m]
        assert len(startup) == 1
        assert f"cannot reach Redis at redis://:***@127.0.0.1:{redis_with_password.port}/0; retrying for 60 s" in startup[0]
        assert "Pa55" not in caplog.text
    finally:
        reg.close()
