"""Hinton KD and CE losses: golden values, equivalences between forms, gradients, errors.

Golden values were computed once in float64 numpy straight from the formulas
in ``student_client.losses.response`` (independent of torch) and are pasted
here; :func:`_kd_ref` and :func:`_ce_ref` recompute them with plain Python
float math, so the pasted numbers are checked too.
"""

from __future__ import annotations

import math

import pytest
import torch

from student_client import ConfigError, KDLoss, OutputSpec, TopK, kd_loss
from student_client.losses import CELoss
from student_client.outputs import Dense, apply_spec, dense_answer

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


def _log_softmax(row: list[float], T: float) -> list[float]:
    z = [x / T for x in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def _kd_ref(s: list[float], t: list[float], T: float) -> float:
    """T²·Σ q (log q − log p) for one row, q = softmax(t/T), p = softmax(s/T)."""
    log_p, log_q = _log_softmax(s, T), _log_softmax(t, T)
    return T * T * sum(math.exp(lq) * (lq - lp) for lq, lp in zip(log_q, log_p))


def _ce_ref(s: list[float], y: int) -> float:
    return -_log_softmax(s, 1.0)[y]


@pytest.mark.parametrize("T, kd, rows, total", GOLDEN)
def test_dense_golden_values(T, kd, rows, total):
    ref_rows = [_kd_ref(s, t, T) for s, t in zip(S.tolist(), T_LOGITS.tolist())]
    ref_ce = [_ce_ref(s, y) for s, y in zip(S.tolist(), Y.tolist())]
    assert ref_rows == pytest.approx(rows, rel=1e-6)
    assert sum(ref_rows) / 2 + 0.5 * sum(ref_ce) / 2 == pytest.approx(total, rel=1e-12)
    assert kd_loss(S, T_LOGITS, temperature=T).item() == pytest.approx(kd, rel=1e-9)
    assert kd_loss(S, T_LOGITS, temperature=T, reduction="none").tolist() == pytest.approx(rows, rel=1e-6)
    assert kd_loss(S, T_LOGITS, temperature=T, reduction="sum").item() == pytest.approx(2 * kd, rel=1e-9)
    assert kd_loss(S, T_LOGITS, temperature=T, labels=Y, ce_weight=0.5).item() == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("transform", ["probs", "log_probs"])
def test_a_dense_answer_brings_its_own_transform_and_temperature(T, transform):
    teacher = apply_spec(T_LOGITS, OutputSpec(transform=transform, temperature=T))  # float32, as served
    assert isinstance(teacher, Dense) and (teacher.transform, teacher.temperature) == (transform, T)
    expected = dict((g[0], g[1]) for g in GOLDEN)[T]
    assert kd_loss(S.float(), teacher).item() == pytest.approx(expected, rel=1e-5)  # T stated once
    assert kd_loss(S.float(), teacher, temperature=T).item() == pytest.approx(expected, rel=1e-5)
    # The same values as a plain tensor need the transform and T said again.
    plain = teacher.as_subclass(torch.Tensor)
    assert kd_loss(S.float(), plain, temperature=T, teacher_transform=transform).item() == pytest.approx(
        expected, rel=1e-5)


def test_raw_logits_may_be_softened_at_any_temperature():
    raw = apply_spec(T_LOGITS, OutputSpec(transform="raw", temperature=3.0))
    assert (raw.transform, raw.temperature) == ("raw", 1.0)  # nothing was applied
    assert kd_loss(S, raw, temperature=4.0).item() == pytest.approx(GOLDEN[1][1], rel=1e-6)
    assert kd_loss(S, raw).item() == pytest.approx(GOLDEN[0][1], rel=1e-6)  # its own T: 1.0


@pytest.mark.parametrize("top_k", [0, 2])
def test_a_temperature_other_than_the_answers_is_refused_naming_both(top_k):
    teacher = apply_spec(T_LOGITS, OutputSpec(transform="log_probs", temperature=2.0, top_k=top_k))
    with pytest.raises(ConfigError, match=r"computed at temperature 2\.0, the loss uses 4\.0"):
        kd_loss(S, teacher, temperature=4.0)


def test_teacher_transform_must_agree_with_an_answers_own():
    teacher = apply_spec(T_LOGITS, OutputSpec(transform="probs", temperature=2.0))
    assert kd_loss(S, teacher, teacher_transform="probs").item() == pytest.approx(
        kd_loss(S, teacher).item())
    with pytest.raises(ConfigError, match="teacher_transform='raw', but the teacher answer holds probs"):
        kd_loss(S, teacher, teacher_transform="raw")


def test_topk_golden_values():
    probs = apply_spec(T_LOGITS, OutputSpec(transform="probs", temperature=2.0, top_k=2, dtype="float32"))
    raw = apply_spec(T_LOGITS, OutputSpec(transform="raw", top_k=2))
    assert kd_loss(S.float(), probs).item() == pytest.approx(GOLDEN_TOPK2_PROBS_T2, rel=1e-5)
    assert kd_loss(S.float(), raw, temperature=2.0).item() == pytest.approx(GOLDEN_TOPK2_RAW_T2, rel=1e-5)


def test_topk_raw_golden_by_hand():
    """Raw top-2: q renormalised over the 2 kept logits, against the student's full log p."""
    T, total = 2.0, 0.0
    for s, t in zip(S.tolist(), T_LOGITS.tolist()):
        keep = sorted(range(4), key=lambda i: -t[i])[:2]
        log_q = _log_softmax([t[i] for i in keep], T)
        log_p = _log_softmax(s, T)
        total += T * T * sum(math.exp(lq) * (lq - log_p[i]) for lq, i in zip(log_q, keep))
    assert total / 2 == pytest.approx(GOLDEN_TOPK2_RAW_T2, rel=1e-12)


@pytest.mark.parametrize("transform", ["probs", "log_probs"])
def test_topk_with_k_equal_c_is_the_dense_loss(transform):
    full = apply_spec(T_LOGITS, OutputSpec(transform=transform, temperature=3.0, top_k=4))
    dense = apply_spec(T_LOGITS, OutputSpec(transform=transform, temperature=3.0))
    assert isinstance(full, TopK) and isinstance(dense, Dense)
    assert kd_loss(S.float(), full).item() == pytest.approx(kd_loss(S.float(), dense).item(), rel=1e-5)
    assert kd_loss(S.float(), full).item() == pytest.approx(
        kd_loss(S.float(), T_LOGITS.float(), temperature=3.0).item(), rel=1e-5)


def test_topk_loss_is_a_lower_bound_of_the_dense_loss_and_zero_at_the_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    for k in (1, 3, 9):
        tk = apply_spec(t, OutputSpec(transform="log_probs", temperature=2.0, top_k=k))
        assert kd_loss(s, tk, reduction="none").le(kd_loss(s, t, temperature=2.0, reduction="none") + 1e-5).all()
        assert kd_loss(t, tk).abs().item() < 1e-5  # the teacher itself as student


def test_dense_loss_is_zero_when_student_equals_teacher():
    assert kd_loss(T_LOGITS, T_LOGITS, temperature=2.5).item() == pytest.approx(0.0, abs=1e-12)


def test_leading_dims_are_samples():
    torch.manual_seed(1)
    s, t, y = torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    rows = kd_loss(s, t, temperature=2.0, labels=y, ce_weight=1.0, reduction="none")
    assert rows.shape == (2, 5)
    flat = kd_loss(s.reshape(10, 7), t.reshape(10, 7), temperature=2.0, labels=y.reshape(10), ce_weight=1.0)
    assert rows.mean().item() == pytest.approx(flat.item(), rel=1e-6)


# --- the CE term over partly labelled batches ---------------------------------------------------

S3 = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.1, -1.2], [0.0, 2.0, 1.0]], dtype=torch.float64)  # (3, 3)
T3 = torch.tensor([[2.0, 0.0, 1.0], [-0.5, 1.5, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("labels", [[0, 2, 1], [0, -100, 1], [-100, -100, -100]],
                         ids=["all-labelled", "partly-labelled", "none-labelled"])
def test_ce_is_averaged_over_the_labelled_rows_only(labels):
    T, lam = 2.0, 0.5
    kd_rows = [_kd_ref(s, t, T) for s, t in zip(S3.tolist(), T3.tolist())]
    ce_rows = [_ce_ref(s, y) if y != -100 else 0.0 for s, y in zip(S3.tolist(), labels)]
    n = sum(y != -100 for y in labels)
    expected = sum(kd_rows) / 3 + lam * (sum(ce_rows) / n if n else 0.0)  # KD on all rows, CE on labelled ones
    y = torch.tensor(labels)
    s = S3.clone().requires_grad_(True)
    loss = kd_loss(s, T3, temperature=T, labels=y, ce_weight=lam)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    rows = kd_loss(S3, T3, temperature=T, labels=y, ce_weight=lam, reduction="none")
    assert rows.tolist() == pytest.approx([k + lam * c for k, c in zip(kd_rows, ce_rows)], rel=1e-12)
    total = kd_loss(S3, T3, temperature=T, labels=y, ce_weight=lam, reduction="sum")
    assert total.item() == pytest.approx(sum(kd_rows) + lam * sum(ce_rows), rel=1e-12)
    ce = CELoss()(S3, None, y)
    assert ce.item() == pytest.approx(sum(ce_rows) / n if n else 0.0, rel=1e-12) and torch.isfinite(ce)


def test_ignore_index_is_configurable():
    y = torch.tensor([0, -1, 1])
    assert kd_loss(S3, T3, temperature=2.0, labels=y, ce_weight=1.0, ignore_index=-1).item() == pytest.approx(
        kd_loss(S3, T3, temperature=2.0, labels=torch.tensor([0, -100, 1]), ce_weight=1.0).item(), rel=1e-12)
    assert CELoss(ignore_index=-1)(S3, None, y).item() == pytest.approx((_ce_ref(S3[0].tolist(), 0)
                                                                          + _ce_ref(S3[2].tolist(), 1)) / 2)


@pytest.mark.parametrize("teacher", [
    T_LOGITS,
    dense_answer(torch.log_softmax(T_LOGITS / 2.0, -1), "log_probs", 2.0),
    TopK(*torch.topk(torch.log_softmax(T_LOGITS / 2.0, -1), 2, dim=-1), (2, 4), "log_probs", 2.0),
    TopK(*torch.topk(torch.softmax(T_LOGITS / 2.0, -1), 4, dim=-1), (2, 4), "probs", 2.0),
    TopK(*torch.topk(T_LOGITS, 2, dim=-1), (2, 4), "raw", 1.0),
], ids=["plain", "dense-log_probs", "topk-log_probs", "topk-probs-k=C", "topk-raw"])
def test_gradcheck(teacher):
    s = S.clone().requires_grad_(True)
    labels = torch.tensor([2, -100])  # one labelled row: the CE mean's denominator is in the graph too
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, teacher, temperature=2.0, labels=labels, ce_weight=0.3), (s,), eps=1e-6, atol=1e-6)


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
    (lambda: kd_loss(S, {"logits": T_LOGITS}), r"teacher\['logits'\]"),
    (lambda: kd_loss(S, T_LOGITS, labels=Y[:1], ce_weight=1.0), "labels of shape"),
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
