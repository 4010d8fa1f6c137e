"""A local request's input tensors: shared-memory descriptors mapped read-only, viewed without a copy.

The student passes one descriptor per shared-memory input with SCM_RIGHTS;
:class:`SharedInputs` owns them from receipt and closes every one (at once
when unused, right after ``mmap`` otherwise). An input tensor is a zero-copy
``torch.frombuffer`` view of its ``mmap``: torch holds a reference to the
``mmap`` object, so the mapping lives exactly as long as some tensor still
views it (see :mod:`teacher_server.local` on memory lifetime).
"""

from __future__ import annotations

import array
import math
import mmap
import os
import socket
import stat
import warnings
from typing import Sequence

import torch

from protos import codec
from protos.edistill.v1 import local_pb2
from teacher_server.errors import InvalidRequest

__all__ = ["SharedInputs", "close_all", "close_fd", "fds_of"]

_TORCH_OF_WIRE = codec.torch_dtype_maps()[0]

# torch warns (once per process) that a view of read-only memory is not
# writable. Here that is intended: inputs are read-only views of the
# student's shared memory, and the batcher copies them (concatenation, or a
# clone for a lone request) before the model runs. Ignored only when raised
# from this module, like protos.codec does (warnings.catch_warnings() per call
# would swap the process-wide filter list under other threads).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=r"teacher_server\.localinputs\Z")


class SharedInputs:
    """The descriptors of one LocalRequest, each mapped read-only on first use.

    Owns the descriptors: :meth:`close` (or mapping) closes every one.
    Event-loop thread only.
    """

    __slots__ = ("_fds", "_maps")

    def __init__(self, fds: Sequence[int]) -> None:
        self._fds = list(fds)
        self._maps: dict[int, tuple[mmap.mmap | None, int]] = {}

    def decode(self, msg: local_pb2.SharedTensor, label: str) -> torch.Tensor:
        """A zero-copy read-only view of one input (dtype and shape already validated).

        Raises:
            InvalidRequest: bad descriptor index, memory that cannot be
                mapped, or a tensor reaching past the end of its memory.
        """
        shape = list(msg.shape)
        if any(d < 0 for d in shape):
            raise InvalidRequest(f"{label}: negative dimension in shape {shape}")
        i = msg.fd_index
        if i >= len(self._fds):
            raise InvalidRequest(f"{label}: fd_index {i}, but the request carries {len(self._fds)} "
                                 "descriptor(s) (fd_count)")
        mem, size = self._map(i, label)
        count = math.prod(shape)
        nbytes = count * codec.itemsize(msg.dtype)
        if msg.offset + nbytes > size:
            raise InvalidRequest(f"{label}: shape {shape} of {codec.dtype_name(msg.dtype)} needs {nbytes} bytes "
                                 f"from offset {msg.offset}, but descriptor #{i} holds {size} bytes")
        dtype = _TORCH_OF_WIRE[msg.dtype]
        if count == 0:  # torch.frombuffer refuses count=0; nothing to share anyway
            return torch.empty(shape, dtype=dtype)
        # torch keeps a reference to `mem`: the mapping outlives this object for as long as the view lives.
        return torch.frombuffer(mem, dtype=dtype, count=count, offset=msg.offset).view(shape)

    def _map(self, i: int, label: str) -> tuple[mmap.mmap | None, int]:
        if i in self._maps:
            return self._maps[i]
        fd, self._fds[i] = self._fds[i], -1
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidRequest(f"{label}: descriptor #{i} is not shared memory (a memfd or /dev/shm file); "
                                     "send the descriptor of the tensor's shared-memory file")
            size = st.st_size
            mem = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED) if size else None
        except (OSError, ValueError, OverflowError) as exc:
            raise InvalidRequest(f"{label}: cannot map descriptor #{i} read-only ({exc}); send a shared-memory "
                                 "descriptor opened for reading") from None
        finally:
            os.close(fd)  # mmap keeps its own duplicate while mapped
        self._maps[i] = (mem, size)
        return mem, size

    def close(self) -> None:
        """Close the descriptors not mapped yet; drop this object's mappings (live views keep theirs)."""
        for fd in self._fds:
            if fd >= 0:
                close_fd(fd)
        self._fds = [-1] * len(self._fds)
        self._maps.clear()


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Descriptors passed with SCM_RIGHTS in ``recvmsg`` ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def close_all(fds: Sequence[int]) -> None:
    """Close every descriptor of ``fds``, ignoring errors."""
    for fd in fds:
        close_fd(fd)
