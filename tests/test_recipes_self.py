"""Self-distillation recipes on their defining properties: PS-KD, BYOT, born-again generations.

PS-KD: through a real DistillReader over a shuffling DataLoader, every
sample's target is built from that sample's own previous-epoch prediction
(each sample's observed prediction is unique, so a mix-up shows).
BYOT: heads on forward hooks leave the model's output untouched, learn from
the deepest head (never the reverse) and come off cleanly. Born-again: the
next generation is taught by the previous one's frozen weights, in process
and through a real teacher server, with identical answers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from student_client import ConfigError, DistillReader, SourceRequest
from student_client.recipes import BYOT, PSKD, BornAgain, PastPredictions

N, C = 40, 5


def _table(seed: int) -> torch.Tensor:
    """A distinct made-up 'prediction' (logits) for every sample id: (N, C)."""
    return torch.randn(N, C, generator=torch.Generator().manual_seed(seed)) * 3


# ---------------------------------------------------------------- PS-KD


def test_pskd_target_is_built_from_the_samples_own_previous_epoch_prediction_under_shuffling() -> None:
    ids = torch.arange(N)
    labels = ids % C
    loader = DataLoader(TensorDataset(ids.float().unsqueeze(1), labels), batch_size=7, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    tables = [_table(e) for e in range(3)]  # what the "model" predicts for each sample in epoch e
    pskd = PSKD(epochs=3)
    orders = []
    checked = 0
    with DistillReader(loader, pskd.source) as reader:
        for epoch in range(3):
            pskd.start_epoch(epoch)
            order = []
            for (x, y), past in reader:
                sid = x[:, 0].long()  # (B,) the samples in this batch, in shuffled order
                order.extend(sid.tolist())
                target = pskd.targets(past, y, C)
                onehot = F.one_hot(y, C).float()
                if epoch == 0:
                    torch.testing.assert_close(target, onehot)  # α_0 = 0, nothing observed yet
                else:
                    alpha = 0.8 * epoch / 3
                    own_prev = F.softmax(tables[epoch - 1][sid], -1)
                    torch.testing.assert_close(target, (1 - alpha) * onehot + alpha * own_prev)
                    checked += len(sid)
                reader.observe(tables[epoch][sid])  # this epoch's predictions of these samples
            orders.append(order)
    assert checked == 2 * N
    assert orders[0] != orders[1] != orders[2]  # the batches really were shuffled


def test_pskd_loss_is_the_soft_target_cross_entropy_and_alpha_follows_the_schedule() -> None:
    pskd = PSKD(epochs=10, alpha_T=0.8)
    pskd.start_epoch(5)
    assert pskd.alpha == pytest.approx(0.4)
    logits = torch.randn(3, C, requires_grad=True)
    keys = [0, 1, 2]
    pskd.source.observe(keys, torch.randn(3, C))
    pskd.start_epoch(6)
    past = pskd.source.submit(SourceRequest({"": torch.zeros(3, 1)}, 1, keys)).result()
    y = torch.tensor([0, 1, 2])
    t = pskd.targets(past, y, C)
    torch.testing.assert_close(pskd.loss(logits, past, y), -(t * F.log_softmax(logits, -1)).sum(-1).mean())
    assert pskd.alpha == pytest.approx(0.48)


def test_past_predictions_without_keys_say_how_to_get_them() -> None:
    with pytest.raises(ConfigError, match="sample_keys="):
        PastPredictions().submit(SourceRequest({"": torch.zeros(2, 1)}, 1, None))


def test_pskd_sample_without_a_previous_prediction_gets_the_one_hot() -> None:
    pskd = PSKD(epochs=4)
    pskd.source.observe([10], torch.randn(1, C))
    pskd.start_epoch(2)
    past = pskd.source.submit(SourceRequest({"": torch.zeros(2, 1)}, 1, [10, 11])).result()
    assert past["known"].tolist() == [True, False]
    t = pskd.targets(past, torch.tensor([1, 3]), C)
    torch.testing.assert_close(t[1], F.one_hot(torch.tensor(3), C).float())
    assert not torch.allclose(t[0], F.one_hot(torch.tensor(1), C).float())


# ---------------------------------------------------------------- BYOT


class _Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block1 = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(12, 10), nn.ReLU())
        self.fc = nn.Linear(10, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(x)))


def test_byot_heads_on_hooks_learn_from_the_deepest_head() -> None:
    model = _Deep()
    x, y = torch.randn(8, 6), torch.randint(0, C, (8,))
    plain = model(x).detach()
    byot = BYOT(model, ["block1", "block2"], final="fc", example_input=x, alpha=1.0, feature_weight=0.0)
    out = byot(x)
    torch.testing.assert_close(out.logits, plain)  # the model itself is unchanged
    assert len(out.head_logits) == 2 and out.feature.shape == (8, 10)
    assert all(f.shape == (8, 10) for f in out.head_features)  # bottlenecked to the deepest width
    loss = byot.loss(out, y)
    q = F.softmax(plain / 3.0, -1)
    expected = F.cross_entropy(plain, y) + sum(
        (q * (q.log() - F.log_softmax(z / 3.0, -1))).sum(-1).mean() * 9.0 for z in out.head_logits)
    torch.testing.assert_close(loss, expected)  # α=1: CE of the deep head + KL of each shallow head to it
    byot.zero_grad()
    byot.loss(byot(x), y).backward()
    deep_grad = model.fc.weight.grad.clone()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(deep_grad, model.fc.weight.grad)  # the KL terms never move the deepest head
    assert byot.heads[0].weight.grad is not None
    byot.remove()
    n_params = sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(model(x).detach(), plain)
    assert not model._forward_hooks and not model.block1._forward_hooks and not model.fc._forward_pre_hooks
    assert n_params == sum(p.numel() for p in _Deep().parameters())


def test_byot_feature_term_is_the_l2_to_the_deepest_feature() -> None:
    model = _Deep()
    x, y = torch.randn(4, 6), torch.randint(0, C, (4,))
    base = BYOT(model, ["block1"], final="fc", example_input=x, alpha=0.0, feature_weight=0.0)
    out = base(x)
    l0 = base.loss(out, y)
    base.feature_weight = 0.5
    l1 = base.loss(out, y)
    torch.testing.assert_close(l1 - l0, 0.5 * (out.head_features[0] - out.feature).pow(2).sum(1).mean())


def test_byot_names_a_missing_tap() -> None:
    with pytest.raises(ConfigError, match="no submodule 'block9'.*block1"):
        BYOT(_Deep(), ["block9"], final="fc", example_input=torch.randn(2, 6))


# ---------------------------------------------------------------- born-again


def _mlp(g: int) -> nn.Module:
    torch.manual_seed(100 + g)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, C))
    net.edistill_inputs = [("x", "float32", (6,))]
    return net


@pytest.mark.parametrize("teacher", ["in-process", "service", "cache"])
def test_born_again_generation_learns_from_the_previous_ones_frozen_weights(teacher: str, tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = torch.randint(0, C, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    trained = []
    with BornAgain(_mlp, generations=3, teacher=teacher, cache_dir=tmp_path,
                   record_loader=DataLoader(TensorDataset(x, y), batch_size=32)) as ban:
        for gen in ban:
            opt = torch.optim.SGD(gen.model.parameters(), lr=0.1)
            with DistillReader(loader, gen.source) as reader:
                for epoch in range(2):
                    for (xb, yb), answer in reader:
                        if gen.index == 0:
                            assert answer == {}
                        else:  # the answer is the previous generation's, as trained
                            with torch.no_grad():
                                expected = F.log_softmax(trained[-1](xb), -1)
                            torch.testing.assert_close(answer["logits"].as_subclass(torch.Tensor), expected,
                                                       rtol=1e-5, atol=1e-5)
                        loss = gen.loss(gen.model(xb), answer, yb)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
            trained.append(gen.model)
    assert len(trained) == 3 and len({id(m) for m in trained}) == 3
    if teacher == "cache":  # each teacher generation was recorded once, then read back
        assert sorted(p.name for p in tmp_path.iterdir()) == ["generation-0", "generation-1"]
