"""Feature and relation losses against values worked out by hand (numbers in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from student_client import (
    AttentionTransferLoss,
    ConfigError,
    HintLoss,
    InProcessTeacher,
    KDLoss,
    OutputSpec,
    RKDLoss,
    SimilarityPreservingLoss,
    SourceRequest,
    attention_transfer_loss,
    hint_loss,
    rkd_loss,
    similarity_preserving_loss,
)
from student_client.outputs import dense_answer


def test_hint_loss_by_hand():
    s, t = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    assert hint_loss(s, t).item() == pytest.approx((1 + 4) / 2)  # mean of squared differences
    assert hint_loss(s, t, reduction="sum").item() == pytest.approx(5.0)
    r = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[2.0, -1.0]]))  # r(s) = 2·1 − 2 = 0
    assert hint_loss(s, torch.tensor([[3.0]]), r).item() == pytest.approx(9.0)


def test_hint_module_trains_its_regressor_to_fit_the_teacher():
    torch.manual_seed(0)
    hint = HintLoss(3, 5, teacher_output="layer3", student_output="s3")
    assert hint.needs == (OutputSpec("layer3", "raw"),)
    proj = torch.randn(5, 3)
    s = torch.randn(8, 3, 4, 4)
    t = torch.einsum("oc,bchw->bohw", proj, s)  # a teacher the 1x1 regressor can match exactly
    opt = torch.optim.Adam(hint.parameters(), lr=0.05)
    first = None
    for _ in range(300):
        loss = hint({"s3": s}, {"layer3": dense_answer(t)})
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first


def test_attention_map_and_loss_by_hand():
    s = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])  # (1, 2, 1, 2): mean_c s² = [1, 2] -> [1, 2]/√5
    t = torch.tensor([[[[2.0, 0.0]]]])  # (1, 1, 1, 2): [4, 0] -> [1, 0]
    # ((1/√5 − 1)² + (2/√5)²) / 2 = 1 − 1/√5
    assert attention_transfer_loss(s, t).item() == pytest.approx(1 - 1 / math.sqrt(5))
    # (B, C, L) maps (1-D convolutions) work the same way
    assert attention_transfer_loss(s[:, :, 0], t[:, :, 0]).item() == pytest.approx(1 - 1 / math.sqrt(5))
    assert attention_transfer_loss(3 * s, s).item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    with pytest.raises(ConfigError, match="share batch and spatial sizes"):
        attention_transfer_loss(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2))


def _rkd_by_hand(s_pts, t_pts):
    """RKD-D and RKD-A written out with loops over pairs and triplets (Park et al. eqs. 4-7)."""
    def dist(a, b):
        return math.dist(a, b)

    def huber(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    n = len(s_pts)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum(dist(s_pts[i], s_pts[j]) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t_pts[i], t_pts[j]) for i, j in pairs) / len(pairs)
    l_d = sum(huber(dist(s_pts[i], s_pts[j]) / mu_s - dist(t_pts[i], t_pts[j]) / mu_t) for i, j in pairs) / n ** 2

    def cos(p, i, j, k):
        if i == j or k == j:
            return 0.0
        a = [p[i][d] - p[j][d] for d in range(2)]
        b = [p[k][d] - p[j][d] for d in range(2)]
        return (a[0] * b[0] + a[1] * b[1]) / (math.hypot(*a) * math.hypot(*b))

    l_a = sum(huber(cos(s_pts, i, j, k) - cos(t_pts, i, j, k))
              for i in range(n) for j in range(n) for k in range(n)) / n ** 3
    return l_d, l_a


def test_rkd_by_hand():
    t_pts = [(0.0, 0.0), (3.0, 0.0), (0.0, 4.0)]  # distances 3, 4, 5 (mean 4)
    s_pts = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]
    l_d, l_a = _rkd_by_hand(s_pts, t_pts)
    s, t = torch.tensor(s_pts, dtype=torch.float64), torch.tensor(t_pts, dtype=torch.float64)
    assert rkd_loss(s, t, 1.0, 0.0).item() == pytest.approx(l_d, rel=1e-6)
    assert rkd_loss(s, t, 0.0, 1.0).item() == pytest.approx(l_a, rel=1e-6)
    assert rkd_loss(s, t).item() == pytest.approx(25 * l_d + 50 * l_a, rel=1e-6)
    # relations only: a scaled, rotated, shifted copy of the teacher costs nothing
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    assert rkd_loss(2.5 * t @ rot + 7, t).item() == pytest.approx(0.0, abs=1e-9)


def test_similarity_preserving_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # G = I, rows already unit
    t = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # G = 2·ones -> rows (1/√2, 1/√2)
    # (2·(1 − 1/√2)² + 2·(1/√2)²) / 2² = 1 − 1/√2
    assert similarity_preserving_loss(s, t).item() == pytest.approx(1 - 1 / math.sqrt(2))
    # student and teacher widths may differ; (B, C, H, W) maps are flattened to (B, C·H·W)
    torch.manual_seed(0)
    s4, t2 = torch.randn(4, 3, 2, 2), torch.randn(4, 7)

    def normalised_gram(a: torch.Tensor) -> torch.Tensor:  # (4, 4): a·aᵀ of the flat rows, each row L2-normalised
        flat = a.reshape(4, -1)  # (4, 12) student, (4, 7) teacher
        g = flat @ flat.t()
        return g / g.norm(dim=1, keepdim=True)

    expected = (normalised_gram(t2) - normalised_gram(s4)).pow(2).sum() / 4**2
    assert similarity_preserving_loss(s4, t2).item() == pytest.approx(expected.item(), rel=1e-5)


def test_modules_state_their_needs_and_combine_with_kd():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU())
    x = torch.randn(6, 1, 10)
    with torch.inference_mode():  # as an in-process teacher answers (inference tensors)
        feat = teacher(x)
        logits = feat.mean(-1)
    answers = {"feat": dense_answer(feat), "logits": dense_answer(torch.log_softmax(logits / 4, -1), "log_probs", 4.0)}
    criterion = (KDLoss(4.0) + 500 * AttentionTransferLoss("feat", "s_feat") + RKDLoss("feat", "s_emb")
                 + 3000 * SimilarityPreservingLoss("feat", "s_feat")
                 + HintLoss(2, 4, teacher_output="feat", student_output="s_feat", adapter="conv1d"))
    assert [s.name for s in criterion.needs] == ["logits", "feat"]  # one request for "feat"
    s_feat = torch.randn(6, 2, 10, requires_grad=True)
    student = {"logits": torch.randn(6, 4, requires_grad=True), "s_feat": s_feat, "s_emb": s_feat.mean(1)}
    loss = criterion(student, answers)
    loss.backward()
    assert torch.isfinite(loss) and s_feat.grad is not None and s_feat.grad.abs().sum() > 0


def test_feature_answers_must_be_dense():
    from student_client import TopK

    top = TopK(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), (2, 3))
    with pytest.raises(ConfigError, match="needs the dense teacher activation 'f'"):
        AttentionTransferLoss("f")(torch.ones(2, 1, 3), {"f": top})
    with pytest.raises(ConfigError, match="at least 2 samples"):
        rkd_loss(torch.ones(1, 3), torch.ones(1, 3))


def test_in_process_features_backpropagate():
    """An in-process teacher's inference-mode activation as the hint target (the loss clones it)."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    answer = InProcessTeacher(net, ["logits"]).submit(SourceRequest({"": torch.randn(5, 4)})).result()
    s = torch.randn(5, 3, requires_grad=True)
    SimilarityPreservingLoss("logits", "s")({"s": s}, answer).backward()
    assert s.grad is not None
