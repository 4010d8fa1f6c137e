"""Output dims that follow a free input dim are declared free (-1), not as the warm-up's stand-in size.

A real teacher serves a model whose ``logits`` are ``(B, L)`` for a free L
(and whose ``pooled`` output is a fixed ``(B, 3)``): its Describe answer must
say ``[-1]`` for ``logits``, so that a student pool asking for more top-k
entries than the warm-up's length is not refused before its first batch.
"""

from __future__ import annotations

import grpc
import torch

from student_client import OutputSpec, SourceRequest, TeacherPool
from student_client.describe import describe_call
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig

TIMEOUT_S = 30.0
TOP_K = 16  # above the warm-up's stand-in length (8)


class FreeLastDim(torch.nn.Module):
    """(B, L) with a free L -> logits (B, L) = 2x, pooled (B, 3) = each row's mean."""

    edistill_inputs = [("x", "float32", (-1,))]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": 2.0 * x, "pooled": x.mean(dim=1, keepdim=True) * torch.ones(3)}


def test_a_free_last_dim_is_declared_free_and_top_k_above_the_warm_up_length_is_served() -> None:
    model = LoadedModel.from_module(FreeLastDim())
    with BackgroundTeacher(TeacherConfig(model_name="free-last-dim"), model) as teacher:
        channel = grpc.insecure_channel(teacher.address)
        try:
            desc = describe_call(channel, TIMEOUT_S).result()
        finally:
            channel.close()
        assert [(s.name, list(s.shape)) for s in desc.outputs] == [("logits", [-1]), ("pooled", [3])]

        x = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
        with TeacherPool([teacher.address], [OutputSpec("logits", top_k=TOP_K)]) as pool:
            pool.wait_for_teachers(1, timeout_s=TIMEOUT_S)  # raises ConfigError if Describe refuses top_k=16
            got = pool.submit(SourceRequest({"x": x}, "b0")).result(timeout=TIMEOUT_S)["logits"]
    want = torch.topk(2.0 * x, TOP_K, dim=-1)
    assert got.values.shape == (2, TOP_K) and got.dense_shape == (2, 20)
    torch.testing.assert_close(got.values, want.values)
    assert torch.equal(got.indices, want.indices)
