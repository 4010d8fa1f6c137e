"""Hugging Face causal-LM teachers: loading a model directory, mixed-length batches, per-token answers.

A real transformers Llama built from a small config and saved with
``save_pretrained``, served by a real gRPC teacher on an ephemeral port.
"""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
import torch

transformers = pytest.importorskip("transformers")  # the test extra installs it; `edistill[hf]` for users

from protos import codec  # noqa: E402
from protos import outputs as shared  # noqa: E402
from protos.edistill.v1 import teacher_pb2 as pb  # noqa: E402
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc  # noqa: E402
from student_client import InProcessTeacher, OutputSpec  # noqa: E402
from student_client.outputs import Sampled, TopK, decode_response  # noqa: E402
from student_client.sources import SourceRequest  # noqa: E402
from teacher_server import BackgroundTeacher, TeacherConfig  # noqa: E402
from teacher_server.batcher import DynamicBatcher  # noqa: E402
from teacher_server.errors import ModelLoadError  # noqa: E402
from teacher_server.hf import CausalLMLogits, load_hf_model  # noqa: E402
from teacher_server.model import load_model  # noqa: E402
from teacher_server.transforms import plan_outputs  # noqa: E402
from tests.helpers.hf_models import tiny_llama  # noqa: E402

TIMEOUT_S = 30.0
V, MAX_POS = 300, 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(V, MAX_POS).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def served(model_dir):
    model = load_model(model_dir)
    cfg = TeacherConfig(model_name="llama", max_queue_delay_ms=20, max_batch_tokens=2048)
    with BackgroundTeacher(cfg, model) as teacher, grpc.insecure_channel(teacher.address) as ch:
        yield model, pb_grpc.TeacherStub(ch)


def _batch(n: int, length: int, seed: int, pad_from: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.int64)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _request(inputs: dict[str, torch.Tensor], *specs: OutputSpec, rid: str = "r") -> pb.PredictRequest:
    req = pb.PredictRequest(request_id=rid, outputs=[s.to_proto() for s in specs])
    for name, t in inputs.items():
        codec.encode(t, req.inputs.add(), name=name)
    return req


def _through_batcher(model, plans, batches, **kw):
    """Submit ``batches`` at once to a real DynamicBatcher; (results, BatchRecords)."""
    records = []

    async def run():
        b = DynamicBatcher(model, max_batch_size=64, max_queue_delay_ms=200, max_queue_size=16, **kw)
        b.add_listener(records.append)
        b.start()
        try:
            return await asyncio.gather(*(b.submit([x["input_ids"], x["attention_mask"]], plans,
                                                   x["input_ids"].shape[0]) for x in batches))
        finally:
            await b.close()

    return asyncio.run(run()), records


def test_a_model_directory_loads_with_a_free_length_signature(served) -> None:
    model, stub = served
    desc = stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)
    assert [(s.name, codec.dtype_name(s.dtype), list(s.shape)) for s in desc.inputs] == [
        ("input_ids", "int64", [-1]), ("attention_mask", "int64", [-1])]
    assert [(s.name, list(s.shape)) for s in desc.outputs] == [("logits", [-1, V])]
    assert model.sequence.vocab_size == V and model.sequence.max_positions == MAX_POS


def test_mixed_lengths_share_a_pass_and_each_equals_its_own_forward(model_dir) -> None:
    model = load_hf_model(model_dir)
    plans = plan_outputs([pb.OutputRequest(name="logits")], model.outputs, model.inputs)
    batches = [_batch(2, 5, 1), _batch(1, 17, 2), _batch(3, 11, 3, pad_from=6)]
    results, records = _through_batcher(model, plans, batches)
    assert [(r.num_requests, r.batch_size) for r in records] == [(3, 6)]  # one forward pass for all three
    assert records[0].tokens == 6 * 17 and records[0].padded_tokens == 6 * 17 - (2 * 5 + 17 + 3 * 11)
    reference = CausalLMLogits(transformers.AutoModelForCausalLM.from_pretrained(model_dir)).eval()
    for x, res in zip(batches, results):
        with torch.inference_mode():
            alone = reference(x["input_ids"], x["attention_mask"])  # (n, L, V), no padding
        got = res.outputs[0].values
        assert got.shape == alone.shape
        valid = x["attention_mask"].bool()
        torch.testing.assert_close(got[valid], alone[valid], atol=1e-5, rtol=1e-5)


def test_the_token_budget_ends_a_batch_before_its_padded_pass_exceeds_it(model_dir) -> None:
    model = load_hf_model(model_dir)
    plans = plan_outputs([pb.OutputRequest(name="logits", top_k=1)], model.outputs, model.inputs)
    batches = [_batch(1, 17, 1), _batch(2, 5, 2), _batch(1, 11, 3)]
    _, records = _through_batcher(model, plans, batches, max_batch_tokens=40)
    # 1 x 17, then 3 rows x 17 = 51 > 40 tokens: the second request leads the next pass (3 x 11 = 33)
    assert [(r.num_requests, r.batch_size, r.tokens) for r in records] == [(1, 1, 17), (2, 3, 33)]


def test_served_top_k_with_tail_is_what_the_in_process_teacher_answers(served) -> None:
    model, stub = served
    spec = OutputSpec("logits", "log_probs", 2.0, top_k=16, dtype="float16", tail=True, mask="attention_mask")
    x = _batch(3, 13, 4, pad_from=5)
    resp = stub.Predict(_request(x, spec), timeout=TIMEOUT_S)
    out = resp.outputs[0]
    assert codec.dtype_name(out.indices.dtype) == "uint16" and list(out.indices.shape) == [3 * 13 - 8, 16]
    got = decode_response(resp, [spec], batch_size=3)["logits"]
    assert isinstance(got, TopK) and got.values.shape == (3, 13, 16) and got.tail.shape == (3, 13)
    assert torch.equal(got.mask, x["attention_mask"].bool())
    # probabilities of the top-k plus the tail add up to one at every sent position
    total = got.values.float().exp().sum(-1) + got.tail.float().exp()
    torch.testing.assert_close(total[got.mask], torch.ones(int(got.mask.sum())), atol=2e-3, rtol=0)
    local = InProcessTeacher(model.module, [spec]).submit(SourceRequest(x, batch_id=1)).result()["logits"]
    for a, b in [(got.values, local.values), (got.indices, local.indices), (got.tail, local.tail)]:
        assert torch.equal(a[got.mask], b[got.mask])


def test_sampled_answers_are_seeded_per_request(served) -> None:
    model, stub = served
    spec = OutputSpec("logits", "log_probs", 1.0, sample=12, seed=7, mask="attention_mask")
    x = _batch(2, 9, 5, pad_from=4)
    first, again = (decode_response(stub.Predict(_request(x, spec), timeout=TIMEOUT_S), [spec])["logits"]
                    for _ in range(2))
    assert isinstance(first, Sampled) and first.indices.shape == (2, 9, 12)
    assert torch.equal(first.indices, again.indices)  # same request, same draws
    local = InProcessTeacher(model.module, [spec]).submit(SourceRequest(x, batch_id=3)).result()["logits"]
    assert torch.equal(local.indices, first.indices)
    other = OutputSpec("logits", "log_probs", 1.0, sample=12, seed=8, mask="attention_mask")
    assert not torch.equal(decode_response(stub.Predict(_request(x, other), timeout=TIMEOUT_S),
                                           [other])["logits"].indices, first.indices)
    dense = first.dense()
    torch.testing.assert_close(dense.sum(-1)[first.mask], torch.ones(int(first.mask.sum())))


@pytest.mark.parametrize("mutate, match", [
    (lambda x: x["input_ids"].__setitem__((1, 3), V + 5), rf"token id {V + 5} at \[1, 3\].*vocabulary \[0, {V}\)"),
    (lambda x: x.__setitem__("attention_mask", x["attention_mask"][:, :-2]),
     r"'attention_mask': shape \[2, 8\] differs from input 'input_ids' \[2, 10\]"),
    (lambda x: x.update(_batch(1, MAX_POS + 1, 0)), rf"length {MAX_POS + 1} exceeds the model's maximum of {MAX_POS}"),
])
def test_bad_token_inputs_are_invalid_argument_naming_what_is_wrong(served, mutate, match) -> None:
    _, stub = served
    x = _batch(2, 10, 6)
    mutate(x)
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(_request(x, OutputSpec("logits", top_k=4)), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, err.value.details()), err.value.details()


def test_top_k_above_the_vocabulary_is_invalid_argument(served) -> None:
    _, stub = served
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(_request(_batch(1, 4, 0), OutputSpec("logits", "log_probs", top_k=V + 1)), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"top_k={V + 1} exceeds its last dimension ({V})" in err.value.details()


def test_more_tokens_than_the_budget_is_invalid_argument(served) -> None:
    _, stub = served
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(_request(_batch(40, 60, 0), OutputSpec("logits", top_k=2)), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "40 x 60 = 2400 tokens exceed this teacher's max_batch_tokens 2048" in err.value.details()


def test_old_style_top_k_requests_still_get_int64_indices(served) -> None:
    _, stub = served
    x = _batch(2, 6, 9)
    old = pb.OutputRequest(name="logits", transform=pb.LOG_PROBS, top_k=3)  # no field an old client lacks
    out = stub.Predict(_raw(x, old), timeout=TIMEOUT_S).outputs[0]
    assert codec.dtype_name(out.indices.dtype) == "int64" and list(out.values.shape) == [2, 6, 3]
    assert not out.HasField("position_mask") and not out.HasField("tail")


def _raw(inputs: dict[str, torch.Tensor], *outputs: pb.OutputRequest) -> pb.PredictRequest:
    req = pb.PredictRequest(request_id="raw", outputs=list(outputs))
    for name, t in inputs.items():
        codec.encode(t, req.inputs.add(), name=name)
    return req


def test_code_in_the_directory_needs_trust_remote_code(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "mything", "auto_map": {"AutoModelForCausalLM": '
                                          '"modeling_mything.MyThing"}}')
    with pytest.raises(ModelLoadError, match="trust-remote-code|cannot load"):
        load_model(str(tmp_path))


def test_position_bits_round_trip() -> None:
    mask = torch.rand(3, 21, generator=torch.Generator().manual_seed(0)) > 0.4
    packed = shared.pack_positions(mask)
    assert packed.shape == (3, 3) and packed.dtype.name == "uint8"
    assert (shared.unpack_positions(packed, 21) == mask.numpy()).all()


def test_padding_waste_is_a_metric(model_dir) -> None:
    from tests.test_metrics import scrape, value

    # A long delay, so the second request joins the first one's pass even on a busy machine.
    cfg = TeacherConfig(model_name="llama", max_queue_delay_ms=2000, metrics_port=0)
    with BackgroundTeacher(cfg, load_model(model_dir)) as teacher, grpc.insecure_channel(teacher.address) as ch:
        stub = pb_grpc.TeacherStub(ch)
        stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)  # connected before the burst
        spec = OutputSpec("logits", "log_probs", top_k=2)
        futures = [stub.Predict.future(_request(_batch(1, n, n), spec), timeout=TIMEOUT_S) for n in (4, 12)]
        assert [f.result().batch_size for f in futures] == [2, 2]  # one pass of 2 rows x 12 positions
        m = scrape(f"http://127.0.0.1:{teacher.server.metrics.port}/metrics")
    assert value(m, "edistill_teacher_tokens_total", kind="real") == 16
    assert value(m, "edistill_teacher_tokens_total", kind="padding") == 8
    assert value(m, "edistill_teacher_padding_ratio_sum") == pytest.approx(8 / 24)
