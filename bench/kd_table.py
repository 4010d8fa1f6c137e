"""The README's distillation tables: response, feature and relation losses on data that ships with a package.

Two settings, each a teacher trained once and a small student trained per
row and seed (5 seeds, mean ± std of test accuracy):

* ``digits`` -- scikit-learn's 8x8 handwritten digits (1,257 train / 540
  test), MLP teacher 64-256-256-10, MLP student 64-32-10; the feature is the
  last hidden layer (teacher 256, student 32). No spatial maps, so no
  attention-transfer row.
* ``mnist1d`` -- MNIST-1D (Greydanus 2020; generated locally by the
  ``mnist1d`` package's own generator, nothing downloaded; 4,000 train /
  1,000 test signals of length 40), 1-D conv teacher (32-64-64 channels),
  1-D conv student (8-16-16); the feature is the last conv map (B, C, 10).

Rows: hard labels (CE), KD (Hinton, T = 4: ``0.9 KD + 0.1 CE``), and KD plus
one of hint (FitNets eq. 3, ½‖u − r(v)‖² per sample, i.e. the element-mean
MSE times half the feature size, with a trained regressor), attention transfer
(weight β/2 = 500), RKD (distance 25 + angle 50) and similarity-preserving
(γ = 3000): the papers' weights, not tuned here. The teacher's answers
(logits and the feature) are recorded once with :func:`student_client.record`
and every student reads them from the :class:`student_client.CachedTeacher`.

Hinton's omitted-class experiment (§3 of the paper, on digits): the student
is trained with KD (T = 8) on a transfer set with every 3 removed; it never
sees a 3, only the teacher's soft labels on the other digits. Reported:
errors on the test 3s for a hard-label student (it cannot predict 3 at
all), the KD student, and the KD student after the bias correction: the
class-3 logit raised by ``log(π₃ / q̄₃)``, π₃ = 1/10 the class prior and q̄₃
the student's mean probability of 3 on the transfer set (a prior-shift
correction that needs no example of a 3).

    python bench/kd_table.py [--seeds 5] [--only digits,mnist1d,omitted]

Prints one JSON object per run and a summary per setting (the tables).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile

import _common
from _common import emit

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from student_client import (AttentionTransferLoss, CachedTeacher, CELoss, DistillReader, HintLoss,  # noqa: E402
                            InProcessTeacher, KDLoss, OutputSpec, RKDLoss, SimilarityPreservingLoss, record)
from student_client._demo_data import Digits  # noqa: E402

T = 4.0


class MLP(nn.Module):
    """in -> hidden (ReLU) ... -> classes; returns {"logits", "feat"} (feat: the last hidden layer)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body, self.head = nn.Sequential(*layers), nn.Linear(widths[-2], widths[-1])

    def forward(self, x):
        feat = self.body(x)  # (B, hidden)
        return {"logits": self.head(feat), "feat": feat}


class Conv1D(nn.Module):
    """(B, 40) signal -> conv maps -> {"logits", "feat": the last conv map (B, C, 10)}."""

    def __init__(self, c: tuple[int, int, int]) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, c[0], 5, padding=2), nn.ReLU(),  # (B, c0, 40)
                                  nn.Conv1d(c[0], c[1], 3, stride=2, padding=1), nn.ReLU(),  # (B, c1, 20)
                                  nn.Conv1d(c[1], c[2], 3, stride=2, padding=1), nn.ReLU())  # (B, c2, 10)
        self.head = nn.Linear(c[2], 10)

    def forward(self, x):
        feat = self.body(x.unsqueeze(1))
        return {"logits": self.head(feat.mean(-1)), "feat": feat}


def load(name: str):
    """(x_train, y_train, x_test, y_test) float32/int64 tensors."""
    if name == "digits":
        d = Digits()
        return d.x_train, d.y_train, d.x_test, d.y_test
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # the package's generator, seed 42: no download
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return f(d["x"]), torch.as_tensor(d["y"]).long(), f(d["x_test"]), torch.as_tensor(d["y_test"]).long()


def fit(model: nn.Module, loader, criterion, source=None, *, epochs: int, lr: float, extra=()) -> None:
    """Adam for ``epochs`` over ``loader``; with a source, through a DistillReader."""
    opt = torch.optim.Adam([*model.parameters(), *[p for m in extra for p in m.parameters()]], lr=lr)
    reader = DistillReader(loader, source) if source is not None else None
    for _ in range(epochs):
        for item in (reader if reader is not None else loader):
            (x, y), teacher = item if reader is not None else (item, None)
            loss = criterion(model(x), teacher, labels=y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    if reader is not None:
        reader.close()


def train_teacher(cfg: dict, x, y) -> nn.Module:
    """The setting's teacher, trained with CE (seed 0)."""
    torch.manual_seed(0)
    teacher = cfg["teacher"]()
    fit(teacher, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
        lambda out, _t, labels: F.cross_entropy(out["logits"], labels), epochs=cfg["teacher_epochs"], lr=cfg["lr"])
    return teacher.eval()


def accuracy(model: nn.Module, x, y, bias=None) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logits = model(x)["logits"]
        pred = (logits + bias if bias is not None else logits).argmax(1)
    return (pred == y).float().mean().item(), pred


SETTINGS = {
    "digits": {"teacher": lambda: MLP([64, 256, 256, 10]), "student": lambda: MLP([64, 32, 10]),
               "s_ch": 32, "t_ch": 256, "feat_size": 256, "adapter": "linear", "epochs": 40, "teacher_epochs": 60, "lr": 3e-3},
    "mnist1d": {"teacher": lambda: Conv1D((32, 64, 64)), "student": lambda: Conv1D((8, 16, 16)),
                "s_ch": 16, "t_ch": 64, "feat_size": 64 * 10, "adapter": "conv1d", "epochs": 30, "teacher_epochs": 40, "lr": 3e-3},
}


def rows(setting: str, cfg: dict) -> dict:
    kd = 0.9 * KDLoss(T, output="logits") + 0.1 * CELoss()
    out = {"hard labels": lambda: (CELoss(), ()), "KD": lambda: (kd, ())}

    def hint():
        h = HintLoss(cfg["s_ch"], cfg["t_ch"], teacher_output="feat", adapter=cfg["adapter"])
        return kd + cfg["feat_size"] / 2 * h, (h,)  # ½ Σ over a sample's feature = size/2 x the element mean

    out["KD + hint"] = hint
    if setting != "digits":
        out["KD + attention transfer"] = lambda: (kd + 500 * AttentionTransferLoss("feat"), ())
    out["KD + RKD"] = lambda: (kd + RKDLoss("feat"), ())
    out["KD + similarity-preserving"] = lambda: (kd + 3000 * SimilarityPreservingLoss("feat"), ())
    return out


def run_setting(setting: str, seeds: int, work: str) -> dict:
    cfg = SETTINGS[setting]
    xtr, ytr, xte, yte = load(setting)
    teacher = train_teacher(cfg, xtr, ytr)
    teacher_acc = accuracy(teacher, xte, yte)[0]
    specs = [OutputSpec("logits", "log_probs", T), OutputSpec("feat")]
    cache = f"{work}/{setting}"
    record(DataLoader(TensorDataset(xtr, ytr), batch_size=256), InProcessTeacher(teacher, specs), cache)
    results: dict[str, list[float]] = {}
    for name, make in rows(setting, cfg).items():
        for seed in range(seeds):
            torch.manual_seed(seed)
            student = cfg["student"]()
            criterion, extra = make()
            loader = DataLoader(TensorDataset(xtr, ytr), batch_size=64, shuffle=True,
                                generator=torch.Generator().manual_seed(seed))
            source = CachedTeacher(cache, criterion) if criterion.needs else None
            fit(student, loader, criterion, source, epochs=cfg["epochs"], lr=cfg["lr"], extra=extra)
            acc = accuracy(student, xte, yte)[0]
            results.setdefault(name, []).append(acc)
            emit({"setting": setting, "row": name, "seed": seed, "test_accuracy": round(acc, 4)})
    table = {name: {"mean": round(statistics.mean(a), 4), "std": round(statistics.stdev(a), 4),
                    "accuracies": [round(v, 4) for v in a]} for name, a in results.items()}
    return {"summary": True, "setting": setting, "seeds": seeds, "teacher_test_accuracy": round(teacher_acc, 4),
            "train": len(xtr), "test": len(xte), "rows": table}


def run_omitted(seeds: int, work: str, omit: int = 3, temperature: float = 8.0) -> dict:
    """Hinton §3 on digits: no ``omit`` in the transfer set; errors on the test ``omit``s before/after the bias fix."""
    cfg = SETTINGS["digits"]
    xtr, ytr, xte, yte = load("digits")
    teacher = train_teacher(cfg, xtr, ytr)
    keep = ytr != omit
    xs, ys = xtr[keep], ytr[keep]
    spec = OutputSpec("logits", "log_probs", temperature)
    cache = f"{work}/omitted"
    record(DataLoader(TensorDataset(xs, ys), batch_size=256), InProcessTeacher(teacher, [spec]), cache)
    target = yte == omit
    out = {"hard labels": [], "KD": [], "KD + bias correction": []}
    overall = {k: [] for k in out}
    for seed in range(seeds):
        for name, criterion in (("hard labels", CELoss()),
                                ("KD", 0.9 * KDLoss(temperature) + 0.1 * CELoss())):
            torch.manual_seed(seed)
            student = cfg["student"]()
            loader = DataLoader(TensorDataset(xs, ys), batch_size=64, shuffle=True,
                                generator=torch.Generator().manual_seed(seed))
            source = CachedTeacher(cache, criterion) if criterion.needs else None
            fit(student, loader, criterion, source, epochs=cfg["epochs"], lr=cfg["lr"])
            variants = [(name, None)]
            if name == "KD":
                with torch.no_grad():
                    q = torch.softmax(student(xs)["logits"], 1)[:, omit].mean().item()
                bias = torch.zeros(10)
                bias[omit] = math.log(0.1 / q)  # prior shift: the class is 1/10 of the data, not q
                variants.append(("KD + bias correction", bias))
            for label, b in variants:
                acc, pred = accuracy(student, xte, yte, b)
                errors = int((pred[target] != omit).sum())
                out[label].append(errors)
                overall[label].append(acc)
                emit({"setting": "omitted-class", "row": label, "seed": seed, "errors_on_omitted": errors,
                      "omitted_in_test": int(target.sum()), "test_accuracy": round(acc, 4)})
    return {"summary": True, "setting": "omitted-class", "omitted_digit": omit, "temperature": temperature,
            "seeds": seeds, "omitted_in_test": int(target.sum()), "transfer_set": int(keep.sum()),
            "rows": {k: {"errors_mean": round(statistics.mean(v), 2), "errors_std": round(statistics.stdev(v), 2),
                         "errors": v, "test_accuracy_mean": round(statistics.mean(overall[k]), 4),
                         "test_accuracy_std": round(statistics.stdev(overall[k]), 4)} for k, v in out.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", default="digits,mnist1d,omitted", help="comma-separated subset of the experiments")
    _common.add_env_args(p)
    opts = p.parse_args(argv)
    _common.reexec_with_env(opts.omp_wait_policy)
    torch.set_num_threads(1)
    emit({"config": {"bench": "kd_table", "seeds": opts.seeds, "temperature": T, **_common.machine()}})
    work = tempfile.mkdtemp(prefix="edistill-kd-table-")
    for what in opts.only.split(","):
        emit(run_omitted(opts.seeds, work) if what == "omitted" else run_setting(what, opts.seeds, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
