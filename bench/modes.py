"""The three modes side by side: the same student from a cache, an in-process teacher and the service.

The EDL article's three ways to distill, on scikit-learn digits (ships with
the package, no download):

* ``cache`` ("the recorded lecture"): the answers recorded once from the
  service with :func:`student_client.record`, read back by
  :class:`student_client.CachedTeacher` with no teacher running;
* ``in-process`` ("the same classroom"): :class:`student_client.InProcessTeacher`;
* ``service`` ("an online class"): a real teacher server process on
  loopback, through :class:`student_client.TeacherPool`.

One teacher MLP (64 -> 256 -> 256 -> 10) is trained first and served from its
state dict. For each soft-label dtype and seed, the same student MLP (seeded
init, seeded shuffle) trains with the same loop (``DistillReader`` over the
mode's source, ``KDLoss(T=4) + 0.1 * CE``) in each mode. Printed per run:
test accuracy and student steps/s; per dtype: whether the soft labels each
mode delivered (by sample key, first epoch) and the trained weights are equal
bit for bit across modes, and the largest differences if not.

Bit-for-bit equality needs the teacher's per-sample arithmetic not to depend
on how samples are batched: true here for batches of 41-300 rows (the CPU
GEMM takes the same path), not for 1-7 rows, so the service runs with
``--max-batch-size`` = the batch size (no merging) and the recording uses
the training batch size.

    python bench/modes.py [--seeds 3] [--epochs 10] [--dtypes float32,float16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import _common
from _common import emit, median

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from student_client import (CachedTeacher, CELoss, DistillReader, InProcessTeacher, KDLoss,  # noqa: E402
                            TeacherPool, record)
from student_client._demo_data import Digits  # noqa: E402
from teacher_server.zoo import mlp  # noqa: E402

MODES = ("cache", "in-process", "service")


def train_teacher(data: Digits, hidden: int, steps: int = 300) -> torch.nn.Module:
    """The teacher MLP, full-batch Adam on the training split (seed 0)."""
    torch.manual_seed(0)
    net = mlp(64, hidden, 10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(net(data.x_train), data.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def train_student(source, data: Digits, criterion, *, seed: int, epochs: int, batch_size: int, hidden: int):
    """Train one student from ``source``; returns (accuracy, steps/s, weights, first-epoch soft labels by key)."""
    torch.manual_seed(seed)
    student = mlp(64, hidden, 10, depth=1)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    soft = torch.full((len(data.x_train), 10), float("nan"), dtype=torch.float64)
    steps, t0 = 0, time.perf_counter()
    with DistillReader(loader, source) as reader:
        for epoch in range(epochs):
            for (x, y), teacher in reader:
                if epoch == 0:
                    soft[reader.current_keys] = teacher["logits"].double()
                loss = criterion(student(x), teacher, labels=y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
    rate = steps / (time.perf_counter() - t0)
    with torch.no_grad():
        acc = (student(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return acc, rate, [p.detach().clone() for p in student.parameters()], soft


def max_diff(a, b) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--student-hidden", type=int, default=32)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--dtypes", default="float32,float16", help="soft-label dtypes to run, comma-separated")
    _common.add_env_args(p)
    opts = p.parse_args(argv)
    _common.reexec_with_env(opts.omp_wait_policy)
    torch.set_num_threads(1)  # the same single core for the student in every mode

    data = Digits()
    teacher = train_teacher(data, opts.teacher_hidden)
    with torch.no_grad():
        teacher_acc = (teacher(data.x_test).argmax(1) == data.y_test).float().mean().item()
    work = tempfile.mkdtemp(prefix="edistill-modes-")
    ckpt = f"{work}/teacher.pt"
    torch.save(teacher.state_dict(), ckpt)
    emit({"config": {"bench": "modes", **vars(opts), "teacher_test_accuracy": round(teacher_acc, 4),
                     "train": len(data.x_train), "test": len(data.x_test), **_common.machine()}})
    serve = ["--checkpoint", ckpt, "--model-kwargs", json.dumps({"in_features": 64, "hidden": opts.teacher_hidden}),
             "--max-batch-size", str(opts.batch_size), "--max-queue-delay-ms", "0", "--torch-threads", "1"]
    summaries = []
    with _common.teachers(1, "teacher_server.zoo:mlp", *serve) as (served,):
        for dtype in opts.dtypes.split(","):
            criterion = KDLoss(opts.temperature, dtype=dtype) + 0.1 * CELoss()
            cache_dir = f"{work}/cache-{dtype}"
            with TeacherPool([served.address], criterion) as pool:  # the recording comes from the service
                rec = record(DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=opts.batch_size),
                             pool, cache_dir)
            runs = {m: [] for m in MODES}
            for seed in range(opts.seeds):
                for mode in MODES:
                    source = {"cache": lambda: CachedTeacher(cache_dir, criterion),
                              "in-process": lambda: InProcessTeacher(teacher, criterion),
                              "service": lambda: TeacherPool([served.address], criterion)}[mode]()
                    with source:
                        acc, rate, weights, soft = train_student(
                            source, data, criterion, seed=seed, epochs=opts.epochs, batch_size=opts.batch_size,
                            hidden=opts.student_hidden)
                    runs[mode].append((acc, rate, weights, soft))
                    emit({"dtype": dtype, "mode": mode, "seed": seed, "test_accuracy": round(acc, 4),
                          "steps_per_s": round(rate, 1)})
            ref = runs["cache"]
            summary = {"summary": True, "dtype": dtype, "seeds": opts.seeds, "recorded_samples": rec.cached,
                       "recorded_from": str(rec.teacher)}
            for mode in MODES:
                accs = [r[0] for r in runs[mode]]
                summary[mode] = {
                    "test_accuracy_mean": round(statistics.mean(accs), 4),
                    "test_accuracy_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                    "steps_per_s_median": round(median([r[1] for r in runs[mode]]), 1),
                    "soft_labels_equal_to_cache": all(torch.equal(a[3], b[3]) for a, b in zip(runs[mode], ref)),
                    "soft_labels_max_abs_diff": max(max_diff([a[3]], [b[3]]) for a, b in zip(runs[mode], ref)),
                    "weights_equal_to_cache": all(all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
                                                  for a, b in zip(runs[mode], ref)),
                    "weights_max_abs_diff": max(max_diff(a[2], b[2]) for a, b in zip(runs[mode], ref)),
                    "accuracies": [round(a, 4) for a in accs],
                }
            summaries.append(summary)
            emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
