"""Output transforms over a real gRPC server, checked against torch computed in-process,
and against the student's in-process transform (the same code, so the same bits)."""

from __future__ import annotations

import grpc
import pytest
import torch

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from student_client.outputs import Dense, OutputSpec, TopK, apply_spec, decode_response
from teacher_server import BackgroundTeacher, ConfigError, LoadedModel, TeacherConfig, zoo
from teacher_server.transforms import OutputPlan, apply_plan

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    net = zoo.mlp(num_classes=10).eval()
    cfg = TeacherConfig(model_name="mlp", max_queue_delay_ms=50)
    with BackgroundTeacher(cfg, LoadedModel.from_module(net)) as teacher, \
            grpc.insecure_channel(teacher.address) as ch:
        yield net, pb_grpc.TeacherStub(ch)


def _request(x: torch.Tensor, *outputs: pb.OutputRequest) -> pb.PredictRequest:
    req = pb.PredictRequest(request_id="t", outputs=list(outputs))
    codec.encode(x, req.inputs.add(), name="input")
    return req


X = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))


def test_default_is_raw_float32(served) -> None:
    net, stub = served
    resp = stub.Predict(_request(X), timeout=TIMEOUT_S)
    (out,) = resp.outputs
    assert (out.name, out.transform, out.top_k) == ("logits", pb.RAW, 0)
    assert out.values.dtype == pb.FLOAT32 and list(out.dense_shape) == [6, 10]
    torch.testing.assert_close(codec.to_torch(out.values), net(X).detach())


@pytest.mark.parametrize("transform, temperature", [(pb.PROBS, 2.0), (pb.LOG_PROBS, 4.0), (pb.PROBS, 0.0)])
def test_probs_and_log_probs_at_temperature(served, transform: int, temperature: float) -> None:
    net, stub = served
    resp = stub.Predict(_request(X, pb.OutputRequest(name="logits", transform=transform, temperature=temperature)),
                        timeout=TIMEOUT_S)
    t = temperature or 1.0  # 0 means 1.0
    z = net(X).detach() / t
    expected = torch.softmax(z, -1) if transform == pb.PROBS else torch.log_softmax(z, -1)
    out = resp.outputs[0]
    assert out.temperature == pytest.approx(t)
    torch.testing.assert_close(codec.to_torch(out.values), expected)


def test_top_k_values_and_indices(served) -> None:
    net, stub = served
    resp = stub.Predict(_request(X, pb.OutputRequest(name="logits", transform=pb.PROBS, temperature=3, top_k=3)),
                        timeout=TIMEOUT_S)
    out = resp.outputs[0]
    values, indices = torch.topk(torch.softmax(net(X).detach() / 3, -1), 3)
    torch.testing.assert_close(codec.to_torch(out.values), values)
    assert torch.equal(codec.to_torch(out.indices), indices)
    assert out.indices.dtype == pb.INT64 and list(out.dense_shape) == [6, 10] and out.top_k == 3


@pytest.mark.parametrize("wire, dtype", [(pb.FLOAT16, torch.float16), (pb.BFLOAT16, torch.bfloat16)])
def test_half_precision_outputs(served, wire: int, dtype: torch.dtype) -> None:
    net, stub = served
    resp = stub.Predict(_request(X, pb.OutputRequest(name="logits", transform=pb.LOG_PROBS, dtype=wire)),
                        timeout=TIMEOUT_S)
    got = codec.to_torch(resp.outputs[0].values)
    assert got.dtype == dtype and resp.outputs[0].values.dtype == wire
    assert torch.equal(got, torch.log_softmax(net(X).detach(), -1).to(dtype))


def test_requests_with_different_transforms_share_a_batch(served) -> None:
    net, stub = served
    logits = net(X).detach()
    raw = stub.Predict.future(_request(X[:2]), timeout=TIMEOUT_S)
    probs = stub.Predict.future(_request(X[2:], pb.OutputRequest(name="logits", transform=pb.PROBS, top_k=2),
                                         pb.OutputRequest(name="logits", dtype=pb.FLOAT16)), timeout=TIMEOUT_S)
    raw, probs = raw.result(), probs.result()
    assert raw.batch_size == probs.batch_size == 6  # one forward pass for both
    torch.testing.assert_close(codec.to_torch(raw.outputs[0].values), logits[:2])
    values, indices = torch.topk(torch.softmax(logits[2:], -1), 2)
    torch.testing.assert_close(codec.to_torch(probs.outputs[0].values), values)
    assert torch.equal(codec.to_torch(probs.outputs[0].indices), indices)
    assert torch.equal(codec.to_torch(probs.outputs[1].values), logits[2:].half())


def test_bf16_autocast_serving_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    net = zoo.mlp().eval()
    cfg = TeacherConfig(precision="bf16")
    with BackgroundTeacher(cfg, LoadedModel.from_module(net, precision="bf16")) as teacher, \
            grpc.insecure_channel(teacher.address) as ch:
        stub = pb_grpc.TeacherStub(ch)
        assert stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S).precision == "bf16"
        resp = stub.Predict(_request(X, pb.OutputRequest(name="logits", transform=pb.PROBS)), timeout=TIMEOUT_S)
    got = codec.to_torch(resp.outputs[0].values)
    assert got.dtype == torch.float32  # computed in bf16, answered in the requested float32
    torch.testing.assert_close(got, torch.softmax(net(X), -1).detach(), atol=2e-2, rtol=0)


def test_raw_ignores_temperature() -> None:
    x = torch.tensor([[1.0, 3.0, 2.0]])
    values, indices = apply_plan(x, OutputPlan("logits", pb.RAW, 1.0, 2, torch.float32))
    assert values.tolist() == [[3.0, 2.0]] and indices.tolist() == [[1, 2]]


@pytest.mark.parametrize("field, value", [("max_batch_size", 0), ("max_queue_delay_ms", -1.0),
                                          ("max_queue_size", 0), ("precision", "fp8"), ("device", "tpu"),
                                          ("port", 70000), ("grace_s", float("nan")), ("torch_threads", 0)])
def test_config_validation_names_the_bad_value(field: str, value) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        TeacherConfig(**{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("spec", [
    OutputSpec(),
    OutputSpec(transform="probs", temperature=2.0),
    OutputSpec(transform="log_probs", temperature=0.3),  # not a float32: rounded as on the wire
    OutputSpec(transform="log_probs", temperature=4.0, dtype="float16"),
    OutputSpec(transform="probs", temperature=3.0, top_k=3, dtype="bfloat16"),
    OutputSpec(transform="raw", temperature=5.0, top_k=2),
], ids=repr)
def test_the_in_process_transform_is_the_served_one_bit_for_bit(served, spec: OutputSpec) -> None:
    """apply_spec on the served raw logits == what the server answers for ``spec``, metadata included."""
    _, stub = served
    raw = decode_response(stub.Predict(_request(X), timeout=TIMEOUT_S), [OutputSpec()])["logits"]
    resp = stub.Predict(_request(X, spec.to_proto()), timeout=TIMEOUT_S)
    got = decode_response(resp, [spec], batch_size=X.shape[0])[spec.name]
    local = apply_spec(raw, spec)
    assert type(got) is type(local) and isinstance(got, TopK if spec.top_k else Dense)
    assert (got.transform, got.temperature) == (local.transform, local.temperature)
    if spec.top_k:
        assert got.dense_shape == local.dense_shape
        assert torch.equal(got.indices, local.indices)
        got, local = got.values, local.values
    assert got.dtype == local.dtype and torch.equal(got, local)
