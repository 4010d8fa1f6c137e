"""glibc malloc tuning for serving large tensors.

With glibc's default (dynamic) mmap threshold, every multi-MB buffer (gRPC
messages, conv workspaces) is mmap'ed and munmap'ed per request, so each
request pays page faults on fresh zeroed pages; on a 2-core box this made a
ResNet-18 forward pass 2-4x slower (see bench/teacher_overhead.py). Keeping
such blocks in the heap fixes it. This is what the environment variables
``MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456`` do, set
at runtime with ``mallopt`` so users need not know about them.

The thresholds only hold for the main arena. The forward pass runs in a
worker thread, which glibc gives its own arena made of 64 MiB mmap'ed
sub-heaps, and a sub-heap that becomes empty is munmap'ed whatever the trim
threshold says (glibc ``heap_trim``). A ResNet-18 batch of 64 frees its
activations at the end of every forward, so every request re-faulted up to
~20k fresh pages (~80 MiB; strace showed 64 MiB munmaps per request) and the
served forward was ~25% slower than the same forward on the main thread
(bench/teacher_overhead.py). ``MALLOC_ARENA_MAX=1`` puts every thread on the
main arena: after that a served batch takes ~20 page faults, like in-process.
The price, one malloc lock shared by a handful of threads, is invisible next
to ~100 large allocations per forward pass.

Each setting is skipped when its environment variable is set (the user
chose), and everything when ``EDISTILL_MALLOC_TUNING=0`` or the C library is
not glibc. Call it before other threads allocate: glibc fixes its arena
limit on a thread's first allocation, so a later call cannot move threads
that already have an arena of their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 64 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
ARENA_MAX = 1

#: mallopt parameter, value and the environment variable glibc reads for it.
_SETTINGS = (
    (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES, "MALLOC_MMAP_THRESHOLD_"),
    (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES, "MALLOC_TRIM_THRESHOLD_"),
    (_M_ARENA_MAX, ARENA_MAX, "MALLOC_ARENA_MAX"),
)

#: The same settings as environment variables (for child processes and benchmarks).
MALLOC_ENV = {env: str(value) for _, value, env in _SETTINGS}


def tune_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds and use one arena; True if all applied."""
    if os.environ.get("EDISTILL_MALLOC_TUNING", "1") == "0":
        return False
    todo = [(param, value) for param, value, env in _SETTINGS if env not in os.environ]  # else the user chose
    if not todo:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl): nothing to tune
    ok = all([mallopt(param, value) == 1 for param, value in todo])
    log.debug("malloc tuning %s", "applied" if ok else "refused by libc")
    return ok
