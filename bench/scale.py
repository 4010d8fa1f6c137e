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

The teachers run on this machine, so the reader uses the same-host local
transport (:mod:`student_client.local`: a small frame over the teacher's
Unix socket, the batch passed as shared memory). The batches are made once
and moved to shared memory (``share_memory_()``), which is how a DataLoader
with workers hands them over; the teacher then reads them with no copy. At
the reference N (16) the same round also measures the reader with the
batches in private memory (``local_copy``: one copy into a memfd per
request), the reader over gRPC only (``grpc``: ``PoolConfig(local_transport=
"off")``, what a student pays for teachers on other machines), and a bare
grpcio client (below).

Per measurement: one JSON line with throughput and the reader process's CPU
time per request (``time.process_time`` of this process, which holds only the
reader; teachers run in other processes).

The reader's CPU per request depends on the request rate far more than on
the work per request: at 80 batches/s (16 teachers of 200 ms) the reader
sleeps between answers, and every wakeup starts on caches the 16 teacher
processes have evicted, so most of its CPU goes to cache misses. Under load
the same code costs a fraction of that per request. The figure against the
target is therefore measured under load, as CPU per operation usually is:
after the scaling rounds, ``--load-delay-ms`` teachers (2 ms, fast enough
that the 2-core machine, not the teachers' latency, limits the rate) serve
the same reader at N=16, in rounds alternating with the reader over gRPC.
The low-rate figures of the scaling rounds are reported beside it.

Summary fields:

* ``scaling_efficiency_N`` = throughput(N) / (N x throughput(1)), medians over
  rounds; target ``scaling_efficiency_16`` >= 0.9.
* ``client_cpu_us_per_request``: reader CPU per request under load (median
  over rounds), N=16, local transport, batches in shared memory; target
  <= 200. ``client_cpu_us_per_request_load_batches_per_s``: the rate it was
  measured at; ``client_cpu_us_per_request_load_grpc``: the same reader over
  gRPC.
* ``client_cpu_us_per_request_low_rate``: the same reader in the scaling
  rounds at N=16 (``--delay-ms`` teachers, about 80 batches/s), and
  ``client_cpu_us_per_request_local_copy`` and
  ``client_cpu_us_per_request_grpc``: the same for private-memory batches
  and for gRPC.
* ``grpc_floor_cpu_us_per_request``: the same measurement for a bare grpcio
  client at N=16 in the same round (same teachers, same window, same request
  rate): one channel per teacher, ``unary_unary(...).future()`` on a request
  serialized once up front, responses left as bytes; the main thread waits
  on the oldest call and re-sends, like the reader. Nothing a grpcio client
  can do costs less. ``grpc_floor_with_copy_cpu_us_per_request`` adds the
  one copy of the batch into a fresh request that every gRPC client needs
  (``student_client.wire.serialize_request`` per request), and
  ``client_overhead_above_floor_us`` = reader over gRPC - floor with copy:
  what the pool and reader themselves add to gRPC.

    python bench/scale.py [--teachers 1,2,4,8,16,32] [--delay-ms 200] [--rounds 3] [--batches-per-teacher 8]
                          [--load-delay-ms 2] [--load-batches-per-teacher 150]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import time

import _common
from _common import CpuTimer, emit, median

import torch  # noqa: E402

from student_client import DistillReader, TeacherPool  # noqa: E402
from student_client.config import PoolConfig  # noqa: E402
from student_client.wire import serialize_request  # noqa: E402


def _batches(batch_size: int, features: int, distinct: int = 8, shared: bool = False):
    """Endless (B, features) float32 batches, column 0 = sample id (made once, reused).

    ``shared``: in shared memory, as a DataLoader with workers delivers them.
    """
    gen = torch.Generator().manual_seed(0)
    pool = []
    for i in range(distinct):
        x = torch.randn(batch_size, features, generator=gen)
        x[:, 0] = torch.arange(i * batch_size, (i + 1) * batch_size, dtype=torch.float32)
        pool.append(x.share_memory_() if shared else x)
    return itertools.cycle(pool)


def _reader_run(endpoints: list[str], batches, in_flight: int, batches_per_teacher: int,
                config: PoolConfig | None = None) -> tuple[float, float, float, dict]:
    """(batches/s, client CPU us per request, wall s, transports used) of one DistillReader run."""
    n = len(endpoints)
    config = (config or PoolConfig.from_env()).replace(timeout_s=60.0)
    with TeacherPool(endpoints, config=config) as pool, DistillReader(batches, pool, window=in_flight * n) as reader:
        it = iter(reader)
        for _ in range(2 * in_flight * n):  # connect every channel, fill the pipeline
            next(it)
        k = batches_per_teacher * n
        skip = in_flight * n
        stamps = []
        with CpuTimer() as t:
            for _ in range(skip + k):
                batch, out = next(it)
                stamps.append(time.perf_counter())
        transports = collections.Counter(s.transport for s in reader.stats().teachers.values())
    assert torch.equal(out["logits"][:, 0], batch[:, 0]), "answer does not match its batch"
    # Steady state: deliveries after the first window, whose requests
    # were partly served before the clock started.
    return (k - 1) / (stamps[-1] - stamps[skip]), t.cpu_s / (skip + k) * 1e6, t.wall_s, dict(transports)


def _grpc_floor(endpoints: list[str], batches, in_flight: int, warm: int, skip: int, k: int,
                copy: bool) -> tuple[float, float]:
    """(batches/s, client CPU us per request) of a bare grpcio client; see the module docstring."""
    import grpc

    options = PoolConfig().channel_options()
    channels = [grpc.insecure_channel(e, options=options) for e in endpoints]
    try:
        calls = [c.unary_unary("/edistill.v1.Teacher/Predict", request_serializer=None,
                               response_deserializer=None) for c in channels]
        fixed, _ = serialize_request("floor-0", {"input": next(batches)}, b"")
        seq = itertools.count()

        def send(i: int):
            payload = serialize_request(f"floor-{next(seq)}", {"input": next(batches)}, b"")[0] if copy else fixed
            return i, calls[i].future(payload, timeout=60.0)

        pending = collections.deque(send(i) for _ in range(in_flight) for i in range(len(calls)))

        def step() -> None:  # wait for the oldest call, send the next request to the same teacher
            i, fut = pending.popleft()
            fut.result()
            pending.append(send(i))

        for _ in range(warm):
            step()
        stamps = []
        with CpuTimer() as t:
            for _ in range(skip + k):
                step()
                stamps.append(time.perf_counter())
        for _, fut in pending:
            fut.result()
        return (k - 1) / (stamps[-1] - stamps[skip]), t.cpu_s / (skip + k) * 1e6
    finally:
        for c in channels:
            c.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", default="1,2,4,8,16,32", help="comma-separated teacher counts")
    p.add_argument("--delay-ms", type=float, default=200.0, help="latency teacher time per batch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--features", type=int, default=3 * 32 * 32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches-per-teacher", type=int, default=8, help="timed batches per teacher per measurement")
    p.add_argument("--in-flight", type=int, default=2, help="reader window per teacher")
    p.add_argument("--load-delay-ms", type=float, default=2.0,
                   help="latency teacher time per batch for the under-load CPU measurement (0: skip it)")
    p.add_argument("--load-batches-per-teacher", type=int, default=150,
                   help="timed batches per teacher per under-load measurement")
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
    ref = 16 if 16 in counts else counts[-1]
    floor_us: dict[str, list[float]] = {"floor": [], "floor_with_copy": []}
    variant_us: dict[str, list[float]] = {"local_copy": [], "grpc": []}
    with _common.teachers(max(counts), "teacher_server.zoo:latency", *serve_args) as procs:
        endpoints = [t.address for t in procs]
        for r in range(opts.rounds):
            order = counts[r % len(counts):] + counts[:r % len(counts)]
            for n in order:
                # One reader at a time, so this process's CPU time is this reader's alone
                # (idle pools and channels of other N would add their background wakeups).
                k = opts.batches_per_teacher * n
                skip = opts.in_flight * n
                rate, cpu, wall, transports = _reader_run(
                    endpoints[:n], _batches(opts.batch_size, opts.features, shared=True), opts.in_flight,
                    opts.batches_per_teacher)
                tput[n].append(rate)
                cpu_us[n].append(cpu)
                emit({"round": r, "teachers": n, "batches": k, "wall_s": round(wall, 3),
                      "batches_per_s": round(rate, 2),
                      "ideal_batches_per_s": round(n * 1000.0 / opts.delay_ms, 2),
                      "client_cpu_us_per_request": round(cpu, 1), "transports": transports})
                if n != ref:
                    continue
                for mode, shared, cfg in (("local_copy", False, None),
                                          ("grpc", True, PoolConfig(local_transport="off"))):
                    rate, cpu, wall, transports = _reader_run(
                        endpoints[:n], _batches(opts.batch_size, opts.features, shared=shared), opts.in_flight,
                        opts.batches_per_teacher, cfg)
                    variant_us[mode].append(cpu)
                    emit({"round": r, "teachers": n, "mode": mode, "batches": k, "batches_per_s": round(rate, 2),
                          "client_cpu_us_per_request": round(cpu, 1), "transports": transports})
                # The bare-grpcio floor, right after the reader at the same N, rate and window.
                for mode, copy in (("floor", False), ("floor_with_copy", True)):
                    rate, cpu = _grpc_floor(endpoints[:n], _batches(opts.batch_size, opts.features),
                                            opts.in_flight, 2 * opts.in_flight * n, skip, k, copy)
                    floor_us[mode].append(cpu)
                    emit({"round": r, "teachers": n, "mode": f"grpc_{mode}", "batches": k,
                          "batches_per_s": round(rate, 2), "client_cpu_us_per_request": round(cpu, 1)})

    # Under load: the reader's CPU per request when it is kept busy (see the module docstring).
    load_us: dict[str, list[float]] = {"local": [], "grpc": []}
    load_rate: list[float] = []
    if opts.load_delay_ms > 0:
        load_args = _common.latency_args(opts.load_delay_ms, opts.features, opts.batch_size)
        with _common.teachers(ref, "teacher_server.zoo:latency", *load_args) as procs:
            endpoints = [t.address for t in procs]
            for r in range(opts.rounds):
                modes = [("local", None), ("grpc", PoolConfig(local_transport="off"))]
                for mode, cfg in modes[r % 2:] + modes[:r % 2]:
                    rate, cpu, wall, transports = _reader_run(
                        endpoints, _batches(opts.batch_size, opts.features, shared=True), opts.in_flight,
                        opts.load_batches_per_teacher, cfg)
                    load_us[mode].append(cpu)
                    if mode == "local":
                        load_rate.append(rate)
                    emit({"round": r, "teachers": ref, "mode": f"load_{mode}", "delay_ms": opts.load_delay_ms,
                          "batches": opts.load_batches_per_teacher * ref, "batches_per_s": round(rate, 2),
                          "client_cpu_us_per_request": round(cpu, 1), "transports": transports})

    base = median(tput[counts[0]]) / counts[0]
    summary = {"summary": True, **config, "rounds": opts.rounds,
               "batches_per_s": {str(n): round(median(tput[n]), 2) for n in counts}}
    for n in counts:
        summary[f"scaling_efficiency_{n}"] = round(median(tput[n]) / (n * base), 4)
    if load_rate:
        summary["client_cpu_us_per_request"] = round(median(load_us["local"]), 1)
        summary["client_cpu_us_per_request_load_batches_per_s"] = round(median(load_rate), 1)
        summary["client_cpu_us_per_request_load_grpc"] = round(median(load_us["grpc"]), 1)
    else:  # --load-delay-ms 0: not measured
        summary["client_cpu_us_per_request"] = None
    summary["client_cpu_us_per_request_low_rate"] = round(median(cpu_us[ref]), 1)
    summary["client_cpu_us_per_request_low_rate_batches_per_s"] = round(median(tput[ref]), 1)
    summary["grpc_floor_cpu_us_per_request"] = round(median(floor_us["floor"]), 1)
    summary["grpc_floor_with_copy_cpu_us_per_request"] = round(median(floor_us["floor_with_copy"]), 1)
    summary["client_cpu_us_per_request_local_copy"] = round(median(variant_us["local_copy"]), 1)
    summary["client_cpu_us_per_request_grpc"] = round(median(variant_us["grpc"]), 1)
    summary["client_overhead_above_floor_us"] = round(
        median(variant_us["grpc"]) - median(floor_us["floor_with_copy"]), 1)
    summary["client_cpu_us_per_request_at"] = ref
    summary["client_cpu_us_per_request_by_teachers"] = {str(n): round(median(cpu_us[n]), 1) for n in counts}
    summary["targets"] = {"scaling_efficiency_16": 0.9, "client_cpu_us_per_request": 200}
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
