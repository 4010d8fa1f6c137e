"""What a teacher takes and gives, from its ``Describe`` answer, and checking a pool's batches against it.

A :class:`~student_client.pool.TeacherPool` asks each new teacher for its
``Describe`` after the health check and before the teacher's first batch
(:mod:`student_client._pool_members`). :class:`TeacherSignature` is that
answer in the few fields the student needs:

* :meth:`TeacherSignature.output_problem`: the pool asks for outputs the
  teacher does not have, or a ``top_k`` larger than the output: a clear
  ConfigError before the first batch, instead of a refusal per batch.
* :func:`cast_float64`: numpy's default float64 is not a wire dtype; such
  inputs are cast to the teacher's declared float dtype (float32 until a
  teacher has said; the pool re-casts still-queued batches when one does).
  Only batches that are *not* plain wire-dtype tensors reach this (the
  pool's slow path), so batches with the right dtype pay nothing for it.
* :meth:`TeacherSignature.input_problem`: an input whose kind differs
  (integers for a float input, floats for an integer one) is never cast,
  because the cast would change what the numbers mean (ids, labels,
  fractions); the message names the expected dtype and shape and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb

from .errors import ConfigError

__all__ = ["TeacherSignature", "cast_float64"]

_FLOATS = frozenset({pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16})
_TORCH_METHOD = {pb.FLOAT32: ".float()", pb.FLOAT16: ".half()", pb.BFLOAT16: ".bfloat16()", pb.INT64: ".long()",
                 pb.INT32: ".int()", pb.UINT8: ".byte()", pb.BOOL: ".bool()"}


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: int  # wire dtype
    shape: tuple[int, ...]  # per sample, -1 = free

    def describe(self) -> str:
        return f"{codec.dtype_name(self.dtype)} with per-sample shape ({', '.join(map(str, self.shape))})"


@dataclass(frozen=True)
class TeacherSignature:
    """The inputs and outputs one teacher declared in ``Describe``."""

    endpoint: str
    model: str
    inputs: tuple[_Spec, ...]
    outputs: tuple[_Spec, ...]

    @classmethod
    def from_describe(cls, endpoint: str, resp: "pb.DescribeResponse") -> "TeacherSignature":
        def specs(items) -> tuple[_Spec, ...]:
            return tuple(_Spec(s.name, s.dtype, tuple(s.shape)) for s in items)

        return cls(endpoint, resp.model_name, specs(resp.inputs), specs(resp.outputs))

    def output_problem(self, wanted: Sequence[Any]) -> str | None:
        """Why the teacher cannot answer ``wanted`` (OutputSpecs), or None."""
        have = {s.name: s for s in self.outputs}
        listing = ", ".join(f"{s.name!r} ({s.describe()})" for s in self.outputs) or "none"
        for spec in wanted:
            out = have.get(spec.name)
            if out is None:
                return (f"teacher {self.endpoint} (model {self.model!r}) has no output {spec.name!r}; its outputs: "
                        f"{listing}. Ask for one of those (outputs=[...], OutputSpec(name=...) or the loss's "
                        "output name)")
            size = out.shape[-1] if out.shape else 1
            if spec.top_k and size > 0 and spec.top_k > size:
                return (f"top_k={spec.top_k} for output {spec.name!r}, but teacher {self.endpoint} (model "
                        f"{self.model!r}) gives {size} values per sample ({out.describe()}); use top_k <= {size} "
                        "(or 0 for the dense output)")
        return None

    def input_spec(self, name: str) -> _Spec | None:
        """The declared input ``name`` (``""``: the only input)."""
        if name == "" and len(self.inputs) == 1:
            return self.inputs[0]
        return next((s for s in self.inputs if s.name == name), None)

    def declared(self, name: str) -> int | None:
        """The wire dtype declared for input ``name``, or None."""
        spec = self.input_spec(name)
        return None if spec is None else spec.dtype

    def input_problem(self, inputs: Mapping[str, Any], batch_id: Any) -> str | None:
        """A message naming dtype, shape and fix when an input is of the wrong kind for this teacher, else None."""
        for name, value in inputs.items():
            spec = self.input_spec(name)
            got = _wire_dtype(value)
            if spec is None or not hasattr(value, "dtype") or got == spec.dtype:
                continue
            want_float, got_float = spec.dtype in _FLOATS, _is_floating(value)
            if got is None and got_float == want_float:
                continue  # float64 for a float input is cast (cast_float64); other odd dtypes: the codec says
            shown = f"input {name!r}" if name else "the input"
            have = f"{_dtype_text(value)} with shape ({', '.join(map(str, value.shape))})"
            method = _TORCH_METHOD.get(spec.dtype, "")
            if want_float and not got_float:
                fix = ("integers are not cast to floats automatically (ids or labels would change meaning): if "
                       f"they are features, convert them in your dataset or with teacher_input=lambda b: b[0]{method}")
            elif got_float and not want_float:
                fix = ("floats are not cast to integers (that drops fractions): send the integer tensor itself "
                       f"(e.g. token ids), or convert with teacher_input=lambda b: b[0]{method} if every value is whole")
            else:
                fix = f"convert it with teacher_input=lambda b: b[0]{method} (or in your dataset)"
            return (f"batch {batch_id}: teacher {self.endpoint} (model {self.model!r}) expects {shown} as "
                    f"{spec.describe()}; this batch has {have}. {fix[0].upper()}{fix[1:]}")
        return None


def cast_float64(inputs: Mapping[str, Any], signature: TeacherSignature | None,
                 batch_id: Any) -> tuple[dict[str, Any], list[str]]:
    """``inputs`` with float64 tensors/arrays cast to the teacher's float dtype, and the names cast.

    Without a signature the target is float32 (the usual declared dtype).

    Raises:
        ConfigError: the teacher declares an integer or bool input there
            (the message names its dtype and shape and the fix).
    """
    out, cast = dict(inputs), []
    for name, value in inputs.items():
        if not _is_float64(value):
            continue
        spec = signature.input_spec(name) if signature is not None else None
        target = pb.FLOAT32 if spec is None else spec.dtype
        if target not in _FLOATS:
            assert signature is not None
            raise ConfigError(signature.input_problem({name: value}, batch_id) or
                              f"batch {batch_id}: input {name!r} is float64 but the teacher expects {spec.describe()}")
        out[name] = _cast(value, target)
        cast.append(name)
    return out, cast


def _is_float64(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype == np.float64
    return str(getattr(value, "dtype", "")) == "torch.float64"


def _cast(value: Any, wire: int) -> Any:
    """``value`` as the wire dtype ``wire`` (a float dtype), keeping its kind (tensor or array)."""
    import torch

    tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
    return tensor.to(codec.torch_dtype_maps()[0][wire])


def _is_floating(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f"
    return bool(value.is_floating_point())


def _wire_dtype(value: Any) -> int | None:
    if isinstance(value, np.ndarray):
        return codec.WIRE_OF_NP.get(value.dtype.name)
    return codec.torch_dtype_maps()[1].get(getattr(value, "dtype", None))


def _dtype_text(value: Any) -> str:
    return str(value.dtype).replace("torch.", "")
