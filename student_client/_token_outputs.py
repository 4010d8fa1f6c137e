"""Per-token answers of sequence models: the :class:`Sampled` answer type, decoding and the in-process side.

Split from :mod:`student_client.outputs` (which re-exports :class:`Sampled`
and calls these): a per-token answer holds the P positions a teacher sent
(``Output.position_mask``); decoding puts them back at their ``(B, L)``
positions (zeros elsewhere) as a :class:`~student_client.outputs.TopK` with
``tail``/``mask`` or a :class:`Sampled`; :func:`apply` computes the same
answer in-process with :func:`protos.outputs.token_answer_of_request`, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from protos import codec
from protos import outputs as shared
from protos.edistill.v1 import teacher_pb2 as pb

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .outputs import OutputSpec

__all__ = ["Sampled", "apply", "check_spec", "decode"]


def check_spec(spec: "OutputSpec") -> None:
    """sample / seed / tail / mask fit together (the teacher checks them against the model too)."""
    for field_name in ("sample", "seed"):
        v = getattr(spec, field_name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"OutputSpec.{field_name} must be an int >= 0, got {v!r}")
    if spec.sample > shared.MAX_SAMPLE:
        raise ConfigError(f"OutputSpec.sample must be <= {shared.MAX_SAMPLE} draws per position, got {spec.sample}")
    if spec.seed >= 1 << 64:
        raise ConfigError(f"OutputSpec.seed must fit 64 bits, got {spec.seed}")
    if spec.sample and spec.top_k:
        raise ConfigError(f"OutputSpec: sample={spec.sample} and top_k={spec.top_k} are alternatives; set one")
    if not isinstance(spec.tail, bool):
        raise ConfigError(f"OutputSpec.tail must be True or False, got {spec.tail!r}")
    if spec.tail and (not spec.top_k or spec.transform == "raw"):
        raise ConfigError("OutputSpec.tail needs top_k > 0 and transform 'probs' or 'log_probs'")
    if not isinstance(spec.mask, str):
        raise ConfigError(f"OutputSpec.mask must be an input name (e.g. 'attention_mask') or '', got {spec.mask!r}")
    if spec.mask and not (spec.top_k or spec.sample):
        raise ConfigError("OutputSpec.mask applies to top-k and sampled answers; a dense answer sends every position")


@dataclass(frozen=True)
class Sampled:
    """A sampled per-token teacher output (Random-Sampling KD, Anshumann et al. 2025, arXiv 2503.16870).

    At each position the teacher drew ``S`` tokens with replacement from its
    distribution ``softmax(logits / T)``. The empirical distribution
    ``q̂_j = count_j / S`` is an unbiased estimate of the teacher's (each draw
    weighs 1/S: the importance weight p/q is 1 when the proposal is the
    teacher itself), which :func:`~student_client.losses.sequence_kd_loss` uses.

    Attributes:
        indices: ``(B, L, S)`` int64 drawn token ids (repeats allowed).
        dense_shape: ``(B, L, V)``.
        temperature: the temperature the draws were made at.
        mask: ``(B, L)`` bool where the teacher answered, or None for every position.
    """

    indices: "torch.Tensor"
    dense_shape: tuple[int, ...]
    temperature: float = 1.0
    mask: "torch.Tensor | None" = None

    @property
    def num_samples(self) -> int:
        """Draws per position S."""
        return int(self.indices.shape[-1])

    def dense(self) -> "torch.Tensor":
        """``(B, L, V)`` float32 empirical distribution ``count / S`` (zeros where not answered)."""
        import torch

        out = torch.zeros(self.dense_shape, dtype=torch.float32, device=self.indices.device)
        ones = torch.full(self.indices.shape, 1.0 / self.num_samples, device=self.indices.device)
        out.scatter_add_(-1, self.indices, ones)
        if self.mask is not None:
            out[~self.mask] = 0.0
        return out

    def to(self, device, non_blocking: bool = False) -> "Sampled":
        """A copy with indices and mask on ``device``."""
        return Sampled(self.indices.to(device, non_blocking=non_blocking), self.dense_shape, self.temperature,
                       None if self.mask is None else self.mask.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Sampled":
        """A copy in page-locked host memory."""
        return Sampled(self.indices.pin_memory(), self.dense_shape, self.temperature,
                       None if self.mask is None else self.mask.pin_memory())


def _widened(indices: "torch.Tensor", size: int) -> "torch.Tensor":
    """Compact wire indices (the :func:`protos.outputs.index_dtype` of a last dim of ``size``) as int64.

    Any other dtype is left as is, for the consistency checks to name.
    """
    return indices.to(_int64()) if indices.dtype == shared.index_dtype(size) else indices


def _int64():
    import torch

    return torch.int64


def decode(o: pb.Output, spec: "OutputSpec", batch_size: int | None, applied: tuple[str, float]) -> Any:
    """A per-token answer: the P sent rows (position_mask) put back at their (B, L) positions."""
    import torch

    from .outputs import _check_rows

    name = spec.name
    dense_shape = tuple(int(d) for d in o.dense_shape)
    if len(dense_shape) != 3 or min(dense_shape) < 0:
        raise codec.CodecError(f"output {name!r}: a per-token answer needs dense_shape (B, L, V), got "
                               f"{list(dense_shape)}")
    _check_rows(name, dense_shape, batch_size)
    B, L, V = dense_shape
    if spec.sample and o.sample != spec.sample:
        raise codec.CodecError(f"output {name!r}: asked for {spec.sample} draws per position, the answer holds "
                               f"{o.sample or 'none'} (a teacher without sampled answers? update it)")
    width = spec.sample or spec.top_k
    mask = None
    rows = B * L
    if o.HasField("position_mask"):
        packed = codec.to_numpy(o.position_mask, what=f"output {name!r} position_mask")
        if packed.dtype != np.uint8 or packed.shape != (B, (L + 7) // 8):
            raise codec.CodecError(f"output {name!r}: position_mask {list(packed.shape)} {packed.dtype} does not "
                                   f"fit (B, L) = {[B, L]}; expected uint8 {[B, (L + 7) // 8]}")
        mask = torch.from_numpy(shared.unpack_positions(packed, L))  # (B, L) bool
        rows = int(mask.sum())
    elif spec.mask:
        raise codec.CodecError(f"output {name!r}: mask {spec.mask!r} was asked for, the answer has no position_mask")
    indices = _widened(codec.to_torch(o.indices, what=f"output {name!r} indices"), V)
    if tuple(indices.shape) != (rows, width) or indices.dtype != torch.int64:
        raise codec.CodecError(f"output {name!r}: indices {list(indices.shape)} {indices.dtype} for {rows} "
                               f"position(s) x {width}")
    if indices.numel():
        low, high = torch.aminmax(indices)
        if int(low) < 0 or int(high) >= V:
            raise codec.CodecError(f"output {name!r}: token indices must be in [0, {V}), got [{int(low)}, {int(high)}]")
    temperature = applied[1]
    if spec.sample:
        return Sampled(_placed(indices, mask, B, L), dense_shape, temperature, mask)
    values = codec.to_torch(o.values, what=f"output {name!r} values")
    if tuple(values.shape) != (rows, width):
        raise codec.CodecError(f"output {name!r}: values {list(values.shape)} for {rows} position(s) x {width}")
    tail = None
    if spec.tail:
        if not o.HasField("tail"):
            raise codec.CodecError(f"output {name!r}: tail was asked for, the answer has none")
        tail = codec.to_torch(o.tail, what=f"output {name!r} tail")
        if tuple(tail.shape) != (rows,):
            raise codec.CodecError(f"output {name!r}: tail {list(tail.shape)} for {rows} position(s)")
    return _token_topk(values, indices, tail, mask, dense_shape, applied)


def _placed(t: "torch.Tensor | None", mask: "torch.Tensor | None", B: int, L: int) -> "torch.Tensor | None":
    """(P, ...) rows -> (B, L, ...): a view when every position was sent, else zeros where none was."""
    if t is None:
        return None
    if mask is None:
        return t.reshape(B, L, *t.shape[1:])
    out = t.new_zeros((B, L, *t.shape[1:]))
    out[mask] = t
    return out


def _token_topk(values, indices, tail, mask, dense_shape, applied: tuple[str, float]) -> Any:
    from .outputs import TopK

    B, L = dense_shape[0], dense_shape[1]
    return TopK(_placed(values, mask, B, L), _placed(indices, mask, B, L), dense_shape, *applied,
                _placed(tail, mask, B, L), mask)


def apply(output: "torch.Tensor", spec: "OutputSpec", wire: int, temperature: float,
          inputs: "Mapping[str, torch.Tensor]") -> Any:
    """The in-process side of a per-token answer (:func:`protos.outputs.token_answer_of_request`, as served)."""
    import torch

    from .outputs import _invalid

    if spec.mask and spec.mask not in inputs:
        _invalid(f"output {spec.name!r}: mask {spec.mask!r} is not an input of this batch "
                 f"(inputs: {', '.join(inputs) or 'none'})")
    try:
        a = shared.token_answer_of_request(output, spec.name, wire, temperature, inputs, mask=spec.mask,
                                           seed=spec.seed, top_k=spec.top_k, sample=spec.sample, tail=spec.tail,
                                           dtype=getattr(torch, spec.dtype))
    except shared.TransformError as exc:
        _invalid(str(exc))
    positions = a.positions.to(output.device) if a.positions is not None else None  # (B, L) bool
    B, L, _ = output.shape  # answers stay on the model's device, like dense in-process answers
    if spec.sample:
        return Sampled(_placed(a.indices, positions, B, L), tuple(output.shape), temperature, positions)
    return _token_topk(a.values, a.indices, a.tail, positions, tuple(output.shape), (spec.transform, temperature))
