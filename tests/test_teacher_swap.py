"""Swapping a running teacher's model (teacher_server.swap): never a half-written set of weights.

A real gRPC teacher (BackgroundTeacher) serves a two-layer net whose forward
pass can be held between its layers (an event, not a sleep). A request held
there while the model is swapped must come back computed entirely by the old
weights; the next request entirely by the new ones. The control case loads
the new weights *into* the served module instead, and the held request comes
back mixed (layer 1 old, layer 2 new): the property the test checks is real.
"""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from registry import TeacherWatcher
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig
from teacher_server.errors import SignatureError
from teacher_server.registration import RegistryHook
from tests.helpers.redis_proc import redis_server, wait_until  # noqa: F401 (fixture)

TIMEOUT_S = 30.0
FEATURES, HIDDEN, CLASSES = 4, 8, 3


class HeldNet(nn.Module):
    """``l2(relu(l1(x)))``; with ``gate`` set, the pass waits between the layers until released."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, CLASSES)
        self.gate: tuple[threading.Event, threading.Event] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))  # (B, HIDDEN)
        if self.gate is not None:
            entered, release = self.gate
            entered.set()
            assert release.wait(TIMEOUT_S), "test never released the held forward pass"
        return self.l2(h)  # (B, CLASSES)


def _mixed(first: nn.Module, second: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a pass reading layer 1 of ``first`` and layer 2 of ``second`` computes."""
    with torch.no_grad():
        return second.l2(torch.relu(first.l1(x)))


def _plain(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.l2(torch.relu(net.l1(x)))


def _request(x: torch.Tensor) -> pb.PredictRequest:
    req = pb.PredictRequest(request_id="r")
    codec.encode(x.numpy(), req.inputs.add(), name="x")
    return req


def _logits(resp: pb.PredictResponse) -> torch.Tensor:
    return torch.from_numpy(np.array(codec.to_numpy(resp.outputs[0].values)))


@pytest.fixture
def served():
    """(teacher, served HeldNet, stub) with version "1"; the served net's gate is armed after warm-up."""
    old = HeldNet(seed=1)
    model = LoadedModel.from_module(old, [("x", "float32", (FEATURES,))])
    with BackgroundTeacher(TeacherConfig(model_name="peer", model_version="1"), model) as teacher:
        with grpc.insecure_channel(teacher.address) as channel:
            yield teacher, old, pb_grpc.TeacherStub(channel)


def _held_request(stub, net: HeldNet, x: torch.Tensor, pool) -> tuple[concurrent.futures.Future, threading.Event]:
    entered, release = threading.Event(), threading.Event()
    net.gate = (entered, release)
    fut = pool.submit(stub.Predict, _request(x), timeout=TIMEOUT_S)
    assert entered.wait(TIMEOUT_S), "the request never reached the forward pass"
    return fut, release


def test_a_request_during_a_swap_gets_the_old_weights_and_the_next_one_the_new(served) -> None:
    teacher, old, stub = served
    new = HeldNet(seed=2)
    x = torch.randn(5, FEATURES)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held, release = _held_request(stub, old, x, pool)
        teacher.swap_model(new, "2")  # while layer 2 of the old pass has not run yet
        describe = stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)
        release.set()
        during = held.result(TIMEOUT_S)
    after = stub.Predict(_request(x), timeout=TIMEOUT_S)
    torch.testing.assert_close(_logits(during), _plain(old, x))  # all old, not a mix
    assert not torch.allclose(_logits(during), _mixed(old, new, x), atol=1e-4)
    torch.testing.assert_close(_logits(after), _plain(new, x))
    assert describe.model_version == "2" and after.model_version == "2"


def test_control_loading_weights_in_place_serves_a_mix(served) -> None:
    """What swap_model avoids: load_state_dict into the served module while a pass is inside it."""
    _, old, stub = served
    before = HeldNet(seed=1)
    new = HeldNet(seed=2)
    x = torch.randn(5, FEATURES)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held, release = _held_request(stub, old, x, pool)
        old.load_state_dict(new.state_dict())
        release.set()
        during = held.result(TIMEOUT_S)
    torch.testing.assert_close(_logits(during), _mixed(before, new, x))  # layer 1 old, layer 2 new


def test_concurrent_requests_under_repeated_swaps_each_match_one_version(served) -> None:
    teacher, old, stub = served
    nets = {"1": old, **{str(v): HeldNet(seed=v) for v in range(2, 12)}}
    x = torch.randn(16, FEATURES)
    expected = [_plain(n, x) for n in nets.values()]
    stop = threading.Event()

    def client() -> list[torch.Tensor]:
        got = []
        while not stop.is_set():
            got.append(_logits(stub.Predict(_request(x), timeout=TIMEOUT_S)))
        return got

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        clients = [pool.submit(client) for _ in range(3)]
        for version, net in list(nets.items())[1:]:
            served_before = teacher.server.batcher.stats().batches
            teacher.swap_model(net, version)
            wait_until(lambda: teacher.server.batcher.stats().batches > served_before + 1, timeout_s=TIMEOUT_S,
                       what="a forward pass on the new weights")
        stop.set()
        answers = [a for c in clients for a in c.result(TIMEOUT_S)]
    assert len(answers) >= 10
    for a in answers:
        assert any(torch.allclose(a, e, atol=1e-6) for e in expected), "an answer matches no single version"


def test_swap_refuses_another_architecture_and_keeps_serving(served) -> None:
    teacher, old, stub = served
    x = torch.randn(2, FEATURES)
    with pytest.raises(SignatureError, match="outputs are .*served model's are"):
        teacher.swap_model(nn.Linear(FEATURES, CLASSES + 1), "2")
    resp = stub.Predict(_request(x), timeout=TIMEOUT_S)
    torch.testing.assert_close(_logits(resp), _plain(old, x))
    assert resp.model_version == "1"


def test_swap_bumps_the_registry_records_version(redis_server) -> None:  # noqa: F811
    model = LoadedModel.from_module(HeldNet(seed=1), [("x", "float32", (FEATURES,))])
    cfg = TeacherConfig(model_name="peer", model_version="0")
    configure = lambda s: RegistryHook(s, redis_server.url, "peers", heartbeat_s=0.2, ttl_s=1.0)  # noqa: E731
    with BackgroundTeacher(cfg, model, configure=configure) as teacher, \
            TeacherWatcher(redis_server.url, "peers", poll_s=0.2) as watcher:
        wait_until(lambda: [r.model_version for r in watcher.snapshot().values()] == ["0"], timeout_s=TIMEOUT_S,
                   what="the teacher registered with version 0")
        teacher.swap_model(HeldNet(seed=2), "300")
        wait_until(lambda: [r.model_version for r in watcher.snapshot().values()] == ["300"], timeout_s=TIMEOUT_S,
                   what="the record's version to become 300")
