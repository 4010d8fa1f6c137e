"""Tensor codec: numpy arrays and torch tensors <-> ``edistill.v1.Tensor``.

Tensors travel as raw row-major little-endian bytes plus dtype and shape.
Decoding is zero-copy: the returned array or tensor is a read-only view of
the message's ``bytes`` field, valid as long as the caller holds it (the view
keeps the bytes alive). Encoding writes into a message the caller owns, so
responses are built in place without intermediate message copies.

bfloat16 has no numpy dtype: :func:`to_numpy` returns its raw bits as
``uint16`` (use :func:`to_torch` for a real bfloat16 tensor).

This module is the one home of the wire dtype maps: :data:`DTYPE_NAMES`
(names), :data:`WIRE_OF_NP` (numpy) and :func:`torch_dtype_maps` (torch,
built once on first use, so numpy-only users never import torch).

Every malformed tensor raises :class:`CodecError` (a ``ValueError``) whose
message names the tensor and what is wrong with it.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from protos.edistill.v1 import teacher_pb2 as pb

if TYPE_CHECKING:  # torch is optional for users of the numpy half
    import torch

__all__ = [
    "CodecError",
    "DTYPE_NAMES",
    "WIRE_OF_NP",
    "dtype_from_name",
    "dtype_name",
    "encode",
    "itemsize",
    "to_numpy",
    "to_torch",
    "torch_dtype_maps",
    "varint",
]

# torch warns (once per process) that a view of immutable bytes is not
# writable. Here the view is intended (zero-copy decode; see to_torch), so the
# warning is ignored -- but only when raised from this module: the filter's
# ``module`` is matched against the module of the frame that called torch, so
# a user's own torch.from_numpy(read-only array) still warns. One filter added
# once at import, because warnings.catch_warnings() around each call would
# swap the process-wide filter list under other threads. Caveat (torch's, not
# ours): torch raises the warning only once per process, so after a decode
# here a user's later call would not warn anyway.
warnings.filterwarnings("ignore", message="The given (NumPy array|buffer) is not writable",
                        category=UserWarning, module=r"protos\.codec\Z")

_LITTLE = sys.byteorder == "little"

# wire dtype -> numpy dtype used to view the raw bytes
_NP_OF_WIRE: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype("<u2"),  # raw bits, see module docstring
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
    pb.UINT8: np.dtype("u1"),
    pb.BOOL: np.dtype("?"),
    pb.UINT16: np.dtype("<u2"),
}

#: numpy dtype name -> wire dtype of the arrays that can be sent (bfloat16: send a torch tensor).
WIRE_OF_NP: dict[str, int] = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "int64": pb.INT64,
    "int32": pb.INT32,
    "uint8": pb.UINT8,
    "bool": pb.BOOL,
    "uint16": pb.UINT16,
}

#: User-facing dtype names, as accepted by CLIs and configs.
DTYPE_NAMES: dict[str, int] = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "bfloat16": pb.BFLOAT16,
    "int64": pb.INT64,
    "int32": pb.INT32,
    "uint8": pb.UINT8,
    "bool": pb.BOOL,
    "uint16": pb.UINT16,
}
_NAME_OF_WIRE = {v: k for k, v in DTYPE_NAMES.items()}

_TORCH_MAPS: "tuple[dict[int, torch.dtype], dict[torch.dtype, int]] | None" = None


def torch_dtype_maps() -> "tuple[dict[int, torch.dtype], dict[torch.dtype, int]]":
    """``(torch dtype of each wire dtype, wire dtype of each torch dtype)``.

    Built on the first call (which imports torch) and the same two dicts
    afterwards, so hot paths can hold them and look up in one dict access.
    """
    global _TORCH_MAPS
    if _TORCH_MAPS is None:
        import torch

        torch_of_wire = {
            pb.FLOAT32: torch.float32,
            pb.FLOAT16: torch.float16,
            pb.BFLOAT16: torch.bfloat16,
            pb.INT64: torch.int64,
            pb.INT32: torch.int32,
            pb.UINT8: torch.uint8,
            pb.BOOL: torch.bool,
            pb.UINT16: torch.uint16,
        }
        _TORCH_MAPS = torch_of_wire, {v: k for k, v in torch_of_wire.items()}
    return _TORCH_MAPS


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of ``n`` >= 0 (for code that writes wire bytes by hand)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class CodecError(ValueError):
    """A tensor message or value that cannot be encoded or decoded."""


def dtype_name(wire_dtype: int) -> str:
    """``pb.FLOAT32`` -> ``"float32"``; unknown values give ``"<unknown N>"``."""
    return _NAME_OF_WIRE.get(wire_dtype, f"<unknown {wire_dtype}>")


def dtype_from_name(name: str) -> int:
    """``"float16"`` -> ``pb.FLOAT16``; raises :class:`CodecError` for unknown names."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise CodecError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}") from None


def itemsize(wire_dtype: int) -> int:
    """Bytes per element of a wire dtype."""
    try:
        return _NP_OF_WIRE[wire_dtype].itemsize
    except KeyError:
        raise CodecError(f"unsupported dtype {dtype_name(wire_dtype)}") from None


def _torch_wire_dtype(t: "torch.Tensor") -> int:
    try:
        return torch_dtype_maps()[1][t.dtype]
    except KeyError:
        raise CodecError(
            f"cannot send a tensor of dtype {t.dtype}; supported: {', '.join(DTYPE_NAMES)}"
        ) from None


def encode(value: Any, out: pb.Tensor | None = None, *, name: str | None = None) -> pb.Tensor:
    """Write ``value`` (ndarray or torch tensor) into ``out`` (or a new message).

    The data is copied exactly once, from the (contiguous, little-endian)
    array into the message's bytes field.
    """
    msg = pb.Tensor() if out is None else out
    if name is not None:
        msg.name = name
    if isinstance(value, np.ndarray):
        arr = value
        try:
            wire = WIRE_OF_NP[arr.dtype.name]
        except KeyError:
            raise CodecError(
                f"cannot send an array of dtype {arr.dtype}; supported: {', '.join(WIRE_OF_NP)} "
                "(bfloat16 via torch tensors)"
            ) from None
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not _LITTLE):
            arr = arr.astype(arr.dtype.newbyteorder("<"))
    else:
        import torch

        if not isinstance(value, torch.Tensor):
            raise CodecError(f"expected a numpy array or torch tensor, got {type(value).__name__}")
        t = value.detach()
        if t.layout != torch.strided:  # sparse COO/CSR/..., mkldnn: .numpy() would raise TypeError
            raise CodecError(f"cannot send a tensor with layout {t.layout}; only dense (strided) tensors "
                             "travel on the wire: call .to_dense() first")
        if t.device.type != "cpu":
            t = t.cpu()
        wire = _torch_wire_dtype(t)
        if wire == pb.BFLOAT16:
            t = t.view(torch.int16)
        try:
            arr = t.resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError) as exc:  # e.g. a tensor subclass numpy cannot view
            raise CodecError(f"cannot send this tensor ({type(exc).__name__}: {exc})") from None
        if not _LITTLE:
            arr = arr.astype(arr.dtype.newbyteorder("<"))
    msg.dtype = wire
    del msg.shape[:]
    msg.shape.extend(arr.shape)
    # tobytes() makes one C-order copy whatever the strides are
    msg.data = arr.tobytes()
    return msg


def _checked_view(msg: pb.Tensor, what: str, max_elements: int | None) -> np.ndarray:
    np_dtype = _NP_OF_WIRE.get(msg.dtype)
    shape = tuple(msg.shape)
    data = msg.data  # read once: each read of a bytes field makes a new object
    n = math.prod(shape)
    if (np_dtype is None or (shape and min(shape) < 0) or (max_elements is not None and n > max_elements)
            or len(data) != n * np_dtype.itemsize):
        # The error path: which check failed, with a label (not built for good messages).
        label = f"{what} {msg.name!r}" if msg.name else what
        if np_dtype is None:
            raise CodecError(f"{label}: unsupported dtype {dtype_name(msg.dtype)}")
        if any(d < 0 for d in shape):
            raise CodecError(f"{label}: negative dimension in shape {list(shape)}")
        if max_elements is not None and n > max_elements:
            raise CodecError(f"{label}: shape {list(shape)} has {n} elements, more than the limit of {max_elements}")
        raise CodecError(
            f"{label}: shape {list(shape)} of {dtype_name(msg.dtype)} needs {n * np_dtype.itemsize} bytes, "
            f"got {len(data)}"
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def to_numpy(msg: pb.Tensor, *, what: str = "tensor", max_elements: int | None = None) -> np.ndarray:
    """Read-only zero-copy ndarray view of ``msg`` (bfloat16 as raw ``uint16`` bits)."""
    return _checked_view(msg, what, max_elements)


def to_torch(msg: pb.Tensor, *, what: str = "tensor", max_elements: int | None = None) -> "torch.Tensor":
    """Zero-copy torch tensor view of ``msg``. Do not write to it.

    torch has no read-only tensors, so the result *looks* writable, but its
    memory is the message's immutable ``bytes``: an in-place op on it would
    write into a Python ``bytes`` object. Clone it before handing it to code
    that may write to its input (the teacher's batcher does, for CPU models).
    """
    import torch

    arr = _checked_view(msg, what, max_elements)
    if arr.size == 0:
        # torch.from_numpy rejects some empty read-only views; an empty tensor
        # has no data to share anyway.
        t = torch.empty(arr.shape, dtype=torch.int16 if msg.dtype == pb.BFLOAT16 else torch.from_numpy(
            np.empty(0, arr.dtype)).dtype)
    else:
        t = torch.from_numpy(arr)
    if msg.dtype == pb.BFLOAT16:
        t = t.view(torch.int16).view(torch.bfloat16) if t.dtype != torch.int16 else t.view(torch.bfloat16)
    return t
