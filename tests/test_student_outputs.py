"""Decoding teacher answers and applying output specs locally: bad answers and
bad requests fail at once, as errors that name the teacher and the output;
dense answers are :class:`Dense` tensors that carry their transform and temperature."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from student_client import ConfigError, InProcessTeacher, OutputSpec
from student_client.errors import StudentError, TeacherRequestError, TeacherResponseError
from student_client.sources import SourceRequest
from student_client.transfer import move_outputs
from student_client.outputs import Dense, TopK, apply_spec, decode_response, dense_answer

ENDPOINT = "10.0.0.9:50051"
LOGITS = torch.tensor([[0.5, 2.0, -1.0, 0.1], [3.0, 0.0, 1.0, -2.0]])  # (B=2, C=4)


def _response(values: torch.Tensor, indices: torch.Tensor | None = None, dense_shape=None,
              name: str = "logits") -> pb.PredictResponse:
    out = pb.Output(name=name)
    codec.encode(values, out.values)
    if indices is not None:
        codec.encode(indices, out.indices)
        out.dense_shape.extend(dense_shape)
    return pb.PredictResponse(request_id="r1", outputs=[out])


def _top2() -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.topk(LOGITS, 2, dim=-1)  # (2, 2)
    return values, indices


def test_a_consistent_top_k_answer_decodes_and_densifies():
    values, indices = _top2()
    got = decode_response(_response(values, indices, [2, 4]), [OutputSpec(top_k=2)], endpoint=ENDPOINT,
                          batch_id=7, batch_size=2)["logits"]
    assert isinstance(got, TopK) and got.dense_shape == (2, 4)
    assert torch.equal(got.dense(), torch.zeros(2, 4).scatter_(-1, indices, values))


@pytest.mark.parametrize(
    ("values", "indices", "dense_shape", "expected"),
    [
        pytest.param(*_top2(), [2, 4, 1], "dense_shape [2, 4, 1] does not match values shape [2, 2]", id="rank"),
        pytest.param(*_top2(), [3, 4], "dense_shape [3, 4] does not match", id="leading-dims"),
        pytest.param(*_top2(), [], "dense_shape [] does not match", id="empty"),
        pytest.param(*_top2(), [2, 1], "2 entries per row for top_k=2 of a last dimension of 1", id="k-over-C"),
        pytest.param(_top2()[0], torch.tensor([[0, 4], [1, 2]]), [2, 4], "indices must be in [0, 4), got values in [0, 4]",
                     id="index-equals-C"),
        pytest.param(_top2()[0], torch.tensor([[0, -1], [1, 2]]), [2, 4], "in [0, 4), got values in [-1, 2]",
                     id="negative-index"),
        pytest.param(_top2()[0], _top2()[1].to(torch.int32), [2, 4], "indices must be int64, got torch.int32",
                     id="int32-indices"),
        pytest.param(_top2()[0], _top2()[1][:, :1], [2, 4], "indices shape [2, 1] != values shape [2, 2]",
                     id="indices-shape"),
        pytest.param(LOGITS[:, :3], torch.tensor([[0, 1, 2], [0, 1, 2]]), [2, 4], "3 entries per row for top_k=2",
                     id="k-not-requested"),
    ],
)
def test_an_inconsistent_top_k_answer_is_a_teacher_response_error(values, indices, dense_shape, expected):
    with pytest.raises(TeacherResponseError) as info:
        decode_response(_response(values, indices, dense_shape), [OutputSpec(top_k=2)], endpoint=ENDPOINT,
                        batch_id=7)
    message = str(info.value)
    assert expected in message, message
    assert ENDPOINT in message and "'logits'" in message and "batch 7" in message
    assert info.value.endpoint == ENDPOINT and info.value.batch_id == 7


@pytest.mark.parametrize("top_k", [0, 2])
def test_an_answer_with_the_wrong_number_of_rows_is_refused(top_k):
    values, indices = _top2()
    resp = _response(LOGITS, None) if top_k == 0 else _response(values, indices, [2, 4])
    spec = OutputSpec(top_k=top_k)
    assert decode_response(resp, [spec], endpoint=ENDPOINT, batch_id=3, batch_size=2)
    with pytest.raises(TeacherResponseError, match=r"output 'logits' has 2 row\(s\) \[2, 4\] for a batch of 3") as info:
        decode_response(resp, [spec], endpoint=ENDPOINT, batch_id=3, batch_size=3)
    assert ENDPOINT in str(info.value)


def test_apply_spec_refuses_top_k_larger_than_the_output_like_a_served_teacher():
    with pytest.raises(TeacherRequestError) as info:
        apply_spec(LOGITS, OutputSpec(top_k=5))
    assert info.value.code == "INVALID_ARGUMENT"
    # The same words a teacher server answers with (teacher_server.transforms).
    assert "output 'logits': top_k=5 exceeds its last dimension (4)" in str(info.value)
    with pytest.raises(TeacherRequestError, match="no dimension besides the batch"):
        apply_spec(torch.ones(3), OutputSpec(top_k=1))
    assert apply_spec(LOGITS, OutputSpec(top_k=4)).k == 4  # k == C is fine


def test_in_process_teacher_answers_a_bad_top_k_with_invalid_argument():
    teacher = InProcessTeacher(torch.nn.Linear(3, 4), outputs=[OutputSpec(top_k=10)])
    error = teacher.submit(SourceRequest({"": torch.ones(2, 3)}, batch_id=11)).exception(timeout=5)
    assert isinstance(error, TeacherRequestError) and error.code == "INVALID_ARGUMENT"
    assert error.batch_id == 11 and "top_k=10 exceeds its last dimension (4)" in str(error)


def test_in_process_teacher_wraps_model_exceptions_in_the_student_error_tree():
    teacher = InProcessTeacher(torch.nn.Linear(3, 4))
    error = teacher.submit(SourceRequest({"": torch.ones(2, 5)}, batch_id=12)).exception(timeout=5)  # wrong feature size
    assert isinstance(error, StudentError) and isinstance(error, TeacherRequestError)
    assert error.code == "INTERNAL" and error.batch_id == 12
    assert isinstance(error.__cause__, RuntimeError)
    assert "in-process teacher failed on batch 12: RuntimeError" in str(error)


# --- Dense answers: a tensor that knows its transform and temperature ------------------------------

def test_a_dense_answer_decodes_as_dense_with_the_teachers_echo():
    out = pb.Output(name="logits", transform=pb.LOG_PROBS, temperature=4.0)
    codec.encode(torch.log_softmax(LOGITS / 4.0, -1), out.values)
    got = decode_response(pb.PredictResponse(request_id="r1", outputs=[out]),
                          [OutputSpec(transform="log_probs", temperature=4.0)], endpoint=ENDPOINT, batch_size=2)
    dense = got["logits"]
    assert isinstance(dense, Dense) and isinstance(dense, torch.Tensor)
    assert (dense.transform, dense.temperature) == ("log_probs", 4.0)
    assert torch.equal(dense, torch.log_softmax(LOGITS / 4.0, -1))


@pytest.mark.parametrize("spec, transform, temperature", [
    (OutputSpec(), "raw", 1.0),
    (OutputSpec(transform="raw", temperature=3.0), "raw", 1.0),  # nothing applied to raw logits
    (OutputSpec(transform="probs", temperature=2.0), "probs", 2.0),
    (OutputSpec(transform="log_probs", temperature=0.3), "log_probs", float(np.float32(0.3))),  # as on the wire
])
def test_apply_spec_answers_carry_what_was_applied(spec, transform, temperature):
    answer = apply_spec(LOGITS, spec)
    assert isinstance(answer, Dense) and (answer.transform, answer.temperature) == (transform, temperature)
    top = apply_spec(LOGITS, OutputSpec(spec.name, spec.transform, spec.temperature, top_k=2))
    assert isinstance(top, TopK) and (top.transform, top.temperature) == (transform, temperature)


def test_a_dense_answer_works_as_a_tensor_and_operations_give_plain_tensors():
    dense = dense_answer(LOGITS.clone(), "log_probs", 4.0)
    assert dense.shape == (2, 4) and dense.dtype == torch.float32 and dense.argmax(-1).tolist() == [1, 0]
    results = [dense + 1, dense * 2, dense.argmax(-1), dense[0], dense.reshape(-1), dense.exp(),
               torch.log_softmax(dense, -1), torch.cat([dense, dense]), torch.where(dense > 0, dense, 0.0),
               torch.zeros(2, 4, dtype=torch.float64).to(dense)]  # the last: converted *like* a Dense
    for r in results:
        assert type(r) is torch.Tensor, r  # the metadata means this exact answer only
    assert torch.equal(dense * 2, LOGITS * 2)


def test_copies_and_moves_keep_a_dense_answer_and_its_metadata():
    dense = dense_answer(LOGITS.clone(), "probs", 2.0)
    moved = [dense.to(torch.float64), dense.to("meta"), dense.to(torch.device("meta"), non_blocking=True),
             dense.cpu(), dense.half(), dense.double(), dense.bfloat16(), dense.float(), dense.detach(),
             dense.clone(), dense.contiguous(),
             move_outputs({"x": dense}, torch.device("meta"))["x"], move_outputs({"x": dense}, torch.device("cpu"))["x"]]
    for m in moved:
        assert isinstance(m, Dense) and (m.transform, m.temperature) == ("probs", 2.0)
    assert moved[0].dtype == torch.float64 and moved[1].device.type == "meta"
    assert dense.to(torch.float32) is dense  # a no-op move is the same object


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_and_non_blocking_moves_to_cuda_keep_a_dense_answer():
    dense = dense_answer(LOGITS.clone(), "log_probs", 4.0)
    pinned = dense.pin_memory()
    assert isinstance(pinned, Dense) and pinned.is_pinned() and pinned.temperature == 4.0
    out = move_outputs({"logits": dense, "top": apply_spec(LOGITS, OutputSpec(top_k=2))}, torch.device("cuda"))
    got = out["logits"]
    assert isinstance(got, Dense) and got.device.type == "cuda" and (got.transform, got.temperature) == (
        "log_probs", 4.0)
    assert torch.equal(got.cpu(), LOGITS) and out["top"].values.device.type == "cuda"


def test_a_dense_answer_pickles_and_deep_copies_with_its_metadata():
    dense = dense_answer(LOGITS.clone(), "log_probs", 4.0)
    for copy_ in (pickle.loads(pickle.dumps(dense)), copy.deepcopy(dense)):
        assert isinstance(copy_, Dense) and (copy_.transform, copy_.temperature) == ("log_probs", 4.0)
        assert torch.equal(copy_, dense) and copy_.data_ptr() != dense.data_ptr()
    assert "transform='log_probs', temperature=4.0" in repr(dense)


@pytest.mark.parametrize("temperature", [1e39, 1e-46])
def test_output_spec_temperatures_must_survive_the_float32_wire(temperature):
    with pytest.raises(ConfigError, match="as a float32"):
        OutputSpec(transform="probs", temperature=temperature)
