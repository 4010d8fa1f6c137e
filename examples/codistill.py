#!/usr/bin/env python
"""Codistillation peers on scikit-learn digits: separate processes, machines, or torchrun ranks.

Try it in one command (an embedded Redis and 3 peer processes on this machine)::

    python examples/codistill.py --spawn 3

One peer per process, anywhere that reaches the registry (each on its own shard)::

    python examples/codistill.py --registry redis://redis:6379/0 --group digits --shard 0/3
    python examples/codistill.py --registry redis://redis:6379/0 --group digits --shard 1/3 ...

Under torchrun each rank is one peer; its shard comes from ``RANK`` and
``WORLD_SIZE`` (no process group is needed: the peers meet in the registry)::

    torchrun --standalone --nproc_per_node=3 examples/codistill.py --registry redis://localhost:6379/0

Each peer trains ``teacher_server.zoo.mlp`` on its shard of the digits
training set (samples ``i`` with ``i % n == shard``), serves a snapshot every
``--exchange-every`` steps, and after ``--burn-in`` steps adds the KL to the
other live peers' mean prediction to its loss
(:class:`student_client.recipes.Codistillation`). Peers may join late or
die: the others go on and say so.

Output: one JSON object per line on stdout: ``{"event": "progress", ...}``
every ``--report-every`` steps (the peers seen: version, staleness, batches
they answered; departed peers) and ``{"event": "done", ...}`` with the test
accuracy at the end. Logs go to stderr. ``--stop-file PATH`` ends training
early (final snapshot, report, leave the group, exit 0) once PATH exists:
how a scheduler, or a test, ends an open-ended run.

Exit codes: 0 done, 2 bad configuration or no peer within ``--wait-peers-s``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

log = logging.getLogger("codistill")


def _shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must be I/N (e.g. 0/3), got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard {text}: need 0 <= I < N")
    return i, n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spawn", type=int, default=0, metavar="N",
                   help="start an embedded Redis and N peer processes of this script, print their reports")
    p.add_argument("--registry", default=os.environ.get("EDISTILL_REGISTRY"),
                   help="Redis URL of the registry the peers share (default $EDISTILL_REGISTRY)")
    p.add_argument("--group", default="codistill-digits", help="peer group (registry service name)")
    p.add_argument("--name", default=None, help="this peer's name (default: rank/host/pid)")
    p.add_argument("--shard", default=None, metavar="I/N", help="this peer's shard (default: $RANK/$WORLD_SIZE)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps to train")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--exchange-every", type=int, default=50)
    p.add_argument("--burn-in", type=int, default=100)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="default: 1000 + shard")
    p.add_argument("--wait-peers", type=int, default=0, help="wait for this many other peers before training")
    p.add_argument("--wait-peers-s", type=float, default=60.0)
    p.add_argument("--report-every", type=int, default=100)
    p.add_argument("--stop-file", default=None, help="finish early once this file exists")
    p.add_argument("--heartbeat-s", type=float, default=0.5)
    p.add_argument("--ttl-s", type=float, default=1.5)
    return p.parse_args(argv)


def _emit(event: str, co, **extra) -> None:
    s = co.stats()
    peers = {p.name: {"live": p.live, "version": p.version, "staleness": p.staleness, "answered": p.answered,
                      "failed": p.failed, "mean_staleness": p.mean_staleness} for p in s.peers.values()}
    print(json.dumps({"event": event, "name": co.name, "step": s.step, "distilled": s.distilled,
                      "alone": s.alone, "peers": peers, "departed": s.departed, **extra}), flush=True)


def run_peer(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from student_client import ConfigError, NoTeacherAvailableError
    from student_client._demo_data import Digits
    from student_client.recipes import CodistillConfig, Codistillation
    from teacher_server.zoo import mlp

    if not args.registry:
        print("codistill: --registry (or $EDISTILL_REGISTRY) is required; or try --spawn 3", file=sys.stderr)
        return 2
    shard, n = _shard(args.shard)
    torch.manual_seed(1000 + shard if args.seed is None else args.seed)
    torch.set_num_threads(1)
    data = Digits()
    ids = torch.arange(len(data.y_train))[shard::n]
    loader = DataLoader(TensorDataset(data.x_train[ids], data.y_train[ids]), batch_size=args.batch_size,
                        shuffle=True, drop_last=True)
    model = mlp(hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    try:
        cfg = CodistillConfig(registry=args.registry, group=args.group, name=args.name or f"peer{shard}",
                              exchange_every=args.exchange_every, burn_in=args.burn_in,
                              distill_weight=args.distill_weight, heartbeat_s=args.heartbeat_s, ttl_s=args.ttl_s)
        co = Codistillation(model, loader, cfg)
        co.start()
    except ConfigError as exc:
        print(f"codistill: {exc}", file=sys.stderr)
        return 2
    stop = Path(args.stop_file) if args.stop_file else None
    try:
        if args.wait_peers:
            co.wait_for_peers(args.wait_peers, args.wait_peers_s)
        while co.steps < args.steps and not (stop is not None and stop.exists()):
            for (x, y), peers in co:
                loss = co.loss(model(x), peers, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                co.step()
                if co.steps % args.report_every == 0:
                    _emit("progress", co)
                if co.steps >= args.steps or (stop is not None and co.steps % 10 == 0 and stop.exists()):
                    break
        co.publish()
        with torch.no_grad():
            accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
        _emit("done", co, accuracy=accuracy, shard=f"{shard}/{n}")
        log.info("%s", co.stats().summary())
    except NoTeacherAvailableError as exc:
        print(f"codistill: {exc}", file=sys.stderr)
        return 2
    finally:
        co.close()
    return 0


def spawn(args: argparse.Namespace) -> int:
    """An embedded Redis and ``args.spawn`` peers of this script; their final lines."""
    from registry import EmbeddedRedis

    with EmbeddedRedis() as redis:
        base = [sys.executable, __file__, "--registry", redis.url, "--group", args.group, "--steps",
                str(args.steps), "--exchange-every", str(args.exchange_every), "--burn-in", str(args.burn_in),
                "--wait-peers", str(args.spawn - 1), "--report-every", str(args.report_every)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([*base, "--shard", f"{i}/{args.spawn}"], stdout=subprocess.PIPE, text=True,
                                  env=env) for i in range(args.spawn)]
        rc = 0
        for proc in procs:
            out, _ = proc.communicate()
            rc = rc or proc.returncode
            done = [json.loads(line) for line in out.splitlines() if '"event": "done"' in line]
            if done:
                d = done[-1]
                staleness = {k: v["mean_staleness"] for k, v in d["peers"].items()}
                print(f"{d['name']}: accuracy {d['accuracy']:.3f}, {d['distilled']} batches distilled, "
                      f"mean staleness by peer {staleness}")
        return rc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("teacher_server").setLevel(logging.WARNING)  # a line per snapshot otherwise
    t0 = time.monotonic()
    rc = spawn(args) if args.spawn else run_peer(args)
    log.info("finished in %.1f s", time.monotonic() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
