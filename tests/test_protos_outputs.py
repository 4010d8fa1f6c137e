"""protos.outputs: the one output naming and transform implementation both sides use."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from protos import outputs
from protos.edistill.v1 import teacher_pb2 as pb


def test_naming_a_models_return_value():
    a, b = torch.zeros(1), torch.ones(1)
    assert outputs.name_outputs(a) == {"logits": a}
    assert outputs.name_outputs((a, b)) == {"output0": a, "output1": b}
    assert outputs.name_outputs([a]) == {"output0": a}
    assert outputs.name_outputs({"feat": a, 3: b}) == {"feat": a, "3": b}


@pytest.mark.parametrize("value, match", [
    ("text", "model returned str; expected a tensor, tuple/list or dict of tensors"),
    ((torch.zeros(1), 2.0), "model output 'output1' is a float, not a tensor"),
    ({"a": None}, "model output 'a' is a NoneType"),
])
def test_naming_refuses_what_is_not_tensors(value, match):
    with pytest.raises(TypeError, match=match):
        outputs.name_outputs(value)


def test_both_sides_name_outputs_alike():
    from student_client import InProcessTeacher, OutputSpec
    from student_client.sources import SourceRequest
    from teacher_server import model

    assert model.name_outputs is outputs.name_outputs
    teacher = InProcessTeacher(lambda x: (x, x * 2), outputs=[OutputSpec("output1")])
    got = teacher.submit(SourceRequest({"": torch.ones(2, 3)}, batch_id=1)).result(timeout=5)
    assert torch.equal(got["output1"], torch.full((2, 3), 2.0))


X = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.5, -2.0, 4.0]])  # (B=2, C=4)


@pytest.mark.parametrize("transform, T, top_k, dtype, expected", [
    (pb.RAW, 5.0, 0, torch.float32, lambda x: x),  # temperature ignored
    (pb.PROBS, 2.0, 0, torch.float32, lambda x: torch.softmax(x / 2.0, -1)),
    (pb.LOG_PROBS, 1.0, 0, torch.float16, lambda x: torch.log_softmax(x, -1).half()),
    (pb.LOG_PROBS, 0.5, 2, torch.bfloat16, lambda x: torch.topk(torch.log_softmax(x / 0.5, -1), 2).values.bfloat16()),
    (pb.RAW, 1.0, 2, torch.float32, lambda x: torch.topk(x, 2).values),
])
def test_apply_transform_semantics(transform, T, top_k, dtype, expected):
    values, indices = outputs.apply_transform(X, "logits", transform, T, top_k, dtype)
    assert values.dtype == dtype and torch.equal(values, expected(X))
    if top_k:
        dense, _ = outputs.apply_transform(X, "logits", transform, T, 0, dtype)
        assert indices.dtype == torch.int64 and indices.shape == (2, top_k)
        assert torch.equal(values, dense.gather(-1, indices))
    else:
        assert indices is None


def test_non_float_outputs_keep_their_dtype_with_dtype_none():
    x = torch.tensor([[1, 2], [3, 4]])
    values, _ = outputs.apply_transform(x, "ids", pb.RAW, 1.0, 0, None)
    assert values.dtype == torch.int64 and torch.equal(values, x)


@pytest.mark.parametrize("x, top_k, match", [
    (X, 5, "output 'logits': top_k=5 exceeds its last dimension \\(4\\)"),
    (torch.ones(3), 1, "output 'logits' has no dimension besides the batch; top_k needs one"),
])
def test_apply_transform_refuses_what_cannot_be_answered(x, top_k, match):
    with pytest.raises(outputs.TransformError, match=match):
        outputs.apply_transform(x, "logits", pb.PROBS, 1.0, top_k, torch.float32)


def test_answer_temperature_is_what_the_wire_carries():
    assert outputs.answer_temperature(pb.RAW, 4.0) == 1.0
    assert outputs.answer_temperature(pb.PROBS, 4.0) == 4.0
    assert outputs.answer_temperature(pb.LOG_PROBS, 0.3) == pb.OutputRequest(temperature=0.3).temperature


def test_importing_protos_outputs_does_not_import_torch():
    code = "import sys, protos.outputs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
