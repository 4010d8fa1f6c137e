"""Real ``python -m teacher_server serve`` processes: ready line, merging, CLI, SIGTERM drain."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.errors import TeacherError
from teacher_server.process import close_all
from tests.helpers.teacher_proc import REPO_ROOT, TeacherProcess, TeacherStartError

TIMEOUT_S = 30.0


def _request(ids, request_id: str = "") -> pb.PredictRequest:
    x = np.zeros((len(ids), 4), np.float32)
    x[:, 0] = ids
    req = pb.PredictRequest(request_id=request_id)
    codec.encode(x, req.inputs.add(), name="input")
    return req


def _ids(resp: pb.PredictResponse) -> list[float]:
    return codec.to_numpy(resp.outputs[0].values)[:, 0].tolist()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "teacher_server", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def teacher():
    with TeacherProcess("teacher_server.zoo:latency", "--model-kwargs", '{"delay_ms": 40}',
                        "--max-queue-delay-ms", "30", "--name", "lat", "--version", "7") as proc:
        yield proc


def test_concurrent_clients_get_merged_batches(teacher) -> None:
    n = 6
    barrier = threading.Barrier(n)

    def client(k: int) -> pb.PredictResponse:
        with grpc.insecure_channel(teacher.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)
            barrier.wait()
            return stub.Predict(_request([k, k + 0.5], f"c{k}"), timeout=TIMEOUT_S)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(client, range(n)))
    assert [_ids(r) for r in responses] == [[k, k + 0.5] for k in range(n)]
    assert all((r.model_name, r.model_version) == ("lat", "7") for r in responses)
    assert max(r.batch_size for r in responses) > 2


def test_stock_health_check_and_cli(teacher) -> None:
    with grpc.insecure_channel(teacher.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    health = _cli("health", teacher.address)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    describe = _cli("describe", teacher.address)
    assert describe.returncode == 0, describe.stderr
    info = json.loads(describe.stdout)
    assert (info["modelName"], info["modelVersion"], info["inputs"][0]["name"]) == ("lat", "7", "input")


def test_cli_health_fails_for_unreachable_teacher() -> None:
    out = _cli("health", "127.0.0.1:1", "--timeout-s", "2")
    assert out.returncode == 1 and out.stdout.startswith("UNREACHABLE")


@pytest.mark.parametrize("args, needle", [
    (["--model", "/nonexistent/model.pt"], "model file '/nonexistent/model.pt' does not exist"),
    (["--model", "teacher_server.zoo:mlp", "--max-batch-size", "0"], "max_batch_size must be an integer >= 1, got 0"),
], ids=["missing-file", "bad-config"])
def test_serve_user_errors_exit_2_with_one_line(args, needle: str) -> None:
    out = _cli("serve", "--port", "0", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("edistill teacher serve: error:") and needle in lines[-1]
    assert "Traceback" not in out.stderr


def test_sigterm_drains_in_flight_requests_and_exits_0() -> None:
    # Two samples per forward pass and 250 ms per pass: 8 one-sample requests
    # take four passes, so most are still queued or running at SIGTERM.
    with TeacherProcess("teacher_server.zoo:latency", "--model-kwargs", '{"delay_ms": 250}',
                        "--max-batch-size", "2", "--max-queue-delay-ms", "0") as proc:
        with grpc.insecure_channel(proc.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)
            futures = [stub.Predict.future(_request([i]), timeout=TIMEOUT_S) for i in range(8)]
            first = next(concurrent.futures.as_completed(  # the server has them all once one is answered
                [_as_cf(f) for f in futures]))
            first.result()
            proc.send_signal(signal.SIGTERM)
            answered = [_ids(f.result()) for f in futures]  # raises if any was dropped
            assert answered == [[i] for i in range(8)]
        assert proc.wait(timeout=TIMEOUT_S) == 0
        log = proc.stderr_text()
        assert "received SIGTERM" in log and "stopped" in log


def test_sigterm_health_says_not_serving_while_draining_and_a_watcher_does_not_hold_the_exit() -> None:
    # 500 ms per pass of two samples: 8 one-sample requests take 2 s, so they are still
    # being answered when health turns NOT_SERVING. grace_s 120: an open Health/Watch
    # stream is an in-flight RPC and used to hold the exit for all of it.
    health_req = health_pb2.HealthCheckRequest(service="edistill.v1.Teacher")
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with TeacherProcess("teacher_server.zoo:latency", "--model-kwargs", '{"delay_ms": 500}', "--max-batch-size", "2",
                        "--max-queue-delay-ms", "0", "--grace-s", "120") as proc:
        with grpc.insecure_channel(proc.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            watch = health.Watch(health_req, timeout=TIMEOUT_S)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            events: list[str] = []  # in the order they happened, from the threads that saw them
            futures = [pb_grpc.TeacherStub(ch).Predict.future(_request([i]), timeout=TIMEOUT_S) for i in range(8)]
            for f in futures:
                f.add_done_callback(lambda _: events.append("answer"))
            next(concurrent.futures.as_completed([_as_cf(f) for f in futures])).result()  # the server holds all 8
            proc.send_signal(signal.SIGTERM)
            statuses = [r.status for r in watch]  # to the end of the stream: it must end, with OK
            events.append("NOT_SERVING" if not_serving in statuses else "no NOT_SERVING")
            try:  # a new check while it drains is never SERVING: NOT_SERVING, or refused
                assert health.Check(health_req, timeout=TIMEOUT_S).status == not_serving
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            answered = [_ids(f.result()) for f in futures]
        assert statuses and set(statuses) == {not_serving}
        assert "answer" in events[events.index("NOT_SERVING"):], f"NOT_SERVING only after the drain: {events}"
        assert answered == [[i] for i in range(8)]
        assert proc.wait(timeout=60) == 0  # well within grace_s: the watcher did not hold the drain


def _as_cf(call: grpc.Future) -> concurrent.futures.Future:
    """Adapt a grpc future to concurrent.futures for as_completed."""
    cf: concurrent.futures.Future = concurrent.futures.Future()
    call.add_done_callback(lambda c: cf.set_result(c))
    return cf


# ---- the launcher (teacher_server/process.py)


def test_launcher_reads_the_ready_line(teacher) -> None:
    host, port = teacher.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert teacher.pid > 0 and teacher.returncode is None and teacher.running
    assert teacher.ready_at is not None and teacher.ready_at <= time.monotonic()


def test_launcher_reports_an_early_exit_in_one_line_with_the_log_tail(tmp_path) -> None:
    log = tmp_path / "teacher.log"
    proc = TeacherProcess("/nonexistent/model.pt", log_path=log)
    with pytest.raises(TeacherStartError) as info:
        with proc:
            pass
    err = info.value
    assert isinstance(err, TeacherError) and isinstance(err, RuntimeError)
    assert err.returncode == 2 == proc.returncode and err.log_path == str(log)
    assert "\n" not in err.summary and "exited with code 2 before it was ready" in err.summary
    assert "does not exist" in err.summary and f"full log: {log}" in err.summary
    assert "edistill teacher serve: error:" in err.log_tail and err.log_tail in str(err)
    assert "does not exist" in log.read_text() and "does not exist" in proc.stderr_text()  # kept after close


def test_launcher_kills_a_teacher_that_misses_its_deadline() -> None:
    proc = TeacherProcess("teacher_server.zoo:latency", ready_timeout_s=0.01)
    try:
        with pytest.raises(TeacherStartError, match="did not print its ready line within 0.01 s") as info:
            proc.start()
        assert info.value.returncode is None and proc.returncode is not None  # killed
    finally:
        proc.close()


def test_close_all_stops_teachers_in_parallel_with_a_clean_drain() -> None:
    procs = [TeacherProcess("teacher_server.zoo:latency").launch() for _ in range(2)]
    try:
        for p in procs:
            p.wait_ready()
    finally:
        close_all(procs)
    assert [p.returncode for p in procs] == [0, 0]  # SIGTERM once each: drained and exited 0
