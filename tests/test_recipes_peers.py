"""PeerSource with real peer servers (BackgroundTeacher + RegistryHook) in a real Redis.

Three "peers" serve fixed-logit snapshots in one group; the source belongs to
peer 0. Its answer must be the mean of peers 1 and 2 only (never its own),
immature snapshots (version < min_version) are left out until they are
replaced, a deregistered peer is reported as departed, and staleness is our
step minus the version each answer carried.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from student_client import SourceRequest
from student_client.recipes import PeerSource
from student_client.recipes.codistill import Snapshot
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig
from teacher_server.registration import RegistryHook
from tests.helpers.redis_proc import redis_server, wait_until  # noqa: F401 (fixture)

C = 4
TIMEOUT_S = 30.0


class Fixed(nn.Module):
    """Logits ``bias`` for every row, whatever the input: (B, C)."""

    def __init__(self, bias: list[float]) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], C) + 0 * x[:, :1]


BIASES = [[5.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 2.0, 1.0]]


def _serve(url: str, i: int, version: int) -> BackgroundTeacher:
    model = LoadedModel.from_module(Snapshot(Fixed(BIASES[i]), version), [("x", "float32", (3,))])
    cfg = TeacherConfig(model_name=f"peer{i}", model_version=str(version))
    hook = lambda s: RegistryHook(s, url, "grp", heartbeat_s=0.2, ttl_s=0.8)  # noqa: E731
    return BackgroundTeacher(cfg, model, configure=hook).start()


def _ask(source: PeerSource) -> dict:
    return source.submit(SourceRequest({"": torch.zeros(2, 3)}, "b", [0, 1])).result(TIMEOUT_S)


@pytest.fixture
def group(redis_server):  # noqa: F811
    peers = [_serve(redis_server.url, i, version=100) for i in range(3)]
    source = PeerSource(redis_server.url, "grp", self_id=peers[0].server.teacher_id, min_version=50, poll_s=0.2)
    try:
        yield redis_server, peers, source
    finally:
        source.close()
        for p in peers:
            p.close()


def _mean_log_probs(*ids: int) -> torch.Tensor:
    probs = torch.stack([torch.softmax(torch.tensor(BIASES[i]), -1) for i in ids]).mean(0)
    return probs.log().expand(2, C)


def test_the_answer_is_the_mean_of_the_other_peers_never_our_own(group) -> None:
    _, peers, source = group
    source.wait_for_peers(2, TIMEOUT_S)
    answer = _ask(source)
    assert set(answer) == {"logits"}  # the version output is consumed, not averaged
    torch.testing.assert_close(answer["logits"].as_subclass(torch.Tensor), _mean_log_probs(1, 2))
    assert answer["logits"].transform == "log_probs"
    stats = source.stats()
    assert sorted(p.name for p in stats.peers.values()) == ["peer1", "peer2"]
    assert all(p.answered == 1 for p in stats.peers.values()) and stats.distilled == 1


def test_immature_snapshots_are_left_out_until_replaced(group) -> None:
    _, peers, source = group
    source.wait_for_peers(2, TIMEOUT_S)
    peers[2].swap_model(Snapshot(Fixed(BIASES[2]), 10), "10")  # e.g. a late joiner still in burn-in
    torch.testing.assert_close(_ask(source)["logits"].as_subclass(torch.Tensor), _mean_log_probs(1))
    assert next(p for p in source.stats().peers.values() if p.name == "peer2").immature == 1
    peers[2].swap_model(Snapshot(Fixed(BIASES[2]), 60), "60")
    torch.testing.assert_close(_ask(source)["logits"].as_subclass(torch.Tensor), _mean_log_probs(1, 2))


def test_staleness_is_our_step_minus_each_answers_version(group) -> None:
    _, peers, source = group
    source.wait_for_peers(2, TIMEOUT_S)
    peers[1].swap_model(Snapshot(Fixed(BIASES[1]), 120), "120")
    source.set_step(130)
    _ask(source)
    by_name = {p.name: p for p in source.stats().peers.values()}
    assert (by_name["peer1"].version, by_name["peer1"].staleness) == (120, 10)
    assert (by_name["peer2"].version, by_name["peer2"].staleness) == (100, 30)
    assert by_name["peer1"].mean_staleness == 10


def test_a_departed_peer_is_reported_and_the_rest_go_on(group, caplog) -> None:
    _, peers, source = group
    source.wait_for_peers(2, TIMEOUT_S)
    source.set_step(77)
    with caplog.at_level(logging.WARNING, logger="student_client.recipes.peers"):
        peers[2].close()
        wait_until(lambda: source.stats().departed == ["peer2"], timeout_s=TIMEOUT_S, what="peer2's departure")
        # the stats change under the source's lock, the line is logged just after it, from the watcher's thread
        wait_until(lambda: "peer peer2" in caplog.text, timeout_s=TIMEOUT_S, what="the departure's log line")
    assert "peer peer2" in caplog.text and "at our step 77" in caplog.text
    assert "distilling from the 1 remaining peer(s): peer1" in caplog.text
    torch.testing.assert_close(_ask(source)["logits"].as_subclass(torch.Tensor), _mean_log_probs(1))
    gone = next(p for p in source.stats().peers.values() if p.name == "peer2")
    assert not gone.live and gone.left_step == 77


def test_inactive_or_alone_answers_empty_at_once(group) -> None:
    _, peers, source = group
    source.wait_for_peers(2, TIMEOUT_S)
    source.active = False  # our own burn-in
    assert _ask(source) == {}
    source.active = True
    peers[1].close()
    peers[2].close()
    wait_until(lambda: not source.stats().live_peers, timeout_s=TIMEOUT_S, what="both peers gone")
    assert _ask(source) == {}
    assert source.stats().alone == 2


@pytest.mark.parametrize("field, value, message", [
    ("exchange_every", 0, "exchange_every must be an int >= 1, got 0"),
    ("burn_in", -1, "burn_in must be an int >= 0"),
    ("temperature", 0.0, "temperature must be a finite number > 0"),
    ("distill_weight", float("nan"), "distill_weight must be a finite number >= 0"),
    ("ttl_s", 0.4, "need ttl_s > heartbeat_s > 0"),
    ("group", "", "group must be a non-empty peer group name"),
])
def test_codistill_config_names_the_bad_value(field, value, message) -> None:
    from student_client import ConfigError
    from student_client.recipes import CodistillConfig

    with pytest.raises(ConfigError, match=message):
        CodistillConfig(**{"registry": "redis://127.0.0.1:1/0", "group": "g", field: value})


def test_codistillation_without_an_input_signature_says_how_to_give_one() -> None:
    from student_client import ConfigError
    from student_client.recipes import CodistillConfig, Codistillation

    with pytest.raises(ConfigError, match=r"inputs=\[\('x', 'float32'"):
        Codistillation(nn.Linear(3, C), [], CodistillConfig(registry="redis://127.0.0.1:1/0", group="g"))
