"""One request never fails its batch-mates: real gRPC teachers, requests from separate connections.

A request that passes validation but breaks the forward pass (an embedding
index out of range) must fail alone, and requests with different free
dimensions must not be concatenated into one batch.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import numpy as np
import torch

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig

TIMEOUT_S = 30.0
ATTEMPTS = 5  # rounds until the two requests land in one forward pass (a long batch window makes it the first)


class EmbedTeacher(torch.nn.Module):
    """Token ids (B, 4) -> mean embedding (B, 8); an id >= 10 raises IndexError inside forward."""

    edistill_inputs = [("ids", "int64", (4,))]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).mean(dim=1)


class FreeLength(torch.nn.Module):
    """(B, L) with a free L -> (B, 3) holding each row's mean."""

    edistill_inputs = [("x", "float32", (-1,))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True) * torch.ones(3)


def _request(name: str, array: np.ndarray, request_id: str) -> pb.PredictRequest:
    req = pb.PredictRequest(request_id=request_id)
    codec.encode(array, req.inputs.add(), name=name)
    return req


def _send_together(address: str, requests: list[pb.PredictRequest]) -> list[pb.PredictResponse | grpc.RpcError]:
    """Send each request from its own connection at the same moment; answers or errors, in order."""
    barrier = threading.Barrier(len(requests))

    def client(req: pb.PredictRequest):
        with grpc.insecure_channel(address) as ch:
            s = pb_grpc.TeacherStub(ch)
            s.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)  # connect before the race
            barrier.wait(timeout=TIMEOUT_S)
            try:
                return s.Predict(req, timeout=TIMEOUT_S)
            except grpc.RpcError as exc:
                return exc

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(client, requests))


def _wait_for_records(records: list, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while len(records) < n:  # listeners run on the server's loop after the answers are set
        assert time.monotonic() < deadline, "batch records did not arrive"
        time.sleep(0.01)


def test_poison_request_fails_alone_when_it_shares_a_batch() -> None:
    model = EmbedTeacher()
    cfg = TeacherConfig(model_name="embed", max_batch_size=16, max_queue_delay_ms=500)
    with BackgroundTeacher(cfg, LoadedModel.from_module(model)) as teacher:
        records: list = []
        teacher.server.batcher.add_listener(records.append)
        good_ids = np.array([[1, 2, 3, 4]], np.int64)
        poison_ids = np.array([[1, 99, 3, 4]], np.int64)  # valid int64, out of the embedding's range
        shared = False
        for attempt in range(ATTEMPTS):
            n = len(records)
            good, bad = _send_together(teacher.address, [_request("ids", good_ids, f"good{attempt}"),
                                                         _request("ids", poison_ids, f"bad{attempt}")])
            assert isinstance(good, pb.PredictResponse), f"good request failed with its poisoned batch-mate: {good}"
            assert good.request_id == f"good{attempt}"
            expected = model(torch.from_numpy(good_ids)).detach()
            torch.testing.assert_close(codec.to_torch(good.outputs[0].values), expected)
            assert isinstance(bad, grpc.RpcError) and bad.code() == grpc.StatusCode.INTERNAL
            assert "IndexError" in bad.details() or "index" in bad.details().lower()
            _wait_for_records(records, n + 1)
            if any(r.num_requests == 2 and r.failed for r in records[n:]):
                shared = True  # the merged forward pass failed and was split up
                break
        assert shared, f"the two requests never shared a forward pass in {ATTEMPTS} tries: {records}"
        stats = teacher.server.batcher.stats()
        assert stats.failed_batches >= 1 and stats.batch_sizes.get(2, 0) >= 1
        # Still serving.
        with grpc.insecure_channel(teacher.address) as ch:
            resp = pb_grpc.TeacherStub(ch).Predict(_request("ids", good_ids, "after"), timeout=TIMEOUT_S)
        assert resp.request_id == "after"


def test_different_free_lengths_sent_together_both_succeed() -> None:
    cfg = TeacherConfig(model_name="free", max_batch_size=16, max_queue_delay_ms=300)
    with BackgroundTeacher(cfg, LoadedModel.from_module(FreeLength())) as teacher:
        lengths = (3, 7, 3)
        requests = [_request("x", np.full((2, n), float(i), np.float32), f"r{i}") for i, n in enumerate(lengths)]
        answers = _send_together(teacher.address, requests)
        for i, resp in enumerate(answers):
            assert isinstance(resp, pb.PredictResponse), f"request of length {lengths[i]} failed: {resp}"
            assert resp.request_id == f"r{i}"
            assert codec.to_numpy(resp.outputs[0].values)[:, 0].tolist() == [float(i), float(i)]
        assert teacher.server.batcher.stats().failed_batches == 0
