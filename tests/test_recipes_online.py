"""Online recipes on their defining properties: DML and DKEL's decoupled mean teacher.

DML: each peer's loss is CE plus the mean KL to the *other* peers' predictions
(never its own), checked against the formula computed by hand, and its
gradient reaches no other peer. Decoupled mean teacher: the teacher is an EMA
of the student that keeps its independent initialisation at step 0, and the
ensemble weight and ramp-up follow the paper's schedules (epochs, not the
ramp's weight, drive the ramp).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from student_client import ConfigError
from student_client.recipes import DecoupledMeanTeacher, DeepMutualLearning


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), batch mean, by hand."""
    q = F.softmax(teacher_logits / T, -1)
    return (q * (q.log() - F.log_softmax(student_logits / T, -1))).sum(-1).mean() * T * T


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


# ---------------------------------------------------------------- DML


def test_dml_each_peer_learns_from_the_others_predictions_not_its_own() -> None:
    torch.manual_seed(0)
    z = [torch.randn(5, 4, requires_grad=True) for _ in range(3)]  # three peers' logits, all different
    y = torch.randint(0, 4, (5,))
    dml = DeepMutualLearning([_net(i) for i in range(3)], temperature=2.0)
    losses = dml.losses(z, y)
    for k in range(3):
        others = [j for j in range(3) if j != k]
        expected = F.cross_entropy(z[k], y) + sum(_kl(z[j].detach(), z[k], 2.0) for j in others) / 2
        torch.testing.assert_close(losses[k], expected)
        with_self = F.cross_entropy(z[k], y) + sum(_kl(z[j].detach(), z[k], 2.0) for j in range(3)) / 3
        assert not torch.allclose(losses[k], with_self)  # a mean over all three (own included) is different
        teachers = dml.teachers_of(z, k)
        assert len(teachers) == 2 and all(torch.equal(t, z[j]) for t, j in zip(teachers, others))
    losses[0].backward()
    assert z[0].grad is not None and z[1].grad is None and z[2].grad is None  # the others are constants


def test_dml_trains_two_peers_and_they_agree_more_than_alone() -> None:
    """Mutual learning pulls two differently initialised peers together (real training, fixed seeds)."""
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()

    def train(mutual: bool) -> float:
        peers = [_net(1), _net(2)]
        dml = DeepMutualLearning(peers, kl_weight=1.0 if mutual else 0.0)
        opt = torch.optim.SGD(dml.parameters(), lr=0.2)
        for _ in range(60):
            loss = sum(dml.losses(dml(x), y))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            p = [F.softmax(n(x), -1) for n in peers]
        return (p[0] - p[1]).abs().sum(-1).mean().item()

    assert train(mutual=True) < 0.7 * train(mutual=False)


def test_dml_refuses_one_peer() -> None:
    with pytest.raises(ConfigError, match="at least 2 peers"):
        DeepMutualLearning([_net(0)])


# ---------------------------------------------------- decoupled mean teacher


def test_mean_teacher_is_an_ema_of_the_student_and_keeps_its_own_init_at_step_0() -> None:
    student, teacher = _net(0), _net(1)
    init = {k: v.clone() for k, v in teacher.state_dict().items()}
    dmt = DecoupledMeanTeacher([student], [teacher], ema_decay=0.9)
    opt = torch.optim.SGD(dmt.parameters(), lr=0.5)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    expected = {k: v.clone() for k, v in init.items()}
    for t in range(12):
        s, m = dmt(x)
        loss = sum(dmt.losses(s, m, y, epoch=0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        alpha = dmt.update()
        assert alpha == min(1 - 1 / (t + 2), 0.9) and alpha > 0
        for k, v in student.state_dict().items():  # m <- α·m + (1-α)·s, by hand
            expected[k] = alpha * expected[k] + (1 - alpha) * v
        if t == 0:
            first = teacher.state_dict()
            assert all(not torch.allclose(first[k], v) for k, v in student.state_dict().items()), \
                "the student was copied into the teacher at step 0 (the reference code's bug)"
            for k in init:  # half the independent init, half the student
                torch.testing.assert_close(first[k], 0.5 * init[k] + 0.5 * student.state_dict()[k])
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in dmt.parameters()} == {id(p) for p in student.parameters()}  # the optimizer's


def test_mean_teacher_refuses_a_teacher_that_is_not_decoupled() -> None:
    student = _net(0)
    with pytest.raises(ConfigError, match="another seed"):
        DecoupledMeanTeacher([student], [_net(0)])
    with pytest.raises(ConfigError, match="separate module"):
        DecoupledMeanTeacher([student], [student])


def test_ensemble_weight_decays_as_exp_minus_half_epoch_and_is_cut_below_0_01() -> None:
    dmt = DecoupledMeanTeacher([_net(0)], [_net(1)])
    for e in range(10):
        assert dmt.ensemble_weight(e) == pytest.approx(math.exp(-0.5 * e))
    assert dmt.ensemble_weight(9) > 0.01 and dmt.ensemble_weight(10) == 0.0 and dmt.ensemble_weight(30) == 0.0


def test_rampup_runs_over_the_epochs_and_keeps_the_distillation_terms_on() -> None:
    dmt = DecoupledMeanTeacher([_net(0)], [_net(1)], consistency_weight=0.1, rampup_epochs=80)
    assert dmt.rampup_weight(0) == pytest.approx(0.1 * math.exp(-5))
    assert dmt.rampup_weight(40) == pytest.approx(0.1 * math.exp(-1.25))
    assert dmt.rampup_weight(80) == dmt.rampup_weight(200) == pytest.approx(0.1)
    weights = [dmt.rampup_weight(e) for e in range(81)]
    assert weights == sorted(weights)
    # The reference's exp(-5·(1 - e/λ)²) with λ = 0.1 (ramping over λ, not E_r) is 0.1·exp(-405) < 1e-100 at
    # epoch 1: the terms would be off. Ramping over the epochs keeps them on from the start.
    assert dmt.rampup_weight(1) > dmt.rampup_weight(0) > 1e-4


def test_mean_teacher_loss_has_every_term_of_the_formula() -> None:
    # Three peers: with two, KL to the mean of the others' teachers equals the mean of the KLs to them, and
    # a swapped w or a dropped ensemble term would go unnoticed.
    torch.manual_seed(3)
    s = [torch.randn(4, 4, requires_grad=True) for _ in range(3)]
    m = [torch.randn(4, 4) for _ in range(3)]
    y = torch.randint(0, 4, (4,))
    dmt = DecoupledMeanTeacher([_net(0), _net(2), _net(4)], [_net(1), _net(3), _net(5)], rampup_epochs=4)
    epoch, T = 1, 3.0
    r, w = dmt.rampup_weight(epoch), dmt.ensemble_weight(epoch)
    assert 0 < w < 1 and w != 0.5
    ens = torch.stack([z.detach() for z in s]).mean(0)  # (B, C): the students' mean
    got = dmt.losses(s, m, y, epoch)
    for k in range(3):
        others = [m[j] for j in range(3) if j != k]
        ensemble = _kl((others[0] + others[1]) / 2, s[k], T)  # KL to the mean of the others' teachers
        individual = (_kl(others[0], s[k], T) + _kl(others[1], s[k], T)) / 2  # mean of the KLs to each
        assert not torch.allclose(ensemble, individual)
        expected = F.cross_entropy(s[k], y) + r * _kl(ens, s[k], T) + r * (w * ensemble + (1 - w) * individual)
        torch.testing.assert_close(got[k], expected)
