#!/usr/bin/env python
"""Train a student against edistill teachers, alone or under ``torchrun``.

One process::

    python examples/train_student.py --registry redis://localhost:6379/0 --service teacher
    python examples/train_student.py --teachers 10.0.0.5:50051,10.0.0.6:50051

N processes on one machine (or one per GPU)::

    torchrun --standalone --nproc_per_node=4 examples/train_student.py \\
        --registry redis://redis:6379/0 --service teacher

What each process (rank) does:

1. joins the process group when launched by torchrun (``gloo`` on CPU,
   ``NCCL`` on GPU; one GPU per rank, ``cuda:$LOCAL_RANK``);
2. reads its own shard of the training set (``DistributedSampler``, reshuffled
   every epoch with ``set_epoch``);
3. wraps its loader in its own ``DistillReader`` over the registry (or the
   teacher list), so the ranks share the teachers without coordinating: each
   picks the least loaded live teacher per batch;
4. computes Hinton's KD loss ``T² · KL(teacher ‖ student) + λ · CE`` with
   ``student_client.losses.kd_loss``; DDP averages the gradients, so every
   rank takes the same optimizer step and the replicas stay identical.

Rank 0 logs one line per epoch (loss, accuracy, agreement with the teacher)
and saves the student's state dict with ``--save``.

Data: scikit-learn's handwritten digits by default (ships with scikit-learn,
no download; 8x8 images as 64 features, 10 classes; 1257 train / 540 test).
Serve a teacher for it with ``edistill teacher serve --model
teacher_server.zoo:mlp --checkpoint digits_mlp.pt ...`` (any model mapping
``input`` (B, 64) to ``logits`` (B, 10) works). ``--dataset synthetic`` is a
Gaussian-blob problem sized by flags, for smoke tests.

Every flag can also be set by an environment variable (the flag wins):
``EDISTILL_REGISTRY`` and ``EDISTILL_SERVICE`` as for the teachers, the
others as ``EDISTILL_STUDENT_<FLAG>`` (``--batch-size`` <->
``EDISTILL_STUDENT_BATCH_SIZE``). An empty value counts as unset.

Exit codes: 0 done, 2 bad configuration or no teacher (one line on stderr
says what and what to do).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from registry import RegistryError, redact_url
from student_client import DistillReader, PoolConfig, StudentError, TeacherPool, kd_loss

logger = logging.getLogger("train_student")


# ----------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Everything the run needs; built from flags/env by :func:`parse_args`."""

    registry: str | None = None          # Redis URL of the teacher registry ...
    service: str | None = None           # ... and the teachers' service name there
    teachers: tuple[str, ...] = ()       # or a fixed list of host:port teachers
    dataset: str = "digits"              # digits (real, offline) or synthetic (smoke tests)
    synthetic_samples: int = 1024        # synthetic: training samples (test set is a quarter of it)
    synthetic_features: int = 16
    synthetic_classes: int = 4
    epochs: int = 10                     # digits: a 64-hidden MLP student plateaus after ~10
    batch_size: int = 32                 # per rank; the global batch is batch_size x world size
    lr: float = 0.05                     # SGD with momentum 0.9
    hidden: int = 64                     # student width: smaller than the digits teacher (128)
    temperature: float = 4.0             # Hinton et al. use 2..20; 4 suits 10 classes
    ce_weight: float = 0.5               # λ of the hard-label CE next to T²·KL
    window: int = 8                      # batches in flight per rank (hides teacher latency)
    timeout_s: float = 30.0              # deadline of one teacher call before it is re-sent
    wait_teachers_s: float = 60.0        # give up when no teacher is reachable this long
    workers: int = 0                     # DataLoader worker processes per rank
    device: str = "auto"                 # auto: cuda:$LOCAL_RANK if CUDA is available, else cpu
    seed: int = 0                        # same on every rank: same init and same shuffle
    save: str | None = None              # rank 0 saves the student's state dict here
    record_samples: str | None = None    # debugging: a directory for per-rank rank<R>.json records
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if (self.registry is None) == (not self.teachers):
            raise ValueError("give exactly one of --registry URL (with --service NAME) or "
                             "--teachers host:port,...; got "
                             + ("both" if self.registry else "neither (no teachers configured)"))
        if self.registry is not None and not self.service:
            raise ValueError("--registry needs --service NAME (the service the teachers registered under)")
        if self.dataset not in ("digits", "synthetic"):
            raise ValueError(f"--dataset must be digits or synthetic, got {self.dataset!r}")
        for name in ("synthetic_samples", "synthetic_features", "epochs", "batch_size", "hidden", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.synthetic_classes < 2:
            raise ValueError(f"--synthetic-classes must be >= 2, got {self.synthetic_classes}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        for name in ("lr", "temperature", "timeout_s", "wait_teachers_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
        if not (math.isfinite(self.ce_weight) and self.ce_weight >= 0):
            raise ValueError(f"--ce-weight must be a finite number >= 0, got {self.ce_weight}")


def _env_name(flag: str) -> str:
    shared = {"--registry": "EDISTILL_REGISTRY", "--service": "EDISTILL_SERVICE"}
    return shared.get(flag) or "EDISTILL_STUDENT_" + flag[2:].replace("-", "_").upper()


def build_parser() -> argparse.ArgumentParser:
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})  # the defaults
    p = argparse.ArgumentParser(
        prog="train_student.py", description=__doc__.split("\n\n")[0],
        epilog="Each flag's default can be set by the environment variable in [brackets].")

    def add(flag: str, default, help: str, **kw) -> None:
        env = _env_name(flag)
        value = os.environ.get(env, "")
        # argparse applies type= to a string default, so env values are parsed like flags.
        group.add_argument(flag, default=value if value != "" else default, help=f"{help} [{env}]", **kw)

    group = p.add_argument_group("teachers (exactly one of --registry or --teachers)")
    add("--registry", None, "Redis URL of the teacher registry, e.g. redis://redis:6379/0")
    add("--service", None, "service name the teachers registered under")
    add("--teachers", "", "comma-separated host:port teachers instead of a registry")
    add("--wait-teachers-s", d.wait_teachers_s, "fail when no teacher is reachable for this long", type=float)
    add("--timeout-s", d.timeout_s, "deadline of one teacher call (then it goes to another teacher)", type=float)
    add("--window", d.window, "batches in flight to the teachers per rank", type=int)
    group = p.add_argument_group("data")
    add("--dataset", d.dataset, "digits (scikit-learn, offline) or synthetic", choices=("digits", "synthetic"))
    add("--synthetic-samples", d.synthetic_samples, "synthetic: number of training samples", type=int)
    add("--synthetic-features", d.synthetic_features, "synthetic: features per sample", type=int)
    add("--synthetic-classes", d.synthetic_classes, "synthetic: number of classes", type=int)
    add("--workers", d.workers, "DataLoader worker processes per rank", type=int)
    group = p.add_argument_group("training")
    add("--epochs", d.epochs, "passes over the training set", type=int)
    add("--batch-size", d.batch_size, "samples per step per rank", type=int)
    add("--lr", d.lr, "SGD learning rate (momentum 0.9)", type=float)
    add("--hidden", d.hidden, "student MLP hidden width", type=int)
    add("--temperature", d.temperature, "KD temperature T", type=float)
    add("--ce-weight", d.ce_weight, "weight λ of the hard-label cross-entropy", type=float)
    add("--device", d.device, "auto, cpu or cuda (each rank uses cuda:$LOCAL_RANK)")
    add("--seed", d.seed, "random seed (the same on every rank)", type=int)
    group = p.add_argument_group("output")
    add("--save", None, "rank 0 saves the trained student's state dict to this file")
    add("--record-samples", None, "debugging: write DIR/rank<R>.json per rank with the sample ids trained on, "
        "the teacher outputs' first column and a final weights checksum")
    add("--log-level", d.log_level, "DEBUG, INFO, WARNING (ranks other than 0 log warnings only)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags (and env vars) -> a validated :class:`TrainConfig`; bad values exit 2 with a usage line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    values["teachers"] = tuple(t.strip() for t in (args.teachers or "").split(",") if t.strip())
    try:
        return TrainConfig(**values)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2


# ----------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False  # a process group exists (launched by torchrun)


def setup_distributed(device_flag: str) -> Dist:
    """Join the torchrun process group if there is one and pick this rank's device."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    if device_flag.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device_flag}: CUDA is not available on this machine; use --device cpu")
        device = torch.device("cuda", local_rank if device_flag == "cuda" else torch.device(device_flag).index)
        torch.cuda.set_device(device)
    elif device_flag == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device_flag!r}")
    if not launched:
        return Dist(device=device)
    # NCCL is the collective backend for CUDA tensors; gloo is the one for CPU.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                device=device, enabled=True)


# ------------------------------------------------------------------ data


class IndexedDataset(Dataset):
    """``(x (F,) float32, label int64, sample id int64)``: the id lets a run prove its coverage."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y  # (N, F), (N,)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def load_digits_split() -> tuple[IndexedDataset, IndexedDataset]:
    """scikit-learn digits, pixels scaled to 0..1, 70/30 stratified split (fixed, so every rank agrees)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")  # pixel values 0..16 -> 0..1; (1797, 64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    to = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return (IndexedDataset(to(xtr, torch.float32), to(ytr, torch.long)),
            IndexedDataset(to(xte, torch.float32), to(yte, torch.long)))


def make_synthetic(n: int, features: int, classes: int, seed: int) -> tuple[IndexedDataset, IndexedDataset]:
    """Gaussian blobs, one per class, plus a test set a quarter the size.

    Column 0 of a training sample is ``id / n`` (bounded, so harmless to the
    student): a tracing teacher such as ``teacher_server.zoo:latency``, whose
    ``logits[:, 0]`` echo ``input[:, 0]``, then shows which sample each
    answer belongs to (see ``--record-samples``).
    """
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, features, generator=g)  # (C, F)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (m,), generator=g)
        return centers[y] + torch.randn(m, features, generator=g), y  # (m, F), (m,)

    xtr, ytr = draw(n)
    xtr[:, 0] = torch.arange(n, dtype=torch.float32) / n
    xte, yte = draw(max(n // 4, 1))
    xte[:, 0] = 0.5
    return IndexedDataset(xtr, ytr), IndexedDataset(xte, yte)


# ----------------------------------------------------------------- model


def make_student(in_features: int, hidden: int, num_classes: int) -> nn.Module:
    """A small ReLU MLP: (B, in_features) -> logits (B, num_classes)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def weights_checksum(model: nn.Module) -> dict:
    """Sums and a SHA-256 of all parameters: equal on every rank when DDP kept the replicas in step."""
    raw = torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])  # (numel,) in model dtype
    flat = raw.double()  # float64 sums, so rounding does not hide a real difference
    return {"sum": float(flat.sum()), "abs_sum": float(flat.abs().sum()), "sq_sum": float((flat * flat).sum()),
            "numel": int(flat.numel()), "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest()}


@torch.no_grad()
def accuracy(model: nn.Module, data: IndexedDataset, device: torch.device) -> float:
    model.eval()
    pred = model(data.x.to(device)).argmax(dim=1).cpu()  # (N,)
    model.train()
    return float((pred == data.y).float().mean())


# ----------------------------------------------------------------- teachers


# ----------------------------------------------------------------- training


def train(cfg: TrainConfig, dd: Dist) -> dict:
    """Run the whole training; returns this rank's record (see ``--record-samples``)."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if cfg.dataset == "digits":
        train_set, test_set = load_digits_split()
    else:
        train_set, test_set = make_synthetic(cfg.synthetic_samples, cfg.synthetic_features,
                                             cfg.synthetic_classes, cfg.seed)
    in_features = train_set.x.shape[1]
    num_classes = 10 if cfg.dataset == "digits" else cfg.synthetic_classes

    if dd.enabled:
        # Each rank gets len/world samples. When that does not divide evenly the
        # sampler pads by repeating a few samples, so every rank runs the same
        # number of steps (DDP needs that: each step is a collective).
        sampler = DistributedSampler(train_set, num_replicas=dd.world_size, rank=dd.rank,
                                     shuffle=True, seed=cfg.seed)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed))
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=dd.device.type == "cuda")

    model = make_student(in_features, cfg.hidden, num_classes).to(dd.device)
    initial = weights_checksum(model)
    ddp = DistributedDataParallel(model, device_ids=[dd.device.index] if dd.device.type == "cuda" else None) \
        if dd.enabled else model
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.9)

    # The pool says at once (and at the deadline, clearly) when Redis or the teachers are missing.
    config = PoolConfig(timeout_s=cfg.timeout_s, wait_timeout_s=cfg.wait_teachers_s)
    if cfg.registry is not None:
        pool = TeacherPool.from_registry(cfg.registry, cfg.service, ["logits"], config=config)
    else:
        pool = TeacherPool(cfg.teachers, ["logits"], config=config)
    record = {"rank": dd.rank, "world_size": dd.world_size, "initial_weights": initial, "epochs": []}
    trace: list[list[float]] = []  # [sample id, input[0], teacher logits[0]] per sample, in training order

    # Raw teacher logits: kd_loss softens both sides with T itself.
    with pool, DistillReader(loader, pool, window=cfg.window,
                             device=dd.device if dd.device.type == "cuda" else None) as reader:
        ready = pool.wait_for_teachers(1, timeout_s=cfg.wait_teachers_s)
        logger.info("%d teacher(s) ready: %s", len(ready), ", ".join(ready))
        for epoch in range(cfg.epochs):
            if dd.enabled:
                sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
            t0 = time.perf_counter()
            # loss sum, samples, correct, agreeing with the teacher
            totals = torch.zeros(4, dtype=torch.float64, device=dd.device)
            for (x, y, ids), teacher in reader:
                x = x.to(dd.device, non_blocking=True)  # (B, F)
                y = y.to(dd.device, non_blocking=True)  # (B,)
                t_logits = teacher["logits"].to(dd.device)  # (B, C)
                if t_logits.shape != (x.shape[0], num_classes):
                    raise StudentError(f"the teacher answered logits of shape {tuple(t_logits.shape)} for a "
                                       f"batch of {x.shape[0]} samples of {num_classes} classes; serve a model "
                                       f"for this dataset (input (B, {in_features}) -> logits (B, {num_classes}))")
                logits = ddp(x)  # (B, C)
                loss = kd_loss(logits, t_logits, temperature=cfg.temperature, labels=y, ce_weight=cfg.ce_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # DDP all-reduces (averages) the gradients here
                opt.step()
                with torch.no_grad():
                    pred = logits.argmax(dim=1)
                    totals += torch.stack([loss.detach().double() * x.shape[0],
                                           torch.tensor(float(x.shape[0]), device=dd.device, dtype=torch.float64),
                                           (pred == y).sum().double(),
                                           (pred == t_logits.argmax(dim=1)).sum().double()])
                if cfg.record_samples:
                    trace += torch.stack([ids.double(), x[:, 0].double().cpu(),
                                          t_logits[:, 0].double().cpu()], dim=1).tolist()
            if dd.enabled:
                dist.all_reduce(totals)  # sums over ranks: whole-epoch numbers
            loss_sum, n, correct, agree = totals.tolist()
            stats = {"epoch": epoch + 1, "loss": loss_sum / n, "train_acc": correct / n,
                     "teacher_agreement": agree / n, "samples": int(n), "seconds": time.perf_counter() - t0}
            if dd.rank == 0:
                stats["test_acc"] = accuracy(model, test_set, dd.device)
                logger.info("epoch %d/%d  loss %.4f  train acc %.3f  test acc %.3f  agrees with teacher %.3f  "
                            "(%d samples, %.1f s)", epoch + 1, cfg.epochs, stats["loss"], stats["train_acc"],
                            stats["test_acc"], stats["teacher_agreement"], n, stats["seconds"])
            record["epochs"].append(stats)
        record["reader"] = reader.stats().as_dict()

    record["samples"] = trace
    record["final_weights"] = weights_checksum(model)
    if cfg.save and dd.rank == 0:
        path = pathlib.Path(cfg.save)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
        logger.info("saved the student's state dict to %s", path)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO) if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    dd = None
    try:
        dd = setup_distributed(cfg.device)
        if dd.rank == 0:
            logger.info("world size %d, device %s, dataset %s, %s", dd.world_size, dd.device, cfg.dataset,
                        f"registry {redact_url(cfg.registry)} service {cfg.service!r}" if cfg.registry
                        else f"teachers {','.join(cfg.teachers)}")
        record = train(cfg, dd)
        if cfg.record_samples:
            out = pathlib.Path(cfg.record_samples)
            out.mkdir(parents=True, exist_ok=True)
            record["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "registry"}
            (out / f"rank{dd.rank}.json").write_text(json.dumps(record))
        return 0
    except (StudentError, RegistryError, ValueError) as exc:
        # One clear line; under torchrun the agent then stops the other ranks.
        print(f"train_student.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dd is not None and dd.enabled:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
