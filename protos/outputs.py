"""What a teacher's outputs are called and how a request transforms them.

One implementation for both sides of the wire, so an in-process teacher
(``student_client``) answers exactly -- bit for bit -- what a served teacher
(``teacher_server``) does:

* :func:`name_outputs`: a model's return value as named tensors. One tensor
  is ``logits``, a tuple or list gives ``output0``, ``output1``..., a dict
  keeps its keys.
* :func:`apply_transform`: one ``OutputRequest``'s transform on a
  ``(B, ..., C)`` output (the semantics of ``edistill/v1/teacher.proto``):
  ``RAW`` returns the output unchanged (temperature ignored: ranking by
  ``x / T`` is ranking by ``x``), ``PROBS``/``LOG_PROBS`` apply
  ``(log_)softmax(x / T)`` over the last dimension computed in float32
  whatever the model's precision, ``top_k > 0`` keeps the k largest entries
  after the transform (values sorted descending plus int64 indices), and the
  values are then cast to the requested dtype.
* :func:`answer_temperature`: the temperature an answer is computed at and
  carries: the requested one rounded to float32 (the wire's ``float``), 1.0
  for ``RAW`` (nothing applied).
* :func:`token_answer`: per-token answers of sequence models (``(B, L, C)``
  outputs): top-k log-probs (or probs) with an optional tail, or ``sample``
  draws from ``softmax(x / T)`` (Random-Sampling KD, arXiv 2503.16870), at
  the positions a mask keeps, computed in chunks of positions so a
  vocabulary of 128k never needs a ``(B, L, C)`` float32 copy. Helpers:
  :func:`index_dtype` (compact indices), :func:`pack_positions` /
  :func:`unpack_positions` (the answer's position bitmask) and
  :func:`sample_generator` (the draws' seed, from the request).

torch is imported inside the functions (as in :mod:`protos.codec`): this
package may be imported without it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from protos.edistill.v1 import teacher_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_SAMPLE",
    "TRANSFORMS",
    "TRANSFORM_NAMES",
    "TokenAnswer",
    "TransformError",
    "answer_temperature",
    "apply_transform",
    "index_dtype",
    "name_outputs",
    "pack_positions",
    "sample_generator",
    "token_answer",
    "token_answer_of_request",
    "unpack_positions",
]

#: Largest ``sample`` (draws per position) a request may ask for.
MAX_SAMPLE = 1024
# Positions per chunk of the token-level transforms: chunk x C float32
# elements stay under this (16 MiB), whatever the vocabulary.
_CHUNK_ELEMENTS = 1 << 22

#: User-facing transform names -> wire enum values.
TRANSFORMS: dict[str, int] = {"raw": pb.RAW, "probs": pb.PROBS, "log_probs": pb.LOG_PROBS}
#: Wire enum values -> user-facing transform names.
TRANSFORM_NAMES: dict[int, str] = {v: k for k, v in TRANSFORMS.items()}


class TransformError(ValueError):
    """A request that this output cannot answer (``top_k`` larger than its last dimension...).

    The message is what the teacher answers with INVALID_ARGUMENT; each side
    raises it again as its own error type.
    """


def name_outputs(out: Any) -> dict[str, "torch.Tensor"]:
    """Name a model's return value: tensor -> ``logits``, tuple/list -> ``outputN``, dict -> its keys.

    Raises:
        TypeError: the model returned something else, or a non-tensor value.
    """
    import torch

    if isinstance(out, torch.Tensor):
        return {"logits": out}
    if isinstance(out, Mapping):
        named = {str(k): v for k, v in out.items()}
    elif isinstance(out, (tuple, list)):
        named = {f"output{i}": v for i, v in enumerate(out)}
    else:
        raise TypeError(f"model returned {type(out).__name__}; expected a tensor, tuple/list or dict of tensors")
    for k, v in named.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"model output {k!r} is a {type(v).__name__}, not a tensor")
    return named


def answer_temperature(transform: int, temperature: float) -> float:
    """The temperature applied to (and reported with) an answer: 1.0 for ``RAW``, where nothing is applied.

    Rounded to float32 as the wire's ``OutputRequest.temperature`` is, so an
    in-process answer is computed at the very temperature a served one is.
    """
    return 1.0 if transform == pb.RAW else float(np.float32(temperature))


def apply_transform(x: "torch.Tensor", name: str, transform: int, temperature: float, top_k: int,
                    dtype: "torch.dtype | None") -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Apply one output request to ``x`` (B, ..., C); see the module docstring for the semantics.

    Args:
        name: the output's name, for error messages.
        transform: ``pb.RAW``, ``pb.PROBS`` or ``pb.LOG_PROBS``.
        temperature: T > 0 (ignored for ``RAW``).
        top_k: 0 for a dense answer, else the number of entries kept per row.
        dtype: the returned values' dtype; ``None`` keeps ``x``'s (a non-float output).

    Returns:
        ``(values, indices)``: values (B, ..., C), or (B, ..., k) with int64
        indices (B, ..., k) for top-k; indices ``None`` for a dense answer.

    Raises:
        TransformError: ``top_k`` exceeds the last dimension, or ``x`` has no
            dimension besides the batch.
    """
    import torch

    if top_k:
        if x.dim() < 2:
            raise TransformError(f"output {name!r} has no dimension besides the batch; top_k needs one")
        if top_k > x.shape[-1]:
            raise TransformError(f"output {name!r}: top_k={top_k} exceeds its last dimension ({x.shape[-1]})")
    if transform != pb.RAW:
        # x / 1.0 is x bit for bit, so skipping it changes nothing but the time.
        z = x.float() / temperature if temperature != 1.0 else x.float()
        x = torch.softmax(z, dim=-1) if transform == pb.PROBS else torch.log_softmax(z, dim=-1)
    indices = None
    if top_k:
        x, indices = torch.topk(x, top_k, dim=-1, largest=True, sorted=True)  # (B, ..., k), descending
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x, indices


# --------------------------------------------------------------- per-token answers


@dataclass(frozen=True)
class TokenAnswer:
    """One output request's per-token answer, for the ``P`` positions it holds.

    Attributes:
        values: ``(P, k)`` top-k values (log-probs, probs or logits, descending),
            or ``None`` for a sampled answer.
        indices: ``(P, k)`` top-k or ``(P, sample)`` drawn token ids, int64 or
            the compact :func:`index_dtype`.
        tail: ``(P,)`` log of the mass outside the top-k, or ``None``.
        positions: ``(B, L)`` bool, True where a position is held, or ``None``
            when every position is (P = B·L).
    """

    values: "torch.Tensor | None"
    indices: "torch.Tensor"
    tail: "torch.Tensor | None"
    positions: "torch.Tensor | None"


def index_dtype(size: int) -> "torch.dtype":
    """The smallest index dtype for a last dimension of ``size``: uint8 (<= 256), uint16 (<= 65,536), int32."""
    import torch

    return torch.uint8 if size <= 1 << 8 else torch.uint16 if size <= 1 << 16 else torch.int32


def pack_positions(positions: "torch.Tensor") -> np.ndarray:
    """``(B, L)`` bool -> ``(B, ceil(L / 8))`` uint8, least significant bit first (the wire's ``position_mask``)."""
    return np.packbits(positions.cpu().numpy(), axis=-1, bitorder="little")


def unpack_positions(packed: np.ndarray, length: int) -> np.ndarray:
    """Inverse of :func:`pack_positions`: ``(B, ceil(L / 8))`` uint8 -> ``(B, L)`` bool."""
    return np.unpackbits(packed, axis=-1, count=length, bitorder="little").astype(bool)


def _tensor_bytes(t: "torch.Tensor") -> memoryview:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(np.ascontiguousarray(t.numpy())).cast("B")


def sample_generator(seed: int, inputs: Iterable["torch.Tensor"]) -> "torch.Generator":
    """The generator of one request's draws: seeded from ``seed`` and the bytes of its inputs.

    The inputs are hashed in the order given (callers sort them by name), without
    their names, so the same request draws the same tokens on any teacher, served
    or in-process, and different sequences draw independently.
    """
    import torch

    h = hashlib.blake2b(int(seed).to_bytes(8, "little"), digest_size=8)
    for t in inputs:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))


def token_answer(x: "torch.Tensor", name: str, transform: int, temperature: float, *, top_k: int = 0,
                 sample: int = 0, tail: bool = False, dtype: "torch.dtype | None" = None,
                 positions: "torch.Tensor | None" = None, compact: bool = False,
                 generator: "torch.Generator | None" = None) -> TokenAnswer:
    """Per-token top-k (with optional tail) or sampled answer of a ``(B, L, C)`` output.

    Top-k: the k largest entries of ``(log_)softmax(x / T)`` (``RAW``: of ``x``)
    per position, descending; ``tail`` adds ``log(Σ_{j∉top-k} softmax(x/T)_j)``,
    computed as a log-sum-exp of the left-out log-probs (exact even when the
    tail is tiny). Sampled: ``sample`` tokens per position drawn with
    replacement from ``softmax(x / T)`` with ``generator`` (one stream, chunk
    after chunk, so the draws depend only on the request). Both run over
    chunks of positions (each chunk's float32 work is at most 4M elements).

    Args:
        positions: ``(B, L)`` bool, the positions to answer; None for all.
        compact: indices in :func:`index_dtype` of C instead of int64.

    Raises:
        TransformError: ``x`` is not ``(B, L, C)``, ``top_k`` exceeds C, or
            ``positions`` does not match ``(B, L)``.
    """
    import torch

    if x.dim() != 3:
        raise TransformError(f"output {name!r} has shape {list(x.shape)}; per-token answers need (B, L, C)")
    B, L, C = x.shape
    if top_k > C:
        raise TransformError(f"output {name!r}: top_k={top_k} exceeds its last dimension ({C})")
    if positions is not None and tuple(positions.shape) != (B, L):
        raise TransformError(f"output {name!r}: mask of shape {list(positions.shape)} does not match the "
                             f"output's positions {[B, L]}")
    rows = x.reshape(B * L, C) if positions is None else x[positions.to(x.device)]  # (P, C)
    step = max(1, _CHUNK_ELEMENTS // max(C, 1))
    vals, idxs, tails = [], [], []
    for a in range(0, rows.shape[0], step):
        z = rows[a:a + step]
        if transform != pb.RAW or sample:
            z = z.float() / temperature if temperature != 1.0 else z.float()
            z = torch.log_softmax(z, dim=-1)  # (n, C)
        if sample:
            idxs.append(torch.multinomial(z.exp().cpu(), sample, replacement=True, generator=generator))
            continue
        v, i = torch.topk(z, top_k, dim=-1, largest=True, sorted=True)  # (n, k)
        if tail:
            tails.append(z.scatter(-1, i, float("-inf")).logsumexp(-1) if top_k < C
                         else torch.full((z.shape[0],), float("-inf"), device=z.device))
        vals.append(v.exp() if transform == pb.PROBS else v)
        idxs.append(i)
    empty = rows.new_empty((0, sample or top_k), dtype=torch.int64)
    indices = torch.cat(idxs) if idxs else empty
    if compact:
        indices = indices.to(index_dtype(C))
    values = None
    if not sample:
        values = torch.cat(vals) if vals else rows.new_empty((0, top_k), dtype=torch.float32)
        if dtype is not None and values.dtype != dtype:
            values = values.to(dtype)
    tail_t = None
    if tail:
        tail_t = torch.cat(tails) if tails else rows.new_empty((0,), dtype=torch.float32)
        tail_t = tail_t.to(dtype) if dtype is not None else tail_t
    return TokenAnswer(values, indices, tail_t, positions)


def token_answer_of_request(x: "torch.Tensor", name: str, transform: int, temperature: float,
                            inputs: Mapping[str, "torch.Tensor"], *, mask: str = "", seed: int = 0,
                            top_k: int = 0, sample: int = 0, tail: bool = False,
                            dtype: "torch.dtype | None" = None, compact: bool = False) -> TokenAnswer:
    """:func:`token_answer` of one request, given its inputs by name: the served and in-process answer.

    The positions are where the input named ``mask`` is nonzero (all of them
    when ``mask`` is empty); draws are seeded by :func:`sample_generator` from
    ``seed`` and the inputs in name order. ``TokenAnswer.positions`` is on the
    mask input's device.

    Raises:
        TransformError: as :func:`token_answer`; ``mask`` must name one of ``inputs``.
    """
    positions = inputs[mask] != 0 if mask else None  # (B, L) bool
    generator = sample_generator(seed, [inputs[n] for n in sorted(inputs)]) if sample else None
    return token_answer(x, name, transform, temperature, top_k=top_k, sample=sample, tail=tail, dtype=dtype,
                        positions=positions, compact=compact, generator=generator)
