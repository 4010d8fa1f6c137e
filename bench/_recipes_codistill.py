"""Codistillation rows of ``bench/recipes.py`` (not a public API).

Each group run is K peers, each a thread of this process with its own
:class:`~student_client.recipes.Codistillation`: its own model, its own shard
of the digits training set (every K-th sample), its own teacher server on
loopback, registered in one real Redis (an ``EmbeddedRedis``) under a group
of its own. Peers start together (``wait_for_peers``) and leave together
(a barrier), so no peer loses its partners before the end. Peer 0 is
evaluated on the test set every ``EVAL_EVERY`` steps.

Rows:

* accuracy against steps for 1 peer (plain training on the whole training
  set), 2 and 4 codistilling peers (each on a 1/K shard), and, to separate
  what distillation adds from what less data takes away, plain training on
  peer 0's 1/K shard alone;
* the exchange interval at 2 peers (10, 50, 200 steps);
* 2 peers that both train on all the data (each in its own order), against
  plain training on all the data: codistillation without the sharding;
* prediction churn between independent runs (seed s against seed s+1, peer
  0 of each, on the test set), codistilled against plain on the same data.

Every codistilled row is also given as the paired difference (same seeds)
to plain training on the same data as its peer 0 (``vs``), with a 95%
confidence half-width; ``inside_noise`` when the interval contains 0.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
import torch.nn.functional as F

import _recipes_common as rc
from _common import emit
from registry import EmbeddedRedis
from student_client._demo_data import Digits
from student_client.recipes import CodistillConfig, Codistillation

EVAL_EVERY = 50
BURN_IN = 100
EXCHANGE_EVERY = 50
INTERVALS = (10, 50, 200)
PEERS = (2, 4)


def _evaluate(net, data: Digits, curve: dict, step: int) -> None:
    if step % EVAL_EVERY == 0:
        curve[step] = rc.metrics(rc.test_probs(net, data), data.y_test)["acc"]


def plain_steps(data: Digits, seed: int, ids: torch.Tensor | None, steps: int) -> dict:
    """Plain training of peer 0's model for ``steps`` steps on ``ids`` (None: all the data)."""
    net = rc.model(seed)
    opt = rc.optimizer(net.parameters())
    sched = rc.decay(opt, steps)
    dl = rc.loader(data, seed, ids)
    curve: dict[int, float] = {}
    step = 0
    while step < steps:
        for x, y in dl:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            _evaluate(net, data, curve, step)
            if step >= steps:
                break
    probs = rc.test_probs(net, data)
    return {"curve": curve, "probs": probs, **rc.metrics(probs, data.y_test)}


def _peer(k: int, K: int, seed: int, data: Digits, cfg: CodistillConfig, steps: int, start: threading.Barrier,
          end: threading.Barrier, out: dict, all_data: bool = False) -> None:
    try:
        net = rc.model(seed if k == 0 else seed + 1000 * k)  # peer 0 starts where plain training starts
        opt = rc.optimizer(net.parameters())
        sched = rc.decay(opt, steps)
        curve: dict[int, float] = {}
        ids = None if all_data else rc.shard(data, k, K)
        with Codistillation(net, rc.loader(data, seed + k, ids), cfg) as co:
            co.wait_for_peers(K - 1, timeout_s=120.0)
            start.wait(120.0)
            while co.steps < steps:
                for (x, y), peers in co:
                    loss = co.loss(net(x), peers, y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    co.step()
                    if k == 0:
                        _evaluate(net, data, curve, co.steps)
                    if co.steps >= steps:
                        break
            stats = co.stats()
            end.wait(300.0)  # nobody leaves while a partner still trains
        probs = rc.test_probs(net, data)
        staleness = [p.mean_staleness for p in stats.peers.values() if p.mean_staleness is not None]
        out[k] = {"curve": curve, "probs": probs, **rc.metrics(probs, data.y_test), "distilled": stats.distilled,
                  "batches": stats.submitted,
                  "mean_staleness": sum(staleness) / len(staleness) if staleness else None}
    except BaseException as exc:  # surface it in the main thread; let the others stop waiting
        out[k] = exc
        start.abort()
        end.abort()


def group_run(data: Digits, url: str, K: int, seed: int, steps: int, exchange_every: int,
              all_data: bool = False) -> dict:
    """K codistilling peers; returns peer 0's results plus the group's staleness and distilled share."""
    group = f"bench-{K}-{exchange_every}-{seed}-{'all' if all_data else 'shards'}"
    cfg_of = lambda k: CodistillConfig(registry=url, group=group, name=f"peer{k}",  # noqa: E731
                                       exchange_every=exchange_every, burn_in=BURN_IN)
    start, end, out = threading.Barrier(K), threading.Barrier(K), {}
    threads = [threading.Thread(target=_peer, args=(k, K, seed, data, cfg_of(k), steps, start, end, out, all_data))
               for k in range(K)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(K):
        if isinstance(out.get(k), BaseException):
            raise RuntimeError(f"peer {k} of a {K}-peer group failed") from out[k]
    res = dict(out[0])
    res["mean_staleness"] = sum(out[k]["mean_staleness"] or 0 for k in range(K)) / K
    res["distilled_share"] = sum(out[k]["distilled"] for k in range(K)) / sum(out[k]["batches"] for k in range(K))
    return res


def _curve_summary(runs: list[dict]) -> dict:
    steps = sorted(runs[0]["curve"])
    return {str(s): rc.summarize([r["curve"][s] for r in runs]).as_dict() for s in steps}


def run(args: argparse.Namespace, data: Digits) -> dict:
    """Every codistillation row; emits run and summary lines, returns the summaries."""
    n, steps = args.seeds, args.steps
    runs: dict[str, list[dict]] = {}
    plain_all, shared = "1 peer (plain, all data)", f"2 peers, both on all data, exchange every {EXCHANGE_EVERY}"
    baseline = {shared: plain_all}  # codistilled setting -> plain training on peer 0's data

    def record(name: str, seed: int, res: dict, wall_s: float, **extra) -> None:
        runs.setdefault(name, []).append(res)
        emit({"kind": "run", "part": "codistill", "setting": name, "seed": seed, "wall_s": wall_s, **extra,
              **{k: v for k, v in res.items() if k not in ("probs",)}})

    with EmbeddedRedis() as redis:
        for seed in range(n):  # all settings of seed s before seed s+1 (machine drift hits all alike)
            t0 = time.perf_counter()
            record(plain_all, seed, plain_steps(data, seed, None, steps), time.perf_counter() - t0)
            t0 = time.perf_counter()
            record(shared, seed, group_run(data, redis.url, 2, seed, steps, EXCHANGE_EVERY, all_data=True),
                   time.perf_counter() - t0, peers=2, exchange_every=EXCHANGE_EVERY)
            for K in PEERS:
                t0 = time.perf_counter()
                record(f"plain, 1/{K} shard", seed, plain_steps(data, seed, rc.shard(data, 0, K), steps),
                       time.perf_counter() - t0)
                for every in (INTERVALS if K == 2 else (EXCHANGE_EVERY,)):
                    t0 = time.perf_counter()
                    res = group_run(data, redis.url, K, seed, steps, every)
                    record(f"{K} peers, exchange every {every}", seed, res, time.perf_counter() - t0,
                           peers=K, exchange_every=every)
                    baseline[f"{K} peers, exchange every {every}"] = f"plain, 1/{K} shard"
    summary = {}
    for name, rs in runs.items():
        row = {"kind": "summary", "part": "codistill", "setting": name, "seeds": n, "steps": steps,
               "acc_by_step": _curve_summary(rs),
               **{k: rc.summarize([r[k] for r in rs]).as_dict() for k in ("acc", "nll", "ece")}}
        if rs[0].get("mean_staleness") is not None:
            row["mean_staleness"] = rc.summarize([r["mean_staleness"] for r in rs]).as_dict()
            row["distilled_share"] = rc.summarize([r["distilled_share"] for r in rs]).as_dict()
        if name in baseline:
            base = runs[baseline[name]]
            row["vs"] = baseline[name]
            for k in ("acc", "nll", "ece"):
                row[f"{k}_vs"] = rc.paired([r[k] for r in rs], [b[k] for b in base])
        summary[name] = row
        emit(row)
    churn_rows: dict[str, dict] = {}
    if n < 2:
        return {"rows": summary, "churn": churn_rows}
    ring = [(i, (i + 1) % n) for i in range(n)] if n > 2 else [(0, 1)]  # seed s vs s+1: each run in two pairs
    pairs_of = lambda name: [rc.churn(runs[name][i]["probs"], runs[name][j]["probs"]) for i, j in ring]  # noqa: E731
    for name in (plain_all, shared, "plain, 1/2 shard", f"2 peers, exchange every {EXCHANGE_EVERY}"):
        pairs = pairs_of(name)
        row = {"kind": "summary", "part": "churn", "setting": name, "pairs": len(pairs),
               **{k: rc.summarize([p[k] for p in pairs]).as_dict() for k in ("mad", "flip")}}
        if name in baseline:
            base = pairs_of(baseline[name])
            row["vs"] = baseline[name]
            row.update({f"{k}_vs": rc.paired([p[k] for p in pairs], [b[k] for b in base]) for k in ("mad", "flip")})
        churn_rows[name] = row
        emit(row)
    return {"rows": summary, "churn": churn_rows}


def markdown(result: dict) -> str:
    rows, churn = result["rows"], result["churn"]
    pm = lambda s, k=100, d=1: f"{s['mean'] * k:.{d}f} ± {s['std'] * k:.{d}f}"  # noqa: E731
    dv = lambda r, m, k, d: (f"{r[m + '_vs']['mean'] * k:+.{d}f}" + (" (noise)" if r[m + "_vs"]["inside_noise"]  # noqa: E731
                                                                  else "")) if m + "_vs" in r else ""
    first = next(iter(rows.values()))
    marks = [s for s in first["acc_by_step"] if int(s) in (100, 200, 300, 600) or s == max(first["acc_by_step"])]
    marks = sorted(set(marks), key=int)
    out = ["| setting | " + " | ".join(f"acc % @ {s}" for s in marks)
           + " | NLL | Δ acc vs plain, same data | Δ NLL | mean staleness |", "|---|" + "---|" * (len(marks) + 4)]
    for name, r in rows.items():
        st = f"{r['mean_staleness']['mean']:.0f}" if "mean_staleness" in r else ""
        out.append(f"| {name} | " + " | ".join(pm(r["acc_by_step"][s]) for s in marks)
                   + f" | {pm(r['nll'], 1, 3)} | {dv(r, 'acc', 100, 1)} | {dv(r, 'nll', 1, 3)} | {st} |")
    out += ["", "| churn between independent runs | mean abs. difference | Δ vs plain | top-1 flips % | Δ |",
            "|---|---|---|---|---|"]
    for name, r in churn.items():
        out.append(f"| {name} | {pm(r['mad'], 1, 3)} | {dv(r, 'mad', 1, 3)} | {pm(r['flip'])} | {dv(r, 'flip', 100, 1)} |")
    return "\n".join(out)
