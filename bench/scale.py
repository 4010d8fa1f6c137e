"""Scaling over teachers: 1..32 latency teachers on loopback, one DistillReader.

Each teacher is a real ``teacher_server`` process serving
``teacher_server.zoo:latency``, a stand-in for an accelerator-hosted teacher:
it sleeps ``--delay-ms`` per batch (no CPU) and answers cheap logits. The
reader sends (64, 3072) float32 batches: the bytes of a 64x3x32x32 float32
image batch, flattened because the latency model takes (B, features).

All teachers are started once; rounds visit the N values in rotating order,
so machine noise hits every N alike. Each measurement opens a reader over
the first N teachers, fills the pipeline (two windows), then takes another
window plus ``--batches-per-teacher`` x N batches and computes the
steady-state rate from the delivery times after that window. Only one reader
exists at a time, so the process CPU time is that reader's.

Per measurement: one JSON line with throughput and the reader process's CPU
time per request (``time.process_time`` of this process, which holds only the
reader; teachers run in other processes). Summary fields:

* ``scaling_efficiency_N`` = throughput(N) / (N x throughput(1)), medians over
  rounds; target ``scaling_efficiency_16`` >= 0.9.
* ``client_cpu_us_per_request``: reader CPU per request at N=16 (median
  over rounds); target <= 200.

    python bench/scale.py [--teachers 1,2,4,8,16,32] [--delay-ms 200] [--rounds 3] [--batches-per-teacher 5]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import _common
from _common import CpuTimer, emit, median

import torch  # noqa: E402

from student_client import DistillReader  # noqa: E402


def _batches(batch_size: int, features: int, distinct: int = 8):
    """Endless (B, features) float32 batches, column 0 = sample id (made once, reused)."""
    gen = torch.Generator().manual_seed(0)
    pool = []
    for i in range(distinct):
        x = torch.randn(batch_size, features, generator=gen)
        x[:, 0] = torch.arange(i * batch_size, (i + 1) * batch_size, dtype=torch.float32)
        pool.append(x)
    return itertools.cycle(pool)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", default="1,2,4,8,16,32", help="comma-separated teacher counts")
    p.add_argument("--delay-ms", type=float, default=200.0, help="latency teacher time per batch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--features", type=int, default=3 * 32 * 32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches-per-teacher", type=int, default=8, help="timed batches per teacher per measurement")
    p.add_argument("--in-flight", type=int, default=2, help="reader window per teacher")
    _common.add_env_args(p)
    opts = p.parse_args(argv)
    _common.reexec_with_env(opts.omp_wait_policy)
    counts = sorted({int(n) for n in opts.teachers.split(",")})
    config = {"bench": "scale", "teachers": counts, "delay_ms": opts.delay_ms, "batch_size": opts.batch_size,
              "features": opts.features, "request_bytes": opts.batch_size * opts.features * 4,
              **_common.machine()}
    emit({"config": config})

    serve_args = _common.latency_args(opts.delay_ms, opts.features, opts.batch_size)
    tput: dict[int, list[float]] = {n: [] for n in counts}
    cpu_us: dict[int, list[float]] = {n: [] for n in counts}
    with _common.teachers(max(counts), "teacher_server.zoo:latency", *serve_args) as procs:
        endpoints = [t.address for t in procs]
        for r in range(opts.rounds):
            order = counts[r % len(counts):] + counts[:r % len(counts)]
            for n in order:
                # One reader at a time, so this process's CPU time is this reader's alone
                # (idle pools and channels of other N would add their background wakeups).
                with DistillReader(_batches(opts.batch_size, opts.features), teachers=endpoints[:n],
                                   window=opts.in_flight * n, timeout_s=60.0) as reader:
                    it = iter(reader)
                    for _ in range(2 * opts.in_flight * n):  # connect every channel, fill the pipeline
                        next(it)
                    k = opts.batches_per_teacher * n
                    skip = opts.in_flight * n
                    stamps = []
                    with CpuTimer() as t:
                        for _ in range(skip + k):
                            batch, out = next(it)
                            stamps.append(time.perf_counter())
                assert torch.equal(out["logits"][:, 0], batch[:, 0]), "answer does not match its batch"
                # Steady state: deliveries after the first window, whose requests
                # were partly served before the clock started.
                rate = (k - 1) / (stamps[-1] - stamps[skip])
                cpu = t.cpu_s / (skip + k) * 1e6
                tput[n].append(rate)
                cpu_us[n].append(cpu)
                emit({"round": r, "teachers": n, "batches": k, "wall_s": round(t.wall_s, 3),
                      "batches_per_s": round(rate, 2),
                      "ideal_batches_per_s": round(n * 1000.0 / opts.delay_ms, 2),
                      "client_cpu_us_per_request": round(cpu, 1)})

    base = median(tput[counts[0]]) / counts[0]
    summary = {"summary": True, **config, "rounds": opts.rounds,
               "batches_per_s": {str(n): round(median(tput[n]), 2) for n in counts}}
    for n in counts:
        summary[f"scaling_efficiency_{n}"] = round(median(tput[n]) / (n * base), 4)
    ref = 16 if 16 in counts else counts[-1]
    summary["client_cpu_us_per_request"] = round(median(cpu_us[ref]), 1)
    summary["client_cpu_us_per_request_at"] = ref
    summary["client_cpu_us_per_request_by_teachers"] = {str(n): round(median(cpu_us[n]), 1) for n in counts}
    summary["targets"] = {"scaling_efficiency_16": 0.9, "client_cpu_us_per_request": 200}
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
