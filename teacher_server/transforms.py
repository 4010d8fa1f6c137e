"""Per-request output transforms: temperature, probs / log-probs, top-k, dtype.

The forward pass is shared by every request in a batch; these run on each
request's slice of the outputs, so requests asking for different transforms
can share a batch. The semantics (docs/internals.md) and their one
implementation live in :mod:`protos.outputs`, which the student's in-process
teacher calls too: ``RAW`` returns the output unchanged (temperature
ignored); ``PROBS``/``LOG_PROBS`` apply ``(log_)softmax(x / T)`` over the last
dim; ``top_k > 0`` keeps the k largest entries after the transform, as values
plus int64 indices. This module validates the requests against the model's
outputs (:func:`plan_outputs`) and maps a transform error to INVALID_ARGUMENT.

Per-token requests of sequence models (``sample``, ``tail`` or ``mask`` set,
on a ``(B, L, C)`` output) go through :func:`apply_token_plan`, i.e.
:func:`protos.outputs.token_answer_of_request`: top-k with an optional tail, or draws
seeded from the request (``seed`` and its inputs' bytes, inputs in name
order), at the positions where the named mask input is nonzero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from protos import outputs as shared
from protos.edistill.v1 import teacher_pb2 as pb
from teacher_server.errors import InvalidRequest
from teacher_server.signature import TORCH_OF_WIRE, TensorSpec

__all__ = ["OutputPlan", "apply_plan", "apply_token_plan", "plan_outputs"]

_VALUE_DTYPES = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)


@dataclass(frozen=True)
class OutputPlan:
    """One validated output request."""

    name: str
    transform: int  # pb.RAW | pb.PROBS | pb.LOG_PROBS
    temperature: float  # 1.0 for RAW (nothing applied)
    top_k: int
    # torch dtype of the returned values; None keeps a non-float output's own dtype.
    dtype: torch.dtype | None
    sample: int = 0  # draws per position (Random-Sampling KD); exclusive with top_k
    seed: int = 0
    tail: bool = False  # with top_k: log of the mass outside it, per position
    mask: str = ""  # input whose zero entries are positions not sent
    compact: bool = False  # indices in the smallest dtype that fits C

    @property
    def token_level(self) -> bool:
        """A per-token answer (:func:`apply_token_plan`), not the plain transform."""
        return bool(self.sample or self.tail or self.mask)


def plan_outputs(requested: Sequence[pb.OutputRequest], outputs: Sequence[TensorSpec],
                 inputs: Sequence[TensorSpec] = ()) -> tuple[OutputPlan, ...]:
    """Validate the request's output list against the model's outputs (and inputs, for ``mask``).

    An empty list means every output, RAW, float32 (non-float outputs as is).

    Raises:
        InvalidRequest: unknown name, bad transform, temperature, top_k, dtype,
            or per-token fields (sample, tail, mask) that do not fit.
    """
    by_name = {s.name: s for s in outputs}
    if not requested:
        return tuple(OutputPlan(s.name, pb.RAW, 1.0, 0, torch.float32 if s.dtype.is_floating_point else None)
                     for s in outputs)
    plans = []
    for req in requested:
        spec = by_name.get(req.name)
        if spec is None:
            raise InvalidRequest(f"unknown output {req.name!r}; this model has {', '.join(by_name)}")
        if req.transform not in shared.TRANSFORM_NAMES:
            raise InvalidRequest(f"output {req.name!r}: unknown transform {req.transform}")
        temperature = req.temperature or 1.0
        if not (math.isfinite(temperature) and temperature > 0):
            raise InvalidRequest(f"output {req.name!r}: temperature must be a finite number > 0, got {req.temperature}")
        temperature = shared.answer_temperature(req.transform, temperature)
        if req.transform != pb.RAW and not spec.dtype.is_floating_point:
            raise InvalidRequest(f"output {req.name!r} is {spec.dtype_name}; probs/log-probs need a float output")
        if req.top_k:
            if not spec.shape:
                raise InvalidRequest(f"output {req.name!r} has no dimension besides the batch; top_k needs one")
            last = spec.shape[-1]
            if last != -1 and req.top_k > last:
                raise InvalidRequest(f"output {req.name!r}: top_k={req.top_k} exceeds its last dimension ({last})")
        if req.dtype == pb.DATA_TYPE_UNSPECIFIED:
            dtype = torch.float32 if spec.dtype.is_floating_point or req.transform != pb.RAW else None
        elif req.dtype in _VALUE_DTYPES:
            dtype = TORCH_OF_WIRE[req.dtype]
        else:
            raise InvalidRequest(f"output {req.name!r}: dtype must be float32, float16 or bfloat16, "
                                 f"got {pb.DataType.Name(req.dtype) if req.dtype in pb.DataType.values() else req.dtype}")
        _check_token_fields(req, spec, inputs)
        plans.append(OutputPlan(req.name, req.transform, temperature, int(req.top_k), dtype, int(req.sample),
                                int(req.seed), bool(req.tail), req.mask, bool(req.compact_indices)))
    return tuple(plans)


def _check_token_fields(req: pb.OutputRequest, spec: TensorSpec, inputs: Sequence[TensorSpec]) -> None:
    """``sample``/``tail``/``mask`` need a per-token (B, L, C) float output and fit together."""
    name = repr(req.name)
    if not (req.sample or req.tail or req.mask):
        return
    if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
        raise InvalidRequest(f"output {name} is {spec.dtype_name}{spec.describe_shape()}; sample, tail and mask "
                             "need a per-token float output of shape [B, L, C]")
    if req.sample and req.top_k:
        raise InvalidRequest(f"output {name}: sample={req.sample} and top_k={req.top_k} are alternatives; ask for one")
    if req.sample > shared.MAX_SAMPLE:
        raise InvalidRequest(f"output {name}: sample={req.sample} exceeds {shared.MAX_SAMPLE} draws per position")
    if req.tail and (not req.top_k or req.transform == pb.RAW):
        raise InvalidRequest(f"output {name}: tail needs top_k > 0 with transform probs or log_probs")
    if req.mask:
        names = [s.name for s in inputs]
        if req.mask not in names:
            raise InvalidRequest(f"output {name}: mask {req.mask!r} is not an input of this model "
                                 f"(inputs: {', '.join(names)})")
        if not (req.top_k or req.sample):
            raise InvalidRequest(f"output {name}: mask applies to top-k and sampled answers; a dense answer "
                                 "sends every position")


def apply_plan(x: torch.Tensor, plan: OutputPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ``plan`` to one request's output slice ``x`` (B, ..., C).

    Returns (values, indices): values (B, ..., C) or (B, ..., k); indices
    (B, ..., k) int64 for top-k, else None. Computed in float32 whatever the
    model's precision, then cast to the requested dtype
    (:func:`protos.outputs.apply_transform`).

    Raises:
        InvalidRequest: ``top_k`` exceeds a free last dimension.
    """
    try:
        values, indices = shared.apply_transform(x, plan.name, plan.transform, plan.temperature, plan.top_k,
                                                 plan.dtype)
    except shared.TransformError as exc:  # only reachable for free last dims: plan_outputs checked the rest
        raise InvalidRequest(str(exc)) from exc
    if plan.compact and indices is not None:
        indices = indices.to(shared.index_dtype(x.shape[-1]))
    return values, indices


def apply_token_plan(x: torch.Tensor, plan: OutputPlan, inputs: Sequence[torch.Tensor],
                     input_names: Sequence[str]) -> shared.TokenAnswer:
    """Apply a per-token ``plan`` to one request's ``(n, L, C)`` slice, given its own inputs (signature order).

    Raises:
        InvalidRequest: the output or mask does not fit (e.g. a mask of another shape).
    """
    try:
        return shared.token_answer_of_request(x, plan.name, plan.transform, plan.temperature,
                                              dict(zip(input_names, inputs)), mask=plan.mask, seed=plan.seed,
                                              top_k=plan.top_k, sample=plan.sample, tail=plan.tail,
                                              dtype=plan.dtype, compact=plan.compact)
    except shared.TransformError as exc:
        raise InvalidRequest(str(exc)) from exc
