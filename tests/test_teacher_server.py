"""In-process real gRPC teacher servers: batching, validation, limits, health, reflection."""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig, zoo
from tests.test_teacher_model import TwoHeads

TIMEOUT_S = 30.0


def ids_request(ids, *, request_id: str = "r", outputs=(), features: int = 4) -> pb.PredictRequest:
    """A request for the latency teacher: column 0 of each sample is its id."""
    x = np.zeros((len(ids), features), np.float32)
    x[:, 0] = ids
    req = pb.PredictRequest(request_id=request_id, outputs=list(outputs))
    codec.encode(x, req.inputs.add(), name="input")
    return req


def ids_of(resp: pb.PredictResponse) -> list[float]:
    return codec.to_numpy(resp.outputs[0].values)[:, 0].tolist()


@pytest.fixture(scope="module")
def latency_teacher():
    """Latency teacher (40 ms per forward) that waits up to 30 ms to fill a batch of <= 16."""
    cfg = TeacherConfig(model_name="latency", max_batch_size=16, max_queue_delay_ms=30)
    with BackgroundTeacher(cfg, LoadedModel.from_module(zoo.latency(delay_ms=40))) as teacher:
        yield teacher


@pytest.fixture(scope="module")
def stub(latency_teacher):
    with grpc.insecure_channel(latency_teacher.address) as channel:
        yield pb_grpc.TeacherStub(channel)


def test_concurrent_clients_are_merged_and_answers_match_inputs(latency_teacher) -> None:
    n_clients = 8
    barrier = threading.Barrier(n_clients)
    before = latency_teacher.server.batcher.stats()

    def client(k: int) -> pb.PredictResponse:
        # A channel per client: separate connections, as separate students would have.
        with grpc.insecure_channel(latency_teacher.address) as ch:
            s = pb_grpc.TeacherStub(ch)
            s.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)  # connect before the race
            barrier.wait()
            return s.Predict(ids_request([100 * k, 100 * k + 1], request_id=f"c{k}"), timeout=TIMEOUT_S)

    with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
        responses = list(pool.map(client, range(n_clients)))
    for k, resp in enumerate(responses):
        assert resp.request_id == f"c{k}"
        assert ids_of(resp) == [100 * k, 100 * k + 1]  # the answer belongs to this request
        assert resp.model_name == "latency" and resp.teacher_id == latency_teacher.server.teacher_id
    assert max(r.batch_size for r in responses) > 2  # more than one request in a forward pass
    after = latency_teacher.server.batcher.stats()
    assert after.requests - before.requests == n_clients
    assert after.batches - before.batches < n_clients


def _set_output(req: pb.PredictRequest, **fields) -> pb.PredictRequest:
    req.outputs.add(**{"name": "logits", **fields})
    return req


def _bad_requests() -> dict[str, tuple[pb.PredictRequest, str]]:
    good = lambda: ids_request([1])  # noqa: E731
    wrong_dtype = pb.PredictRequest()
    codec.encode(np.zeros((1, 4), np.float16), wrong_dtype.inputs.add(), name="input")
    wrong_shape = pb.PredictRequest()
    codec.encode(np.zeros((1, 5), np.float32), wrong_shape.inputs.add(), name="input")
    truncated = good()
    truncated.inputs[0].data = truncated.inputs[0].data[:-1]
    unknown_input = good()
    unknown_input.inputs[0].name = "pixels"
    two_inputs = good()
    codec.encode(np.zeros((1, 4), np.float32), two_inputs.inputs.add(), name="extra")
    return {
        "wrong-dtype": (wrong_dtype, "dtype float16, expected float32"),
        "wrong-shape": (wrong_shape, "does not match [B, 4]"),
        "truncated-bytes": (truncated, "needs 16 bytes, got 15"),
        "no-inputs": (pb.PredictRequest(), "expected 1 input(s)"),
        "too-many-inputs": (two_inputs, "expected 1 input(s)"),
        "unknown-input": (unknown_input, "unknown input 'pixels'"),
        "over-max-batch": (ids_request(list(range(17))), "exceeds this teacher's max_batch_size 16"),
        "empty-batch": (ids_request([]), "batch is empty"),
        "unknown-output": (_set_output(good(), name="probs"), "unknown output 'probs'"),
        "top-k-too-large": (_set_output(good(), top_k=11), "top_k=11 exceeds its last dimension"),
        "negative-temperature": (_set_output(good(), transform=pb.PROBS, temperature=-1), "temperature"),
        "int-output-dtype": (_set_output(good(), dtype=pb.INT64), "dtype must be float32"),
        "bad-transform": (_set_output(good(), transform=7), "unknown transform 7"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_request_is_rejected_while_good_one_in_same_window_succeeds(stub, case: str) -> None:
    request, needle = _bad_requests()[case]
    good = stub.Predict.future(ids_request([42], request_id="good"), timeout=TIMEOUT_S)  # waits 30 ms to batch
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
    assert ids_of(good.result()) == [42]
    assert ids_of(stub.Predict(ids_request([7]), timeout=TIMEOUT_S)) == [7]  # still serving


def test_mismatched_batch_dims_between_inputs() -> None:
    model = LoadedModel.from_module(TwoHeads(), [("x", "float32", (8,)), ("mask", "float32", ())])
    with BackgroundTeacher(TeacherConfig(), model) as teacher, grpc.insecure_channel(teacher.address) as ch:
        s = pb_grpc.TeacherStub(ch)
        req = pb.PredictRequest()
        codec.encode(np.ones((3, 8), np.float32), req.inputs.add(), name="x")
        codec.encode(np.ones((2,), np.float32), req.inputs.add(), name="mask")
        with pytest.raises(grpc.RpcError) as info:
            s.Predict(req, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch dimension 2 differs from 3" in info.value.details()
        del req.inputs[1]
        codec.encode(np.ones((3,), np.float32), req.inputs.add(), name="mask")
        resp = s.Predict(req, timeout=TIMEOUT_S)
        assert [o.name for o in resp.outputs] == ["output0", "output1"]
        expected = TwoHeads.forward(model.module, torch.ones(3, 8), torch.ones(3))[0]
        torch.testing.assert_close(codec.to_torch(resp.outputs[0].values), expected)


def test_full_queue_answers_resource_exhausted() -> None:
    cfg = TeacherConfig(max_batch_size=1, max_queue_size=2, max_queue_delay_ms=0)
    with BackgroundTeacher(cfg, LoadedModel.from_module(zoo.latency(delay_ms=300))) as teacher, \
            grpc.insecure_channel(teacher.address) as ch:
        s = pb_grpc.TeacherStub(ch)
        s.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)
        # 1 in the forward pass + 2 queued fit; the other 5 of 8 sent at once cannot.
        futures = [s.Predict.future(ids_request([i]), timeout=TIMEOUT_S) for i in range(8)]
        ok, full = [], []
        for i, f in enumerate(futures):
            try:
                ok.append(ids_of(f.result()) == [i])
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "queue is full (2 requests waiting)" in exc.details()
                full.append(i)
        assert full and all(ok) and len(ok) >= 1
        assert teacher.server.batcher.stats().rejected_full == len(full)
        assert ids_of(s.Predict(ids_request([99]), timeout=TIMEOUT_S)) == [99]  # recovers


def test_stock_health_check_and_reflection(latency_teacher) -> None:
    with grpc.insecure_channel(latency_teacher.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "edistill.v1.Teacher"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {"edistill.v1.Teacher", "grpc.health.v1.Health"} <= services


def test_describe(stub, latency_teacher) -> None:
    d = stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)
    assert (d.model_name, d.max_batch_size, d.device, d.precision) == ("latency", 16, "cpu", "fp32")
    assert [(t.name, t.dtype, list(t.shape)) for t in d.inputs] == [("input", pb.FLOAT32, [4])]
    assert [(t.name, list(t.shape)) for t in d.outputs] == [("logits", [10])]
    assert d.max_message_bytes == 256 * 1024 * 1024 and d.teacher_id == latency_teacher.server.teacher_id


def test_large_message_within_explicit_limit() -> None:
    # 16 x 3x224x224 float32 = 9.6 MB: over gRPC's 4 MiB default, under our 256 MiB.
    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))  # (B, 3)

    model = LoadedModel.from_module(Mean(), [("image", "float32", (3, 224, 224))])
    with BackgroundTeacher(TeacherConfig(), model) as teacher, grpc.insecure_channel(
            teacher.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        x = torch.rand(16, 3, 224, 224)
        req = pb.PredictRequest()
        codec.encode(x, req.inputs.add(), name="image")
        resp = pb_grpc.TeacherStub(ch).Predict(req, timeout=TIMEOUT_S)
        torch.testing.assert_close(codec.to_torch(resp.outputs[0].values), x.mean(dim=(2, 3)))
