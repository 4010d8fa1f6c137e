#!/usr/bin/env python
"""Distillation recipes against plain training on scikit-learn digits, several seeds.

    python bench/recipes.py                 # everything: ~5 min on 2 shared cores
    python bench/recipes.py --part recipes  # plain vs DML, DKEL, born-again, PS-KD, BYOT
    python bench/recipes.py --part codistill

Prints one JSON object per line: ``{"kind": "run", ...}`` per training run,
then ``{"kind": "summary", ...}`` per recipe: accuracy, NLL and ECE on the
540 test digits as mean ± std over the seeds, and the paired difference to
plain training (same seeds) with its 95% confidence half-width
(``inside_noise``: the interval contains 0). Then the codistillation rows
(bench/_recipes_codistill.py): accuracy against steps for 1, 2 and 4 peers,
the exchange interval, and prediction churn between independent runs.
``--markdown`` also prints the README tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402
import _recipes_common as rc  # noqa: E402
from _common import emit, machine  # noqa: E402
from student_client import DistillReader  # noqa: E402
from student_client._demo_data import Digits  # noqa: E402
from student_client.recipes import BYOT, PSKD, BornAgain, DecoupledMeanTeacher, DeepMutualLearning  # noqa: E402


def _fit(nets, loss_fn, data: Digits, seed: int, epochs: int, after_step=None) -> None:
    """SGD over ``epochs`` of shuffled batches; ``loss_fn(x, y, epoch)`` gives the loss."""
    opt = rc.optimizer([p for n in nets for p in n.parameters()])
    dl = rc.loader(data, seed)
    sched = rc.decay(opt, epochs * len(dl))
    for epoch in range(epochs):
        for x, y in dl:
            loss = loss_fn(x, y, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()


def plain(data: Digits, seed: int, epochs: int) -> dict:
    net = rc.model(seed)
    _fit([net], lambda x, y, e: F.cross_entropy(net(x), y), data, seed, epochs)
    return {"plain": net}


def dml(data: Digits, seed: int, epochs: int) -> dict:
    peers = [rc.model(seed), rc.model(seed + 1000)]  # peer 0 starts where plain training starts
    d = DeepMutualLearning(peers)
    _fit(peers, lambda x, y, e: sum(d.losses(d(x), y)), data, seed, epochs)
    return {"dml": peers[0]}


def dkel(data: Digits, seed: int, epochs: int) -> dict:
    students = [rc.model(seed), rc.model(seed + 1000)]
    teachers = [rc.model(seed + 2000), rc.model(seed + 3000)]  # initialised independently
    d = DecoupledMeanTeacher(students, teachers, rampup_epochs=max(1, epochs // 3))
    _fit(students, lambda x, y, e: sum(d.losses(*d(x), y, e)), data, seed, epochs, after_step=d.update)
    return {"dkel student": students[0], "dkel mean teacher": teachers[0]}


def born_again(data: Digits, seed: int, epochs: int) -> dict:
    out = {}
    with BornAgain(lambda g: rc.model(seed + 1000 * g), generations=3) as ban:
        for gen in ban:
            opt = rc.optimizer(gen.model.parameters())
            with DistillReader(rc.loader(data, seed + gen.index), gen.source) as reader:
                sched = rc.decay(opt, epochs * len(reader))
                for _ in range(epochs):
                    for (x, y), teacher in reader:
                        loss = gen.loss(gen.model(x), teacher, y)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        sched.step()
            if gen.index:
                out[f"born-again g{gen.index}"] = gen.model
    return out


def pskd(data: Digits, seed: int, epochs: int) -> dict:
    net = rc.model(seed)
    opt = rc.optimizer(net.parameters())
    p = PSKD(epochs=epochs)
    with DistillReader(rc.loader(data, seed), p.source) as reader:
        sched = rc.decay(opt, epochs * len(reader))
        for epoch in range(epochs):
            p.start_epoch(epoch)
            for (x, y), past in reader:
                logits = net(x)
                loss = p.loss(logits, past, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                reader.observe(logits)
    return {"ps-kd": net}


def byot(data: Digits, seed: int, epochs: int) -> dict:
    net = rc.model(seed)  # Sequential(Linear, ReLU, Linear, ReLU, Linear): a head after the first block
    b = BYOT(net, ["1"], final="4", example_input=data.x_train[:2])
    _fit([b], lambda x, y, e: b.loss(b(x), y), data, seed, epochs)
    b.remove()
    return {"byot": net}


RECIPES = [plain, dml, dkel, born_again, pskd, byot]


def run_recipes(args: argparse.Namespace, data: Digits) -> list[dict]:
    results: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        for fn in RECIPES:  # every recipe on seed s before seed s+1: drifts in machine load hit all alike
            t0 = time.perf_counter()
            models = fn(data, seed, args.epochs)
            wall = time.perf_counter() - t0
            for name, net in models.items():
                m = rc.metrics(rc.test_probs(net, data), data.y_test)
                emit({"kind": "run", "recipe": name, "seed": seed, "epochs": args.epochs, "wall_s": wall, **m})
                for k, v in m.items():
                    results.setdefault(name, {}).setdefault(k, []).append(v)
    rows = []
    base = results["plain"]
    for name, ms in results.items():
        row = {"kind": "summary", "part": "recipes", "recipe": name, "seeds": args.seeds, "epochs": args.epochs}
        for k, v in ms.items():
            row[k] = rc.summarize(v).as_dict()
            if name != "plain":
                row[f"{k}_vs_plain"] = rc.paired(v, base[k])
        emit(row)
        rows.append(row)
    return rows


def _pm(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def _diff(d: dict, scale: float, digits: int) -> str:
    mark = " (noise)" if d["inside_noise"] else ""
    return f"{d['mean'] * scale:+.{digits}f}{mark}"


def markdown_recipes(rows: list[dict]) -> str:
    lines = ["| recipe | accuracy % | Δ acc | NLL | Δ NLL | ECE % | Δ ECE |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = (lambda k, s, n: _diff(r[f"{k}_vs_plain"], s, n)) if r["recipe"] != "plain" else (lambda *a: "")
        lines.append(f"| {r['recipe']} | {_pm(r['acc'], 100, 1)} | {d('acc', 100, 1)} | {_pm(r['nll'], 1, 3)} | "
                     f"{d('nll', 1, 3)} | {_pm(r['ece'], 100, 1)} | {d('ece', 100, 1)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "recipes", "codistill"], default="all")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30, help="epochs of the in-process recipes")
    p.add_argument("--steps", type=int, default=600, help="steps per codistillation peer")
    p.add_argument("--markdown", action="store_true", help="also print the README tables")
    _common.add_env_args(p)
    args = p.parse_args(argv)
    _common.reexec_with_env(args.omp_wait_policy)
    torch.set_num_threads(1)  # several trainings share 2 cores; one thread each is fastest and steadiest
    emit({"kind": "machine", **machine()})
    data = Digits()
    t0 = time.perf_counter()
    tables = []
    if args.part in ("all", "recipes"):
        tables.append(markdown_recipes(run_recipes(args, data)))
    if args.part in ("all", "codistill"):
        import _recipes_codistill as cd

        tables.append(cd.markdown(cd.run(args, data)))
    emit({"kind": "done", "wall_s": time.perf_counter() - t0})
    if args.markdown:
        print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
