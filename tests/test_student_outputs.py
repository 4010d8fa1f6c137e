"""Decoding teacher answers and applying output specs locally: bad answers and
bad requests fail at once, as errors that name the teacher and the output."""

from __future__ import annotations

import pytest
import torch

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from student_client import InProcessTeacher, OutputSpec
from student_client.errors import StudentError, TeacherRequestError, TeacherResponseError
from student_client.sources import SourceRequest
from student_client.outputs import TopK, apply_spec, decode_response

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
