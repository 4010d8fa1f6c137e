"""glibc malloc tuning for serving large tensors.

With glibc's default (dynamic) mmap threshold, every multi-MB buffer (gRPC
messages, conv workspaces) is mmap'ed and munmap'ed per request, so each
request pays page faults on fresh zeroed pages; on a 2-core box this made a
ResNet-18 forward pass 2-4x slower (see bench/teacher_overhead.py). Keeping
such blocks in the heap fixes it. This is what the environment variables
``MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456`` do, set
at runtime with ``mallopt`` so users need not know about them.

Skipped when those variables are already set, when ``EDISTILL_MALLOC_TUNING=0``,
or when the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def tune_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds for this process; True if applied."""
    if os.environ.get("EDISTILL_MALLOC_TUNING", "1") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user chose; respect it
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl): nothing to tune
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    log.debug("malloc tuning %s", "applied" if ok else "refused by libc")
    return ok
