"""Hinton KD losses: golden values, equivalences between forms, gradients, errors.

Golden values were computed once in float64 numpy straight from the formulas
in ``student_client.losses`` (independent of torch) and are pasted here.
"""

from __future__ import annotations

import pytest
import torch

from student_client import ConfigError, KDLoss, OutputSpec, TopK, TopKKDLoss, kd_loss, kd_loss_dense, kd_loss_topk
from student_client.outputs import apply_spec

S = torch.tensor([[1.0, -0.5, 2.0, 0.0], [0.3, 0.1, -1.2, 2.2]], dtype=torch.float64)  # (B=2, C=4) student logits
T_LOGITS = torch.tensor([[2.0, 0.0, 1.0, -1.0], [-0.5, 1.5, 0.0, 1.0]], dtype=torch.float64)  # teacher logits
Y = torch.tensor([2, 3])

# (temperature, T²·KL mean, per-row T²·KL, T²·KL + 0.5·CE mean)
GOLDEN = [
    (1.0, 0.5766898667678346, [0.43912879, 0.71425095], 0.7585102936300738),
    (4.0, 0.5621681265258615, [0.4212467, 0.70308955], 0.7439885533881008),
]
GOLDEN_TOPK2_PROBS_T2 = 0.46226784303150237  # top-2 probs + tail bucket, T=2
GOLDEN_TOPK2_RAW_T2 = 2.0420698507261017  # top-2 raw logits renormalised, T=2


@pytest.mark.parametrize("T, kd, rows, total", GOLDEN)
def test_dense_golden_values(T, kd, rows, total):
    assert kd_loss(S, T_LOGITS, temperature=T).item() == pytest.approx(kd, rel=1e-9)
    assert kd_loss(S, T_LOGITS, temperature=T, reduction="none").tolist() == pytest.approx(rows, rel=1e-6)
    assert kd_loss(S, T_LOGITS, temperature=T, reduction="sum").item() == pytest.approx(2 * kd, rel=1e-9)
    assert kd_loss(S, T_LOGITS, temperature=T, labels=Y, ce_weight=0.5).item() == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("transform", ["probs", "log_probs"])
def test_dense_probs_and_log_probs_agree_with_logits(T, transform):
    teacher = apply_spec(T_LOGITS, OutputSpec(transform=transform, temperature=T))  # float32, as served
    got = kd_loss(S.float(), teacher, temperature=T, teacher_transform=transform)
    assert got.item() == pytest.approx(dict((g[0], g[1]) for g in GOLDEN)[T], rel=1e-5)


def test_topk_golden_values():
    probs = apply_spec(T_LOGITS, OutputSpec(transform="probs", temperature=2.0, top_k=2, dtype="float32"))
    raw = apply_spec(T_LOGITS, OutputSpec(transform="raw", top_k=2))
    assert kd_loss(S.float(), probs, temperature=2.0).item() == pytest.approx(GOLDEN_TOPK2_PROBS_T2, rel=1e-5)
    assert kd_loss(S.float(), raw, temperature=2.0).item() == pytest.approx(GOLDEN_TOPK2_RAW_T2, rel=1e-5)


@pytest.mark.parametrize("transform", ["probs", "log_probs"])
def test_topk_with_k_equal_c_is_the_dense_loss(transform):
    full = apply_spec(T_LOGITS, OutputSpec(transform=transform, temperature=3.0, top_k=4))
    dense = kd_loss_dense(S.float(), T_LOGITS.float(), temperature=3.0)
    assert kd_loss_topk(S.float(), full, temperature=3.0).item() == pytest.approx(dense.item(), rel=1e-5)


def test_topk_loss_is_a_lower_bound_of_the_dense_loss_and_zero_at_the_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    for k in (1, 3, 9):
        tk = apply_spec(t, OutputSpec(transform="log_probs", temperature=2.0, top_k=k))
        assert kd_loss(s, tk, temperature=2.0, reduction="none").le(
            kd_loss(s, t, temperature=2.0, reduction="none") + 1e-5).all()
        assert kd_loss(t, tk, temperature=2.0).abs().item() < 1e-5  # the teacher itself as student


def test_dense_loss_is_zero_when_student_equals_teacher():
    assert kd_loss(T_LOGITS, T_LOGITS, temperature=2.5).item() == pytest.approx(0.0, abs=1e-12)


def test_leading_dims_are_samples():
    torch.manual_seed(1)
    s, t, y = torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    rows = kd_loss(s, t, temperature=2.0, labels=y, ce_weight=1.0, reduction="none")
    assert rows.shape == (2, 5)
    flat = kd_loss(s.reshape(10, 7), t.reshape(10, 7), temperature=2.0, labels=y.reshape(10), ce_weight=1.0)
    assert rows.mean().item() == pytest.approx(flat.item(), rel=1e-6)


@pytest.mark.parametrize("teacher", [
    T_LOGITS,
    TopK(*torch.topk(torch.log_softmax(T_LOGITS / 2.0, -1), 2, dim=-1), (2, 4), "log_probs", 2.0),
    TopK(*torch.topk(torch.softmax(T_LOGITS / 2.0, -1), 4, dim=-1), (2, 4), "probs", 2.0),
    TopK(*torch.topk(T_LOGITS, 2, dim=-1), (2, 4), "raw", 1.0),
], ids=["dense", "topk-log_probs", "topk-probs-k=C", "topk-raw"])
def test_gradcheck(teacher):
    s = S.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, teacher, temperature=2.0, labels=Y, ce_weight=0.3), (s,), eps=1e-6, atol=1e-6)


def test_gradient_scale_is_kept_by_t_squared():
    """Hinton's T² factor: the soft-target gradient does not vanish as T grows."""
    torch.manual_seed(2)
    s0, t = torch.randn(64, 10, dtype=torch.float64), torch.randn(64, 10, dtype=torch.float64) * 3
    norms = []
    for T in (2.0, 8.0, 32.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, temperature=T).backward()
        norms.append(s.grad.norm().item())
    # grad ≈ (1/N)(softmax(s/T) − softmax(t/T))·T → (s − t)/(C·N) as T → ∞: converges, not 1/T² decay
    assert norms[2] == pytest.approx(norms[1], rel=0.1)


def test_module_wrappers_match_the_functions():
    tk = apply_spec(T_LOGITS, OutputSpec(transform="probs", temperature=2.0, top_k=2))
    crit = KDLoss(temperature=2.0, ce_weight=0.5)
    assert crit(S.float(), T_LOGITS.float(), Y).item() == pytest.approx(
        kd_loss(S.float(), T_LOGITS.float(), temperature=2.0, labels=Y, ce_weight=0.5).item())
    assert TopKKDLoss(temperature=2.0)(S.float(), tk).item() == pytest.approx(GOLDEN_TOPK2_PROBS_T2, rel=1e-5)
    with pytest.raises(ConfigError, match="dense teacher output"):
        TopKKDLoss(temperature=2.0)(S, T_LOGITS)
    assert "temperature=2.0" in repr(crit)


def test_half_precision_student_is_computed_in_float32():
    loss = kd_loss(S.half(), T_LOGITS.half(), temperature=4.0)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(GOLDEN[1][1], rel=1e-2)


@pytest.mark.parametrize("call, match", [
    (lambda: kd_loss(S, T_LOGITS, temperature=0.0), "temperature"),
    (lambda: kd_loss(S, T_LOGITS, ce_weight=-1.0, labels=Y), "ce_weight"),
    (lambda: kd_loss(S, T_LOGITS, ce_weight=1.0), "needs labels"),
    (lambda: kd_loss(S, T_LOGITS, reduction="batchmean"), "reduction"),
    (lambda: kd_loss(S, T_LOGITS[:, :3]), "shape"),
    (lambda: kd_loss(S, T_LOGITS, teacher_transform="softmax"), "teacher_transform"),
    (lambda: kd_loss(S, apply_spec(T_LOGITS, OutputSpec(transform="probs", temperature=2.0, top_k=2)),
                     temperature=4.0), "temperature 2.0"),
    (lambda: kd_loss(S[:, :3], apply_spec(T_LOGITS, OutputSpec(top_k=2))), "dense shape"),
])
def test_errors_name_the_problem(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize("kwargs, match", [
    (dict(transform="softmax"), "transform"), (dict(temperature=0), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(dtype="float64"), "dtype"), (dict(name=""), "name"),
])
def test_output_spec_validates(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        OutputSpec(**kwargs)


def test_topk_dense_fill_defaults():
    tk = apply_spec(T_LOGITS, OutputSpec(transform="probs", top_k=2))
    d = tk.dense()
    assert d.shape == (2, 4) and (d == 0).sum() == 4 and torch.allclose(d.gather(-1, tk.indices), tk.values)
    assert tk.dense(fill=-1.0).min() == -1.0
