"""``edistill registry ls|watch`` against a live registry."""

from __future__ import annotations

import argparse
import io

import pytest

from registry import RegistryConfigError, RegistryUnavailableError, TeacherRecord, TeacherRegistration
from registry import connect, keys
from tests.helpers.redis_proc import redis_server, redis_with_password, wait_until  # noqa: F401


def parse(*argv: str) -> argparse.Namespace:
    # The umbrella parser, built now: it reads $EDISTILL_REGISTRY (teacher_server.envflags).
    from student_client.cli import build_parser

    return build_parser().parse_args(["registry", *argv])


def run(*argv: str) -> tuple[int, str]:
    args = parse(*argv)
    out = io.StringIO()
    return args.func(args, out=out), out.getvalue()


@pytest.fixture
def fleet(redis_with_password):
    url = redis_with_password.url
    specs = [("imagenet-r101", 50051, "resnet101", "cuda:0"), ("imagenet-r101", 50052, "resnet101", "cuda:1"),
             ("bert-base", 50061, "bert", "cpu")]
    regs = []
    for service, port, model, device in specs:
        record = TeacherRecord(endpoint=f"10.0.0.7:{port}", service=service, model_name=model,
                               model_version="2024-06", device=device, max_batch_size=8)
        regs.append(TeacherRegistration(url, service, record, heartbeat_s=0.2, ttl_s=0.6).start())
    yield url, regs
    for reg in regs:
        reg.close()


def test_ls_prints_a_table_of_all_services(fleet):
    url, _ = fleet
    rc, out = run("ls", "--registry", url)
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["SERVICE", "ENDPOINT", "MODEL", "VERSION", "DEVICE", "LOAD", "REQ/S", "AGE"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        ("bert-base", "10.0.0.7:50061", "bert", "2024-06", "cpu"),
        ("imagenet-r101", "10.0.0.7:50051", "resnet101", "2024-06", "cuda:0"),
        ("imagenet-r101", "10.0.0.7:50052", "resnet101", "2024-06", "cuda:1"),
    ]
    assert rows[0][-1].endswith("s")  # age like "0s"


def test_ls_filters_by_service_and_reads_the_url_from_the_environment(fleet, monkeypatch):
    url, regs = fleet
    monkeypatch.setenv("EDISTILL_REGISTRY", url)
    rc, out = run("ls", "--service", "imagenet-r101")
    assert rc == 0 and "bert" not in out
    # The load column of the teacher that reported 4 in flight + 3 queued,
    # which reaches Redis with its next heartbeat.
    regs[1].set_load(in_flight=4, queued=3)
    wait_until(lambda: "7 (4+3)" in run("ls", "--service", "imagenet-r101")[1], what="the load in the table")


def test_ls_and_watch_take_only_the_url_from_the_environment(fleet, monkeypatch):
    # In a teacher's container EDISTILL_SERVICE names that teacher's service;
    # `registry ls` run there still lists every service.
    url, _ = fleet
    monkeypatch.setenv("EDISTILL_REGISTRY", url)
    monkeypatch.setenv("EDISTILL_SERVICE", "imagenet-r101")
    monkeypatch.setenv("EDISTILL_INTERVAL_S", "9")
    monkeypatch.setenv("EDISTILL_COUNT", "5")
    rc, out = run("ls")
    assert rc == 0 and "bert-base" in out and "imagenet-r101" in out
    args = parse("watch")
    assert (args.registry, args.service, args.interval_s, args.count) == (url, None, 1.0, 0)


def test_ls_says_when_there_are_no_teachers(redis_server):
    rc, out = run("ls", "--registry", redis_server.url, "--service", "nobody")
    assert rc == 1 and "no live teachers in service 'nobody'" in out and "no service has live teachers" in out
    rc, out = run("ls", "--registry", redis_server.url)
    assert rc == 0 and "no live teachers in any service" in out


def test_ls_of_a_missing_service_names_the_services_that_exist_and_exits_1(fleet):
    url, _ = fleet
    rc, out = run("ls", "--registry", url, "--service", "imagenet-r10")  # a typo
    assert rc == 1
    assert "no live teachers in service 'imagenet-r10'" in out
    assert "services with live teachers: bert-base, imagenet-r101" in out


def test_watch_exits_1_when_it_never_reached_redis(redis_server, capsys):
    url = redis_server.url
    redis_server.stop()
    rc, out = run("watch", "--registry", url, "--interval-s", "0.05", "--count", "2")
    assert rc == 1
    assert "no teachers known yet" in out and "showing the last known teachers" not in out
    assert "never reached Redis" in capsys.readouterr().err


def test_watch_that_saw_redis_once_exits_0_and_keeps_the_last_teachers(fleet):
    url, _ = fleet
    args = parse("watch", "--registry", url, "--interval-s", "0.05", "--count", "1")
    out = io.StringIO()
    assert args.func(args, out=out) == 0 and "3 live teacher(s)" in out.getvalue()


def test_ls_with_local_or_no_registry_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("EDISTILL_REGISTRY", raising=False)
    with pytest.raises(RegistryConfigError, match="embedded Redis inside a teacher or the demo"):
        run("ls", "--registry", "local")
    with pytest.raises(RegistryConfigError, match="no registry given: pass --registry"):
        run("ls")


def test_ls_on_an_unreachable_registry_names_it_without_the_password(redis_with_password):
    url = redis_with_password.url
    redis_with_password.stop()
    with pytest.raises(RegistryUnavailableError) as info:
        run("ls", "--registry", url)
    assert f"redis://:***@127.0.0.1:{redis_with_password.port}/0" in str(info.value)
    assert "Pa55" not in str(info.value)


def test_watch_redraws_the_table_and_shows_request_rates(fleet):
    url, regs = fleet
    regs[0].set_load(in_flight=0, requests_total=100)
    rc, out = run("watch", "--registry", url, "--interval-s", "0.5", "--count", "3")
    assert rc == 0
    frames = [frame for frame in out.split("edistill registry ")[1:]]
    assert len(frames) == 3
    assert all("3 live teacher(s)" in frame for frame in frames)
    assert "Pa55" not in out and "redis://:***@" in out
    # By the later frames every teacher has a req/s value instead of "-".
    last_rows = [line.split() for line in frames[-1].splitlines()[2:] if line.strip()]
    assert all(row[-2] != "-" for row in last_rows)


def test_ls_skips_a_deeply_nested_record_with_a_warning(fleet, capsys):
    url, _ = fleet
    # Anyone who can write to Redis can plant this: it must not crash ls (RecursionError).
    client = connect(url)
    now_ms = int(client.time()[0]) * 1000
    client.set(keys.record_key("imagenet-r101", "deep"), b"[" * 4096, px=60_000)
    client.zadd(keys.members_key("imagenet-r101"), {"deep": now_ms + 60_000})
    rc, out = run("ls", "--registry", url)
    assert rc == 0
    assert len(out.strip().splitlines()) == 4  # header + the three good teachers
    err = capsys.readouterr().err
    assert "skipped malformed record 'deep' in 'imagenet-r101'" in err and "nested too deeply" in err
