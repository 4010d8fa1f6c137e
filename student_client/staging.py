"""Shared memory for the same-host transport: what a batch's descriptor is.

A tensor a DataLoader worker produced already lives in fd-shared memory
(PyTorch's ``file_descriptor`` sharing strategy): :func:`shared_fd` finds its
descriptor, and the teacher maps that very memory (no copy). Anything else is
copied once into a reusable ``memfd`` staging buffer (:class:`Stager`).
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["Stager", "Staging", "shared_fd", "stage"]

_ALIGN = 64  # byte alignment of each input inside a copied memfd


_torch = None  # the torch module, bound by the first shared tensor (this module imports it lazily)


def shared_fd(value: "torch.Tensor") -> tuple[int, int] | None:
    """(descriptor, byte offset) of a torch tensor whose storage is fd-shared CPU memory, else None."""
    global _torch
    if _torch is None:
        import torch.multiprocessing

        _torch = torch
    if not value.is_cpu or not value.is_contiguous():
        return None
    if _torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return None
    try:
        # The descriptor an fd-shared storage (what a DataLoader worker hands over) already
        # holds; no copy. Raises for private memory, or memory shared another way.
        fd = value.untyped_storage()._get_shared_fd()
    except (RuntimeError, AttributeError):  # not fd-shared (or an older torch): copy instead
        return None
    return fd, value.storage_offset() * value.element_size()


class Staging:
    """A reusable memfd mapping that private-memory batches are copied into."""

    __slots__ = ("fd", "mm", "view", "capacity")

    def __init__(self, capacity: int) -> None:
        self.fd = os.memfd_create("edistill-batch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, capacity)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # fault the pages in once, now
            self.mm = mmap.mmap(self.fd, capacity, flags=flags)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = np.frombuffer(self.mm, dtype=np.uint8)
        self.capacity = capacity

    def close(self) -> None:
        self.view = None
        try:
            self.mm.close()
        except BufferError:  # a numpy view still exists somewhere: the GC unmaps it later
            pass
        os.close(self.fd)


class Stager:
    """Staging buffers for batches that are not in shared memory already.

    A batch in private memory (a pinned tensor, one made on the fly, a numpy
    array) is copied once into a staging buffer, whose descriptor is sent
    instead. Buffers are reused once their call is over, so the pages are
    faulted in once, not per batch (a fresh 768 KiB buffer per request cost
    this VM about 0.6 ms more). A buffer whose call was abandoned may be
    reused while the teacher still reads it for that call; that answer is
    dropped anyway, and the teacher only ever reads.
    """

    _CHUNK = 1 << 20  # capacities are whole MiB, so similar batches share buffers
    _MAX_FREE_BYTES = 256 << 20

    def __init__(self) -> None:
        self._free: list[Staging] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Staging:
        with self._lock:
            fits = [b for b in self._free if b.capacity >= nbytes]
            if fits:
                best = min(fits, key=lambda b: b.capacity)
                self._free.remove(best)
                return best
        return Staging(max(self._CHUNK, -(-nbytes // self._CHUNK) * self._CHUNK))

    def give(self, buf: Staging) -> None:
        with self._lock:
            if sum(b.capacity for b in self._free) + buf.capacity <= self._MAX_FREE_BYTES:
                self._free.append(buf)
                return
        buf.close()

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for b in free:
            b.close()


def stage(stager: Stager, arrays: Sequence[np.ndarray]) -> tuple[Staging, list[int]]:
    """Copy ``arrays`` back to back (64-byte aligned) into one staging buffer; their offsets."""
    offsets, pos = [], 0
    for arr in arrays:
        offsets.append(pos)
        pos += (arr.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    buf = stager.take(max(pos, _ALIGN))
    for arr, off in zip(arrays, offsets):
        if arr.nbytes:
            buf.view[off:off + arr.nbytes] = arr.reshape(-1).view(np.uint8)
    return buf, offsets
