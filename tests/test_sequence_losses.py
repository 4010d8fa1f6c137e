"""sequence_kd_loss / SequenceKDLoss: against a dense reference, k = V, hand-computed values, masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from student_client import ConfigError, OutputSpec
from student_client.losses import SequenceKDLoss, sequence_kd_loss
from student_client.outputs import Sampled, apply_spec, dense_answer

B, L, V = 2, 5, 11
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]


def _logits(seed: int, shape=(B, L, V)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * 2


def reference(s: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, divergence: str, beta: float,
              T: float = 1.0) -> torch.Tensor:
    """The TRL GKD formula on full (B, L, V) tensors in float64, mean over valid positions."""
    log_p = F.log_softmax(s.double() / T, -1)
    q = q.double()
    log_q = q.log()
    p = log_p.exp()

    def kl(a, log_a, log_b):  # KL(a ‖ b) per position, 0·log 0 = 0
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        d = kl(q, log_q, log_p)
    elif divergence == "reverse_kl" or beta == 1:
        d = kl(p, log_p, log_q)
    else:
        log_m = (beta * q + (1 - beta) * p).log()
        d = beta * kl(q, log_q, log_m) + (1 - beta) * kl(p, log_p, log_m)
    return d[valid].mean()


@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_dense_teacher_equals_the_reference(divergence: str, beta: float, T: float) -> None:
    s, t = _logits(0), _logits(1)
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(2))
    labels[0, 3:] = -100
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[1, 0] = 0
    valid = (labels != -100) & mask.bool()
    want = reference(s, F.softmax(t / T, -1), valid, divergence, beta, T)
    for teacher, temperature in [(t, T), (dense_answer(F.log_softmax(t / T, -1), "log_probs", T), None),
                                 (dense_answer(F.softmax(t / T, -1), "probs", T), T)]:
        got = sequence_kd_loss(s, teacher, labels=labels, mask=mask, temperature=temperature,
                               divergence=divergence, beta=beta)
        assert abs(got.item() - want.item()) < 1e-5, (got, want)


@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
@pytest.mark.parametrize("tail", [True, False])
def test_top_k_with_k_equal_to_v_is_the_full_vocabulary_value(divergence: str, beta: float, tail: bool) -> None:
    s, t = _logits(3), _logits(4)
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[0, -2:] = 0
    spec = OutputSpec("logits", "log_probs", 1.5, top_k=V, tail=tail, mask="m")
    teacher = apply_spec(t, spec, {"m": mask})
    full = sequence_kd_loss(s, t, mask=mask, temperature=1.5, divergence=divergence, beta=beta)
    got = sequence_kd_loss(s, teacher, temperature=1.5, divergence=divergence, beta=beta)  # the answer's mask
    assert abs(got.item() - full.item()) < 1e-5


@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
def test_top_k_is_the_divergence_over_kept_tokens_plus_one_tail_bucket(divergence: str, beta: float) -> None:
    s, t = _logits(5), _logits(6)
    k = 3
    teacher = apply_spec(t, OutputSpec("logits", "log_probs", 1.0, top_k=k, tail=True, mask="m"),
                         {"m": torch.ones(B, L)})
    # reference: merge every token outside the teacher's top-k into one class, on both sides
    q, p = F.softmax(t.double(), -1), F.softmax(s.double(), -1)
    keep = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, teacher.indices, True)
    q_bins = torch.cat([q.gather(-1, teacher.indices), (q * ~keep).sum(-1, keepdim=True)], -1)
    p_bins = torch.cat([p.gather(-1, teacher.indices), (p * ~keep).sum(-1, keepdim=True)], -1)
    want = reference(p_bins.log(), q_bins, torch.ones(B, L, dtype=torch.bool), divergence, beta)
    got = sequence_kd_loss(s, teacher, divergence=divergence, beta=beta)
    assert abs(got.item() - want.item()) < 1e-5
    assert got.item() <= sequence_kd_loss(s, t, divergence=divergence, beta=beta).item() + 1e-6  # never above full


def test_hand_computed_forward_and_reverse_kl() -> None:
    # one position, V = 2: teacher q = (0.75, 0.25), student logits (0, 0) -> p = (0.5, 0.5)
    s = torch.zeros(1, 1, 2)
    q = torch.tensor([[[0.75, 0.25]]])
    forward = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812...
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # 0.143841...
    m = (0.625, 0.375)  # β = 0.5
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    teacher = dense_answer(q, "probs", 1.0)
    assert sequence_kd_loss(s, teacher).item() == pytest.approx(forward, abs=1e-6)
    assert sequence_kd_loss(s, teacher, divergence="reverse_kl").item() == pytest.approx(reverse, abs=1e-6)
    assert sequence_kd_loss(s, teacher, divergence="jsd").item() == pytest.approx(jsd, abs=1e-6)


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.9)])
def test_sampled_teacher_is_its_empirical_distribution(divergence: str, beta: float) -> None:
    s, t = _logits(7), _logits(8)
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[1, 2] = 0
    teacher = apply_spec(t, OutputSpec("logits", "log_probs", 1.0, sample=6, seed=3, mask="m"), {"m": mask})
    assert isinstance(teacher, Sampled)
    q_hat = teacher.dense()  # count / S
    want = reference(s, q_hat, mask.bool(), divergence, beta)
    assert abs(sequence_kd_loss(s, teacher, divergence=divergence, beta=beta).item() - want.item()) < 1e-5


def test_masked_positions_get_no_gradient_and_do_not_change_the_loss() -> None:
    t = _logits(9)
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[:, 3:] = 0
    s = _logits(10).requires_grad_()
    loss = sequence_kd_loss(s, t, mask=mask, divergence="jsd")
    loss.backward()
    assert s.grad[:, 3:].abs().max() == 0 and s.grad[:, :3].abs().max() > 0
    other = s.detach().clone()
    other[:, 3:] = 100.0
    assert sequence_kd_loss(other, t, mask=mask, divergence="jsd").item() == pytest.approx(loss.item(), abs=1e-7)
    assert sequence_kd_loss(s, t, mask=torch.zeros(B, L)).item() == 0.0  # nothing valid: 0, not NaN


def test_chunking_changes_neither_the_value_nor_the_gradient() -> None:
    t = _logits(11)
    grads = []
    values = []
    for chunk in (None, 1, 3):
        s = _logits(12).requires_grad_()
        loss = sequence_kd_loss(s, t, divergence="reverse_kl", chunk_tokens=chunk)
        loss.backward()
        values.append(loss.item())
        grads.append(s.grad)
    assert max(values) - min(values) < 1e-6
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])


def test_what_a_teacher_cannot_give_is_refused() -> None:
    s, t = _logits(13), _logits(14)
    sampled = apply_spec(t, OutputSpec("logits", "log_probs", sample=4, mask="m"), {"m": torch.ones(B, L)})
    with pytest.raises(ConfigError, match="sampled teacher gives only its draws"):
        sequence_kd_loss(s, sampled, divergence="reverse_kl")
    with pytest.raises(ConfigError, match="divergence must be one of"):
        sequence_kd_loss(s, t, divergence="tv")
    with pytest.raises(ConfigError, match="beta must be a number in"):
        sequence_kd_loss(s, t, divergence="jsd", beta=1.5)
    with pytest.raises(ConfigError, match="does not match the logits' positions"):
        sequence_kd_loss(s, t, mask=torch.ones(B, L + 1))
    with pytest.raises(ConfigError, match="drawn at temperature 1.0, the loss uses 2.0"):
        sequence_kd_loss(s, sampled, temperature=2.0)


def test_the_loss_module_requests_what_it_reads() -> None:
    kd = SequenceKDLoss(temperature=2.0, top_k=8, divergence="jsd", beta=0.3)
    (spec,) = kd.needs
    assert (spec.top_k, spec.tail, spec.mask, spec.transform, spec.temperature) == (8, True, "attention_mask",
                                                                                    "log_probs", 2.0)
    s, t = _logits(15), _logits(16)
    mask = torch.ones(B, L, dtype=torch.int64)
    teacher = apply_spec(t, spec, {"attention_mask": mask})
    labels = torch.zeros(B, L, dtype=torch.long)
    labels[0, 0] = -100
    got = kd(s, {"logits": teacher}, labels=labels)
    assert got.item() == pytest.approx(sequence_kd_loss(s, teacher, labels=labels, temperature=2.0,
                                                        divergence="jsd", beta=0.3).item())
    assert SequenceKDLoss(top_k=0).needs[0].mask == ""  # dense: every position
