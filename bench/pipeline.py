"""Student training throughput: no teacher vs regular distillation vs the service.

A small CNN student trains on 3x32x32 batches (synthetic, made once) in three
modes, interleaved round by round (the order rotates) so noise hits all alike:

* ``plain`` (a): the loader alone, cross-entropy, no teacher.
* ``regular`` (b): the teacher's forward pass in the same process before
  each step (:class:`student_client.InProcessTeacher`), Hinton KD loss.
* ``service`` (c): :class:`student_client.DistillReader` over ``--teachers``
  real teacher server processes on loopback, same KD loss. One epoch iterator
  lives across rounds, so (c) is measured in steady state.

The teacher is by default ``teacher_server.zoo:latency``, a stand-in for an
accelerator-hosted teacher: it waits ``--delay-ms`` per batch without using
CPU (in (b) the training thread waits for it, as it would for a GPU). With no
``--delay-ms`` the delay is ``--teacher-factor`` (1.8) x the student's
measured step time, the setting of the ``ratio_vs_regular`` target. The
teachers' capacity (N / delay) then exceeds the student's demand (1 / step)
for N >= 2, the setting of the ``ratio_vs_plain`` target. ``--teacher cnn``
serves a real ResNet-18-style CNN instead (on this 2-core box it then
competes with the student for the same cores, so expect lower ratios).

Where the cores go (``--cores``). The latency teacher stands in for a
teacher on *another* machine, but its process still runs here: receiving and
decoding a 768 KiB request costs its host CPU a few ms, and on a shared
2-core box that CPU is taken from the student. Two settings, measured in the
same run, round by round:

* ``pinned`` (the default, and the faithful emulation): the student process
  on CPU 0 with ``torch.set_num_threads(1)`` in all three modes, the teacher
  processes on CPU 1. The teachers' host work no longer competes with the
  student, as on separate machines, while everything the student's own
  process does (its gRPC client, the reader) still counts against it. Modes
  (a), (b) and (c) get the same single core, so the ratios compare like with
  like. The latency delay is calibrated on the pinned step.
* ``shared``: no pinning, the student with torch's default threads (2), the
  teachers' host work on the same two cores (the earlier measurement; a
  pessimistic emulation, since real remote teachers cost the student host
  nothing).

Transport: the teachers run on this machine, so by default the reader uses
the same-host local transport (:mod:`student_client.local`) and the batches
are in shared memory, as a DataLoader with workers delivers them
(``--loader shared``); ``--transport grpc`` measures the gRPC path that
teachers on other machines get, ``--loader private`` the one-copy local path.

``--source cache`` measures the offline mode instead of the service in (c):
the 8 distinct batches are recorded once (in-process teacher, before timing)
into a temporary cache and (c) reads them back through a
:class:`student_client.CachedTeacher` (keys: batch number x batch size +
row); no teacher process runs.

Summary: ``ratio_vs_plain`` = c / a (target >= 0.95), ``ratio_vs_regular``
= c / b (target >= 2.5), medians of steps/s over rounds, for the ``pinned``
setting; ``ratio_vs_plain_shared_cores`` and ``ratio_vs_regular_shared_cores``
for ``shared``. ``--cores shared`` or ``--cores pinned`` runs one setting
(then the plain names hold that setting's numbers).

    python bench/pipeline.py [--teachers 4] [--rounds 5] [--steps 30] [--teacher latency|cnn] \
        [--cores both|pinned|shared] [--transport auto|grpc] [--loader shared|private] [--source service|cache]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import _common
from _common import emit, median

import torch  # noqa: E402
from torch import nn  # noqa: E402

from student_client import CachedTeacher, DistillReader, InProcessTeacher, SourceRequest, TeacherPool  # noqa: E402
from student_client import record  # noqa: E402
from student_client.config import PoolConfig  # noqa: E402
from student_client.losses import kd_loss  # noqa: E402
from teacher_server import zoo  # noqa: E402

TEMPERATURE = 4.0


def student(width: int) -> nn.Module:
    """Small CNN: (B, 3, 32, 32) -> (B, 10)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, w, 16, 16)
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, 8, 8)
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),  # (B, 4w, 1, 1)
        nn.Flatten(), nn.Linear(4 * width, 10))


def loader(batch_size: int, distinct: int = 8, shared: bool = True):
    """Endless (images, labels) batches, made once (the loader costs the same in every mode).

    ``shared``: in shared memory, as a DataLoader with workers delivers them
    (the local transport then passes them to a same-host teacher without a copy).
    """
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen))
               for _ in range(distinct)]
    if shared:
        for images, labels in batches:
            images.share_memory_(), labels.share_memory_()
    return itertools.cycle(batches)


def _record_cache(data, teacher: InProcessTeacher, batch_size: int, distinct: int = 8):
    """Record the loader's ``distinct`` batches into a temporary cache; ``(directory, sample_keys)``."""
    import tempfile

    batches = [next(data) for _ in range(distinct)]  # the cycle comes back to the first batch after these
    number = {id(images): i for i, (images, _) in enumerate(batches)}

    def keys(batch) -> list[int]:
        i = number[id(batch[0])]
        return list(range(i * batch_size, (i + 1) * batch_size))

    directory = tempfile.mkdtemp(prefix="edistill-bench-cache-")
    record(batches, teacher, directory, sample_keys=keys, teacher_input=lambda b: b[0])
    return directory, keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", type=int, default=4, help="teacher server processes for mode (c)")
    p.add_argument("--teacher", choices=("latency", "cnn"), default="latency")
    p.add_argument("--delay-ms", type=float, default=None, help="latency teacher time per batch")
    p.add_argument("--teacher-factor", type=float, default=1.8, help="delay = factor x step time (no --delay-ms)")
    p.add_argument("--cnn-width", type=int, default=16, help="width of the CNN teacher (64 = ResNet-18)")
    p.add_argument("--student-width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="training steps per mode per round")
    p.add_argument("--window", type=int, default=None, help="reader window (default 2 x teachers + 2)")
    p.add_argument("--loader", choices=("shared", "private"), default="shared",
                   help="batches in shared memory (as DataLoader workers deliver them) or private memory")
    p.add_argument("--transport", choices=("auto", "grpc"), default="auto",
                   help="auto: the same-host local transport (teachers here); grpc: gRPC only, as for remote teachers")
    p.add_argument("--source", choices=("service", "cache"), default="service",
                   help="mode (c): teacher servers, or answers recorded to a cache beforehand")
    p.add_argument("--cores", choices=("both", "pinned", "shared"), default="both",
                   help="pinned: student on CPU 0 (1 torch thread), teachers on CPU 1; shared: no pinning")
    _common.add_env_args(p)
    opts = p.parse_args(argv)
    _common.reexec_with_env(opts.omp_wait_policy)

    settings = ["pinned", "shared"] if opts.cores == "both" else [opts.cores]
    all_cpus = set(range(os.cpu_count() or 1))
    if "pinned" in settings and len(all_cpus) < 2:
        p.error("--cores pinned needs 2 CPUs (one for the student, one for the teachers); use --cores shared")
    default_threads = torch.get_num_threads()
    procs: list = []

    def apply(setting: str) -> None:
        """Pin (or unpin) this process and every teacher, and set the student's torch threads."""
        if setting == "pinned":
            _common.set_affinity(0, {0})
            torch.set_num_threads(1)
            teacher_cpus = all_cpus - {0}
        else:
            _common.set_affinity(0, all_cpus)
            torch.set_num_threads(default_threads)
            teacher_cpus = all_cpus
        for proc in procs:
            _common.set_affinity(proc.pid, teacher_cpus)

    net = student(opts.student_width)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    data = loader(opts.batch_size, shared=opts.loader == "shared")

    def step(images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None) -> None:
        out = net(images)
        if teacher_logits is None:
            loss = nn.functional.cross_entropy(out, labels)
        else:
            loss = kd_loss(out, teacher_logits, labels=labels, temperature=TEMPERATURE, ce_weight=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # Calibrate the student's step time (plain, in the first setting), which sets the latency
    # teacher's delay.
    apply(settings[0])
    for _ in range(5):
        step(*next(data), None)
    t0 = time.perf_counter()
    for _ in range(15):
        step(*next(data), None)
    step_ms = (time.perf_counter() - t0) / 15 * 1000
    delay_ms = opts.delay_ms if opts.delay_ms is not None else round(opts.teacher_factor * step_ms, 1)
    apply("shared")  # teachers start faster with both cores; they are pinned once they run

    if opts.teacher == "latency":
        features = 3 * 32 * 32
        spec, serve_args = "teacher_server.zoo:latency", _common.latency_args(delay_ms, features, opts.batch_size)
        local_model = zoo.latency(delay_ms=delay_ms, features=features)
        send = lambda batch: batch[0].reshape(len(batch[0]), -1)  # noqa: E731  (B, 3072): the latency model's input
    else:
        spec = "teacher_server.zoo:resnet18_cifar"
        serve_args = ["--model-kwargs", json.dumps({"width": opts.cnn_width}), "--max-batch-size",
                      str(opts.batch_size), "--max-queue-delay-ms", "0"]
        local_model = zoo.resnet18_cifar(width=opts.cnn_width).eval()
        send = lambda batch: batch[0]  # noqa: E731
    config = {"bench": "pipeline", "teacher": opts.teacher, "teachers": opts.teachers, "batch_size": opts.batch_size,
              "student_width": opts.student_width, "student_step_ms": round(step_ms, 2),
              "teacher_delay_ms": delay_ms if opts.teacher == "latency" else None,
              "cnn_width": opts.cnn_width if opts.teacher == "cnn" else None, "cores": settings,
              "student_step_ms_setting": settings[0], "loader": opts.loader, "transport": opts.transport,
              "source": opts.source,
              **_common.machine()}
    emit({"config": config})

    regular = InProcessTeacher(lambda x: local_model(send((x,))), outputs=["logits"])
    window = opts.window or 2 * opts.teachers + 2
    rates = {(c, m): [] for c in settings for m in ("plain", "regular", "service")}
    cpu_ms = {k: [] for k in rates}  # this process's CPU (all its threads) per step
    reader_keys = None
    if opts.source == "cache":  # record the distinct batches once; (c) then reads them back by key
        cache_dir, reader_keys = _record_cache(data, regular, opts.batch_size)
    with _common.teachers(opts.teachers if opts.source == "service" else 0, spec, *serve_args) as started, \
            (TeacherPool([t.address for t in started], config=PoolConfig(
                timeout_s=60.0, local_transport="off" if opts.transport == "grpc" else "auto"))
             if opts.source == "service" else CachedTeacher(cache_dir)) as pool, \
            DistillReader(data, pool, window=window, teacher_input=send, sample_keys=reader_keys) as reader:
        procs.extend(started)
        service_it = iter(reader)

        def run(mode: str) -> None:
            for _ in range(opts.steps):
                if mode == "plain":
                    images, labels = next(data)
                    step(images, labels, None)
                elif mode == "regular":
                    images, labels = next(data)
                    step(images, labels, regular.submit(SourceRequest({"input": images}, None)).result()["logits"])
                else:
                    (images, labels), teacher = next(service_it)
                    step(images, labels, teacher["logits"])

        modes = ["plain", "regular", "service"]
        for setting in settings:  # warm-up: every mode once per setting, every teacher connected
            apply(setting)
            for mode in modes:
                run(mode)
        for r in range(opts.rounds):
            for setting in settings[r % len(settings):] + settings[:r % len(settings)]:
                apply(setting)
                for mode in modes[r % 3:] + modes[:r % 3]:
                    t0, c0 = time.perf_counter(), time.process_time()
                    run(mode)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    rates[setting, mode].append(opts.steps / dt)
                    cpu_ms[setting, mode].append(dc / opts.steps * 1000)
                    emit({"round": r, "cores": setting, "mode": mode, "steps": opts.steps,
                          "steps_per_s": round(opts.steps / dt, 3), "ms_per_step": round(dt / opts.steps * 1000, 2),
                          "cpu_ms_per_step": round(dc / opts.steps * 1000, 2)})
        reader_stats = reader.stats()
        apply("shared")
    summary = {"summary": True, **config, "rounds": opts.rounds, "steps_per_round": opts.steps, "window": window}
    for i, setting in enumerate(settings):
        a, b, c = (median(rates[setting, m]) for m in ("plain", "regular", "service"))
        suffix = "" if i == 0 else "_shared_cores"  # settings[0] is "pinned" unless --cores shared
        summary.update({f"plain_steps_per_s{suffix}": round(a, 3), f"regular_steps_per_s{suffix}": round(b, 3),
                        f"service_steps_per_s{suffix}": round(c, 3), f"ratio_vs_plain{suffix}": round(c / a, 4),
                        f"ratio_vs_regular{suffix}": round(c / b, 4),
                        # what the service mode costs the student's process beyond plain training
                        # (its gRPC client, the reader, the KD loss), in CPU ms per step
                        f"service_extra_cpu_ms_per_step{suffix}": round(
                            median(cpu_ms[setting, "service"]) - median(cpu_ms[setting, "plain"]), 2)})
    summary["ratios_measured_with"] = settings[0]
    summary["transports_used"] = sorted({t.transport for t in reader_stats.teachers.values()})
    emit({**summary, "reader_wait_s": round(reader_stats.wait_s, 3),
          "targets": {"ratio_vs_plain": 0.95, "ratio_vs_regular": 2.5}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
