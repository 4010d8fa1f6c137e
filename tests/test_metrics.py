"""Teacher Prometheus metrics: scraped over HTTP from real servers and parsed with prometheus_client."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig, zoo
from teacher_server.errors import ConfigError
from tests.helpers.teacher_proc import REPO_ROOT, TeacherProcess

TIMEOUT_S = 30.0
_METRICS_LINE = re.compile(r"metrics on http://(\S+)/metrics")


def ids_request(ids, *, features: int = 4) -> pb.PredictRequest:
    x = np.zeros((len(ids), features), np.float32)
    x[:, 0] = ids
    req = pb.PredictRequest(request_id="r")
    codec.encode(x, req.inputs.add(), name="input")
    return req


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label items: value}}`` from a /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def metrics_url_from_log(proc: TeacherProcess) -> str:
    """The metrics URL the teacher logged (it is logged before the ready line)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        m = _METRICS_LINE.search(proc.stderr_text())
        if m:
            return f"http://{m.group(1)}/metrics"
        time.sleep(0.05)
    raise AssertionError(f"no metrics URL in the teacher's log:\n{proc.stderr_text()}")


def test_scraped_counters_match_the_requests_sent_to_a_teacher_process() -> None:
    sizes = [1, 3, 4, 2, 5]
    with TeacherProcess("teacher_server.zoo:latency", "--metrics-port", "0", "--name", "lat",
                        "--version", "7") as teacher, grpc.insecure_channel(teacher.address) as channel:
        url = metrics_url_from_log(teacher)
        stub = pb_grpc.TeacherStub(channel)
        stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)
        for i, n in enumerate(sizes):
            resp = stub.Predict(ids_request(list(range(n))), timeout=TIMEOUT_S)
            assert resp.batch_size >= n
        bad = ids_request([1, 2], features=5)  # the model takes 4 features per sample
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(bad, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        m = scrape(url)

    assert value(m, "edistill_teacher_requests_total", method="Predict", code="OK") == len(sizes)
    assert value(m, "edistill_teacher_requests_total", method="Predict", code="INVALID_ARGUMENT") == 1
    assert value(m, "edistill_teacher_requests_total", method="Describe", code="OK") == 1
    assert value(m, "edistill_teacher_samples_total") == sum(sizes)  # the bad request never ran
    # Sequential requests: one forward pass each, so the histogram holds exactly the sizes sent.
    assert value(m, "edistill_teacher_batch_size_count") == len(sizes)
    assert value(m, "edistill_teacher_batch_size_sum") == sum(sizes)
    assert value(m, "edistill_teacher_batch_size_bucket", le="4.0") == 4  # 1, 3, 4, 2
    assert value(m, "edistill_teacher_queue_seconds_count") == len(sizes)
    assert value(m, "edistill_teacher_compute_seconds_count") == len(sizes)
    assert value(m, "edistill_teacher_compute_seconds_sum") >= len(sizes) * 0.020  # the 20 ms sleep each
    assert value(m, "edistill_teacher_batches_total", outcome="ok") == len(sizes)
    assert value(m, "edistill_teacher_in_flight_requests") == 0
    assert value(m, "edistill_teacher_queue_depth") == 0
    assert value(m, "edistill_teacher_model_load_seconds") > 0
    info_series = m["edistill_teacher_build_info"]
    assert len(info_series) == 1
    labels, one = next(iter(info_series.items()))
    labels = dict(labels)
    assert one == 1 and labels["model"] == "lat" and labels["model_version"] == "7"
    assert labels["device"] == "cpu" and labels["precision"] == "fp32" and labels["version"]


def test_queue_full_is_counted_as_resource_exhausted_per_server() -> None:
    """Two in-process servers with metrics: private registries, separate counts."""
    busy_cfg = TeacherConfig(model_name="busy", max_batch_size=1, max_queue_size=1, max_queue_delay_ms=0,
                             metrics_port=0)
    idle_cfg = TeacherConfig(model_name="idle", metrics_port=0)
    with BackgroundTeacher(busy_cfg, LoadedModel.from_module(zoo.latency(delay_ms=200))) as busy, \
            BackgroundTeacher(idle_cfg, LoadedModel.from_module(zoo.latency(delay_ms=1))) as idle, \
            grpc.insecure_channel(busy.address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)  # connect before the burst
        futures = [stub.Predict.future(ids_request([i]), timeout=TIMEOUT_S) for i in range(6)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
        busy_m = scrape(f"http://127.0.0.1:{busy.server.metrics.port}/metrics")
        idle_m = scrape(f"http://127.0.0.1:{idle.server.metrics.port}/metrics")

    for code in ("OK", "RESOURCE_EXHAUSTED"):
        assert value(busy_m, "edistill_teacher_requests_total", method="Predict", code=code) == codes.count(code)
    assert value(busy_m, "edistill_teacher_samples_total") == codes.count("OK")
    assert value(idle_m, "edistill_teacher_requests_total", method="Predict", code="OK") == 0
    assert value(idle_m, "edistill_teacher_requests_total", method="Describe", code="OK") == 0
    assert dict(next(iter(idle_m["edistill_teacher_build_info"])))["model"] == "idle"


def test_metrics_are_off_unless_asked_for() -> None:
    with BackgroundTeacher(TeacherConfig(), LoadedModel.from_module(zoo.latency(delay_ms=1))) as teacher:
        assert teacher.server.metrics is None


@pytest.mark.parametrize("bad", [-1, 70000, "9100", True])
def test_config_rejects_bad_metrics_port(bad) -> None:
    with pytest.raises(ConfigError, match="metrics_port"):
        TeacherConfig(metrics_port=bad)


def test_cli_rejects_a_bad_metrics_port_before_loading_the_model() -> None:
    proc = subprocess.run([sys.executable, "-m", "teacher_server", "serve", "--model", "teacher_server.zoo:latency",
                           "--metrics-port", "nine"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 2
    assert "--metrics-port" in proc.stderr and "'none'" in proc.stderr


def test_calls_rejected_by_authentication_are_counted_too() -> None:
    """The metrics interceptor sits in front of the security ones: rejected calls show up by code."""
    token = "metrics-test-token-0123456789abcdef"
    cfg = TeacherConfig(metrics_port=0, auth_tokens=(token,))
    with BackgroundTeacher(cfg, LoadedModel.from_module(zoo.latency(delay_ms=1))) as teacher, \
            grpc.insecure_channel(teacher.address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(ids_request([1]), timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.Predict(ids_request([1, 2]), timeout=TIMEOUT_S, metadata=(("authorization", f"Bearer {token}"),))
        m = scrape(f"http://127.0.0.1:{teacher.server.metrics.port}/metrics")
    assert value(m, "edistill_teacher_requests_total", method="Predict", code="UNAUTHENTICATED") == 1
    assert value(m, "edistill_teacher_requests_total", method="Predict", code="OK") == 1
    assert value(m, "edistill_teacher_samples_total") == 2
