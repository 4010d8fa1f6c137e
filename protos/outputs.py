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

torch is imported inside the functions (as in :mod:`protos.codec`): this
package may be imported without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from protos.edistill.v1 import teacher_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [
    "TRANSFORMS",
    "TRANSFORM_NAMES",
    "TransformError",
    "answer_temperature",
    "apply_transform",
    "name_outputs",
]

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
