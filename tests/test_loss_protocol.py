"""The loss protocol: what losses need, weighted sums, and a reader that requests what a loss needs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from student_client import ConfigError, DistillReader, InProcessTeacher, OutputSpec
from student_client.losses import CELoss, KDLoss, Loss, WeightedLoss, kd_loss
from student_client.outputs import Dense, TopK, apply_spec, normalize_outputs
from student_client.sources import SourceRequest

S = torch.tensor([[1.0, -0.5, 2.0, 0.0], [0.3, 0.1, -1.2, 2.2]], dtype=torch.float64)  # (B=2, C=4)
T_LOGITS = torch.tensor([[2.0, 0.0, 1.0, -1.0], [-0.5, 1.5, 0.0, 1.0]], dtype=torch.float64)
Y = torch.tensor([2, -100])
KD_T4 = 0.5621681265258615  # T²·KL at T=4 (GOLDEN in tests/test_losses.py)
CE_ROW0 = math.log(math.e + math.exp(-0.5) + math.exp(2.0) + 1.0) - 2.0  # −log softmax([1, −0.5, 2, 0])_2


@pytest.mark.parametrize("kwargs, spec", [
    (dict(), OutputSpec("logits", "log_probs", 4.0, 0, "float32")),
    (dict(temperature=2.0, top_k=5, transform="probs", dtype="float16", output="output1"),
     OutputSpec("output1", "probs", 2.0, 5, "float16")),
    (dict(temperature=3.0, transform="raw"), OutputSpec("logits", "raw", 1.0, 0, "float32")),  # softened here
])
def test_kd_loss_module_needs_one_output_spec(kwargs, spec):
    assert KDLoss(**kwargs).needs == (spec,)


def test_ce_loss_needs_nothing_and_is_the_labelled_rows_ce():
    assert CELoss().needs == ()
    assert CELoss()(S, None, Y).item() == pytest.approx(CE_ROW0, rel=1e-12)
    assert CELoss()({"logits": S}, {}, labels=Y).item() == pytest.approx(CE_ROW0, rel=1e-12)
    with pytest.raises(ConfigError, match="CELoss needs labels"):
        CELoss()(S, None)


def test_kd_loss_module_reads_its_output_from_the_readers_dict():
    crit = KDLoss(temperature=4.0)
    answers = {"logits": apply_spec(T_LOGITS, crit.needs[0]), "other": torch.zeros(1)}
    assert crit(S, answers).item() == pytest.approx(KD_T4, rel=1e-6)
    assert crit({"logits": S, "features": torch.zeros(2, 3)}, answers).item() == pytest.approx(KD_T4, rel=1e-6)
    assert crit(S, answers["logits"]).item() == pytest.approx(KD_T4, rel=1e-6)  # the answer itself
    # A plain tensor is taken to hold what the loss asks for (here log_probs at T=4).
    assert crit(S, torch.log_softmax(T_LOGITS / 4.0, -1)).item() == pytest.approx(KD_T4, rel=1e-9)
    assert KDLoss(temperature=4.0, transform="raw")(S, T_LOGITS).item() == pytest.approx(KD_T4, rel=1e-9)
    with pytest.raises(ConfigError, match="needs teacher output 'logits', but the answers hold 'other'"):
        crit(S, {"other": T_LOGITS})
    with pytest.raises(ConfigError, match="reads student output 'logits'"):
        crit({"out": S}, answers)
    with pytest.raises(ConfigError, match=r"temperature 2\.0, the loss uses 4\.0"):
        crit(S, {"logits": apply_spec(T_LOGITS, OutputSpec("logits", "log_probs", 2.0))})


def test_kd_loss_module_with_top_k_and_ce():
    crit = KDLoss(temperature=2.0, top_k=2, transform="probs", ce_weight=0.5)
    answer = apply_spec(T_LOGITS, crit.needs[0])
    assert isinstance(answer, TopK)
    assert crit(S, {"logits": answer}, Y).item() == pytest.approx(
        kd_loss(S, answer).item() + 0.5 * CE_ROW0, rel=1e-9)
    assert "temperature=2.0" in repr(crit) and "top_k=2" in repr(crit)


def test_a_weighted_sum_is_the_sum_of_its_weighted_terms_and_needs_their_union():
    kd, ce = KDLoss(temperature=4.0, transform="raw"), CELoss()
    total = 0.9 * kd + 0.1 * ce
    assert isinstance(total, WeightedLoss) and total.weights == (0.9, 0.1)
    assert total.needs == kd.needs
    assert total(S, {"logits": T_LOGITS}, Y).item() == pytest.approx(0.9 * KD_T4 + 0.1 * CE_ROW0, rel=1e-9)
    # Every form builds the same sum: operators, sum(), an explicit list, nested sums scaled.
    for other in (kd * 0.9 + ce * 0.1, sum([0.9 * kd, 0.1 * ce]), WeightedLoss([(0.9, kd), (0.1, ce)]),
                  0.5 * (1.8 * kd + 0.2 * ce)):
        assert other.weights == pytest.approx((0.9, 0.1))
        assert other(S, {"logits": T_LOGITS}, Y).item() == pytest.approx(total(S, {"logits": T_LOGITS}, Y).item())
    assert "weights=[0.9, 0.1]" in repr(total)


def test_needs_of_a_sum_request_each_output_once():
    a = KDLoss(temperature=4.0)
    b = KDLoss(temperature=4.0, ce_weight=0.3)  # the same spec: requested once
    c = KDLoss(temperature=2.0, output="output1", transform="probs")
    total = a + b + c + CELoss()
    assert total.needs == (a.needs[0], c.needs[0])
    assert normalize_outputs(total) == total.needs


def test_two_terms_needing_one_output_differently_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        KDLoss(temperature=4.0) + KDLoss(temperature=2.0)
    message = str(info.value)
    assert "teacher output 'logits' differently" in message
    assert "temperature=4.0" in message and "temperature=2.0" in message


@pytest.mark.parametrize("build, match", [
    (lambda: WeightedLoss([]), "at least one"),
    (lambda: WeightedLoss([(float("nan"), CELoss())]), "finite real number"),
    (lambda: WeightedLoss([(True, CELoss())]), "finite real number"),
    (lambda: WeightedLoss([(1.0, torch.nn.MSELoss())]), "Loss instances"),
    (lambda: WeightedLoss([CELoss()]), r"\(weight, loss\) pairs"),
    (lambda: KDLoss(temperature=0), "temperature"),
    (lambda: KDLoss(transform="softmax"), "transform"),
    (lambda: KDLoss(top_k=-1), "top_k"),
    (lambda: KDLoss(dtype="float64"), "dtype"),
    (lambda: KDLoss(ce_weight=-1.0), "ce_weight"),
    (lambda: CELoss(reduction="avg"), "reduction"),
])
def test_bad_settings_fail_at_construction(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_operators_refuse_what_is_not_a_weight_or_a_loss():
    with pytest.raises(TypeError):
        CELoss() * "0.5"
    with pytest.raises(TypeError):
        CELoss() + 1.0


def test_normalize_outputs_takes_a_loss():
    crit = 0.9 * KDLoss(temperature=4.0, top_k=3) + 0.1 * CELoss()
    assert normalize_outputs(crit) == (OutputSpec("logits", "log_probs", 4.0, 3),)
    with pytest.raises(ConfigError, match="needs no teacher output"):
        normalize_outputs(CELoss())
    with pytest.raises(ConfigError, match=r"pass one loss, summing several"):
        normalize_outputs([KDLoss(), CELoss()])


def test_a_user_defined_loss_follows_the_protocol():
    class Hint(Loss):
        """Plain MSE to the teacher's features (only to exercise the protocol)."""

        needs = (OutputSpec("output1"),)

        def forward(self, student, teacher, labels=None):
            return torch.nn.functional.mse_loss(student["features"], teacher["output1"])

    total = KDLoss(temperature=4.0, transform="raw") + 2.0 * Hint()
    assert [s.name for s in total.needs] == ["logits", "output1"]
    value = total({"logits": S, "features": torch.ones(2, 3)}, {"logits": T_LOGITS, "output1": torch.zeros(2, 3)})
    assert value.item() == pytest.approx(KD_T4 + 2.0, rel=1e-9)


class _TwoHeads(torch.nn.Module):
    """A teacher with two named outputs: ``logits`` (B, 4) and ``feat`` (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 4)

    def forward(self, x):
        return {"logits": self.head(x), "feat": x * 2}


def test_a_reader_source_asked_with_the_loss_delivers_what_it_needs():
    torch.manual_seed(0)
    teacher = _TwoHeads().eval()
    crit = 0.7 * KDLoss(temperature=2.0, top_k=2) + 0.3 * CELoss()
    data = TensorDataset(torch.randn(8, 3), torch.tensor([0, 1, -100, 3, -100, -100, 2, 1]))
    source = InProcessTeacher(teacher, outputs=crit)  # the loss says what to ask for
    student = torch.nn.Linear(3, 4)
    with DistillReader(DataLoader(data, batch_size=4), source=source) as reader:
        for (x, y), answers in reader:
            assert set(answers) == {"logits"}
            tk = answers["logits"]
            assert isinstance(tk, TopK) and (tk.transform, tk.temperature, tk.k) == ("log_probs", 2.0, 2)
            loss = crit(student(x), answers, labels=y)
            loss.backward()
            assert torch.isfinite(loss)
    dense_kd = KDLoss(temperature=3.0, transform="probs")
    x = torch.randn(2, 3)
    answers = InProcessTeacher(teacher, outputs=dense_kd).submit(SourceRequest({"": x}, batch_id=0)).result(timeout=5)
    answer = answers["logits"]
    assert isinstance(answer, Dense) and (answer.transform, answer.temperature) == ("probs", 3.0)
    assert answer.is_inference()  # made under inference_mode, yet the loss backpropagates through the student
    dense_kd(student(x), answers).backward()
