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
from tests.helpers.teacher_proc import TeacherProcess  # noqa: E402


def emit(obj: dict) -> None:
    """One JSON line on stdout, flushed (benchmarks are read while they run)."""
    print(json.dumps(obj), flush=True)


def reexec_with_malloc_env() -> None:
    """Re-exec this script with the teacher server's glibc malloc settings.

    glibc reads them at process start; the server applies the same ones with
    mallopt (teacher_server/_malloc.py), so in-process baselines and student
    loops run under the allocator settings the teachers use.
    """
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


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
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


@contextlib.contextmanager
def teachers(n: int, model: str, *args: str, env: dict | None = None) -> Iterator[list[TeacherProcess]]:
    """Start ``n`` teacher server processes in parallel; always tear them all down."""
    procs = [TeacherProcess(model, *args, env=env, ready_timeout_s=180.0) for _ in range(n)]
    try:
        # Starting is mostly importing torch: a few at a time keeps 2 cores from thrashing.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: p.start(), procs))
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.close()


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


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
