"""Limits a hostile or broken client runs into: flood, per-connection cap,
tensor size, expired deadlines, and untrusted model files."""

from __future__ import annotations

import collections
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import zoo
from teacher_server.config import TeacherConfig
from teacher_server.errors import ModelLoadError
from teacher_server.inprocess import BackgroundTeacher
from teacher_server.model import LoadedModel, load_model
from tests.helpers.teacher_proc import TeacherProcess

FEATURES = 16  # zoo.latency's default input features


def _request(n: int = 1, features: int = FEATURES) -> pb.PredictRequest:
    req = pb.PredictRequest(request_id="x")
    codec.encode(np.ones((n, features), np.float32), req.inputs.add(name="input"))
    return req


def _own_connection(address: str) -> grpc.Channel:
    """A channel with its own TCP connection (channels in one process share one by default)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _latency_features() -> int:
    return zoo.latency().edistill_inputs[0].shape[0]


def test_flood_of_64_clients_overflow_is_refused_and_a_polite_client_is_served():
    """64 clients send as fast as they can (one connection each) for a bounded time."""
    n_feat = _latency_features()
    req = _request(1, n_feat)
    stop = threading.Event()
    codes: collections.Counter = collections.Counter()
    lock = threading.Lock()
    polite_ok = []

    with TeacherProcess("teacher_server.zoo:latency", "--model-kwargs", '{"delay_ms": 10}',
                        "--max-batch-size", "4", "--max-queue-size", "8", "--max-queue-delay-ms", "1") as t:

        def flooder() -> None:
            with _own_connection(t.address) as ch:
                stub = pb_grpc.TeacherStub(ch)
                while not stop.is_set():
                    try:
                        stub.Predict(req, timeout=10)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    with lock:
                        codes[code] += 1

        def polite() -> None:
            # One request at a time; on RESOURCE_EXHAUSTED back off briefly and retry.
            with _own_connection(t.address) as ch:
                stub = pb_grpc.TeacherStub(ch)
                while not stop.is_set():
                    try:
                        resp = stub.Predict(req, timeout=10)
                        polite_ok.append(resp.outputs[0].name)
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    stop.wait(0.02)

        threads = [threading.Thread(target=flooder, daemon=True) for _ in range(64)]
        threads.append(threading.Thread(target=polite, daemon=True))
        for th in threads:
            th.start()
        # Bounded by work done, not by a fixed sleep: run until the flood has
        # overflowed the queue many times and the polite client got answers.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                overflowed = codes["RESOURCE_EXHAUSTED"] >= 200
            if overflowed and len(polite_ok) >= 5:
                break
            time.sleep(0.1)
        stop.set()
        for th in threads:
            th.join(timeout=30)
        assert t.returncode is None, "the teacher died under the flood"
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, dict(codes)
        assert codes["RESOURCE_EXHAUSTED"] >= 200 and codes["OK"] > 0, dict(codes)
        assert len(polite_ok) >= 5, f"polite client got {len(polite_ok)} answers; flood codes {dict(codes)}"
        # Still serving after the flood.
        with grpc.insecure_channel(t.address) as ch:
            assert pb_grpc.TeacherStub(ch).Predict(req, timeout=10).outputs


def test_one_connection_cannot_take_the_whole_queue():
    model = LoadedModel.from_module(zoo.latency(delay_ms=50))
    cfg = TeacherConfig(max_batch_size=1, max_queue_size=64, max_queued_per_peer=3, max_queue_delay_ms=0)
    req = _request(1, _latency_features())
    with BackgroundTeacher(cfg, model) as t, _own_connection(t.address) as greedy, \
            _own_connection(t.address) as other:
        futures = [pb_grpc.TeacherStub(greedy).Predict.future(req, timeout=30) for _ in range(12)]
        # Another connection is still served while the greedy one is capped.
        assert pb_grpc.TeacherStub(other).Predict(req, timeout=30).outputs
        outcomes = collections.Counter()
        for f in futures:
            try:
                f.result()
                outcomes["OK"] += 1
            except grpc.RpcError as exc:
                outcomes[exc.code().name] += 1
                assert "max_queued_per_peer" in exc.details()
        assert outcomes["RESOURCE_EXHAUSTED"] >= 1 and outcomes["OK"] >= 3, dict(outcomes)


def test_huge_declared_shape_is_refused_before_any_work():
    model = LoadedModel.from_module(zoo.mlp(in_features=8))
    with BackgroundTeacher(TeacherConfig(max_tensor_elements=1000), model) as t, \
            grpc.insecure_channel(t.address) as ch:
        stub = pb_grpc.TeacherStub(ch)
        big = pb.PredictRequest()
        big.inputs.add(name="input", dtype=pb.FLOAT32, shape=[1 << 40, 8], data=b"\0" * 32)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(big, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_tensor_elements" in info.value.details()
        assert stub.Predict(_request(2, 8), timeout=10).outputs


def test_request_whose_deadline_passes_in_the_queue_is_not_computed():
    model = LoadedModel.from_module(zoo.latency(delay_ms=300))
    req = _request(1, _latency_features())
    with BackgroundTeacher(TeacherConfig(max_batch_size=1, max_queue_delay_ms=0), model) as t, \
            grpc.insecure_channel(t.address) as ch:
        stub = pb_grpc.TeacherStub(ch)
        before = t.server.batcher.stats().requests
        slow = stub.Predict.future(req, timeout=30)  # occupies the forward pass
        deadline = time.monotonic() + 10
        while t.server.batcher.in_flight == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(req, timeout=0.1)  # waits behind it and expires
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert slow.result().outputs
        assert stub.Predict(req, timeout=30).outputs  # the queue moves on
        assert t.server.batcher.stats().requests - before == 2  # the expired one was skipped


def test_pickled_model_file_needs_trust(tmp_path):
    path = tmp_path / "full_model.pt"
    torch.save(zoo.mlp(in_features=8), path)
    with pytest.raises(ModelLoadError, match="--trust-model-file"):
        load_model(str(path))
    model = load_model(str(path), trust_model_file=True)
    assert model.output_names == ("logits",)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelLoadError) as info:
        load_model(str(corrupt), trust_model_file=True)
    assert "\n" not in str(info.value)


def test_untrusted_pickle_ends_with_one_line_from_the_cli(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "full_model.pt"
    torch.save(zoo.mlp(in_features=8), path)
    proc = subprocess.run([sys.executable, "-m", "teacher_server", "serve", "--model", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("edistill teacher serve: error:") and "--trust-model-file" in lines[-1]
    assert "Traceback" not in proc.stderr
