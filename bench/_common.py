"""Shared helpers for the benchmarks in ``bench/`` (not a public API).

Every benchmark prints one JSON object per line and ends with a summary
object; ratios are measured side by side in one run (modes interleaved per
round) because the 2-core dev box is shared and noisy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pathlib
import platform
import sys
import time
from typing import Iterator, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from teacher_server._malloc import MALLOC_ENV  # noqa: E402
from teacher_server.process import TeacherProcess, close_all  # noqa: E402


def emit(obj: dict) -> None:
    """One JSON line on stdout, flushed (benchmarks are read while they run)."""
    print(json.dumps(obj), flush=True)


#: OpenMP waiting for every process of a benchmark (this one and its teachers).
#: libgomp's default spins up to 300k iterations at every barrier, but only
#: while a process has no more OpenMP threads than CPUs: a teacher server
#: (warm-up team + forward-thread team = 4 threads > 2 CPUs) is throttled to
#: passive waiting by itself, an in-process baseline is not. On the shared
#: 2-core box, spinning threads burn the time slice their partner needs, and
#: the in-process baseline ran up to 2.8x slower than the same forward pass
#: served (teacher_overhead ratio ~2 "in favour" of serving). PASSIVE for
#: everyone makes the comparison fair and stable; pass --omp-wait-policy ""
#: to keep libgomp's default.
OMP_WAIT_POLICY = "PASSIVE"


def bench_env(omp_wait_policy: str = OMP_WAIT_POLICY) -> dict[str, str]:
    """Environment every benchmark process runs under (see MALLOC_ENV, OMP_WAIT_POLICY)."""
    env = dict(MALLOC_ENV)
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def reexec_with_env(omp_wait_policy: str = OMP_WAIT_POLICY) -> None:
    """Re-exec this script under :func:`bench_env` (children inherit it).

    glibc and libgomp read these at process start; the server applies the
    same malloc settings with mallopt (teacher_server/_malloc.py), so
    in-process baselines and student loops run under the settings the
    teachers use.
    """
    env = bench_env(omp_wait_policy)
    if not omp_wait_policy:
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "")
    if any(os.environ.get(k, "") != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def add_env_args(parser) -> None:
    """``--omp-wait-policy`` (shared by all benchmarks)."""
    parser.add_argument("--omp-wait-policy", default=OMP_WAIT_POLICY,
                        help='OMP_WAIT_POLICY for every process of the run ("" = libgomp default)')


def machine() -> dict:
    """What the numbers were measured on."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    import torch

    return {"cpus": os.cpu_count(), "cpu_model": model, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV}}


@contextlib.contextmanager
def teachers(n: int, model: str, *args: str, env: dict | None = None) -> Iterator[list[TeacherProcess]]:
    """Start ``n`` teacher server processes in parallel; always tear them all down."""
    procs = [TeacherProcess(model, *args, env=env, ready_timeout_s=180.0, pythonpath=[REPO], cwd=REPO)
             for _ in range(n)]
    try:
        # Starting is mostly importing torch: a few at a time keeps 2 cores from thrashing.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: p.start(), procs))
        yield procs
    finally:
        close_all(procs)


def latency_args(delay_ms: float, features: int, max_batch_size: int, per_sample_ms: float = 0.0) -> list[str]:
    """``serve`` arguments for ``teacher_server.zoo:latency`` (an accelerator stand-in)."""
    kwargs = {"delay_ms": delay_ms, "per_sample_ms": per_sample_ms, "features": features}
    return ["--model-kwargs", json.dumps(kwargs), "--max-batch-size", str(max_batch_size),
            "--max-queue-delay-ms", "0"]


class CpuTimer:
    """Wall time and this process's CPU time (all its threads) over a block."""

    def __enter__(self) -> "CpuTimer":
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.wall0
        self.cpu_s = time.process_time() - self.cpu0


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` (0: this one) to ``cpus``.

    ``os.sched_setaffinity(pid)`` moves only the thread whose id is ``pid``;
    threads that already exist keep their own mask, so each one is set. New
    threads inherit the mask of the thread that creates them.
    """
    tasks = f"/proc/{pid or 'self'}/task"
    for tid in os.listdir(tasks):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # a thread that just exited
            os.sched_setaffinity(int(tid), cpus)


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
