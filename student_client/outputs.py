"""What the student asks a teacher for, and what it gets back.

:class:`OutputSpec` describes one requested output (name, transform,
temperature, top-k, returned dtype) and is validated at construction.
A dense answer decodes to a ``torch.Tensor``; a top-k answer decodes to a
:class:`TopK` (values + int64 indices + the dense shape), which
:meth:`TopK.dense` turns back into a dense tensor.

The transform semantics are those of ``protos/edistill/v1/teacher.proto``:
``raw`` returns the output unchanged (temperature ignored unless top-k ranks
it), ``probs``/``log_probs`` apply ``(log_)softmax(x / T)`` over the last
dimension, and ``top_k > 0`` keeps the k largest entries after the transform.
:func:`apply_spec` implements the same semantics locally, so an in-process
teacher gives exactly what a served one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence, Union

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb

from .errors import ConfigError, TeacherRequestError, TeacherResponseError

if TYPE_CHECKING:
    import torch

__all__ = [
    "OutputSpec",
    "TeacherValue",
    "TopK",
    "apply_spec",
    "decode_response",
    "normalize_outputs",
    "output_requests",
]

_TRANSFORMS = {"raw": pb.RAW, "probs": pb.PROBS, "log_probs": pb.LOG_PROBS}
_TRANSFORM_NAMES = {v: k for k, v in _TRANSFORMS.items()}
_VALUE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class OutputSpec:
    """One teacher output the student wants, and how.

    Attributes:
        name: model output name (``"logits"`` for a model returning one tensor,
            ``"output0"``... for a tuple, the keys of a dict).
        transform: ``"raw"``, ``"probs"`` or ``"log_probs"``.
        temperature: softening temperature T > 0 for probs/log_probs (and for
            ranking raw values under top-k); 1.0 means no softening.
        top_k: 0 for a dense answer; k > 0 for only the k largest entries of the
            last dimension (a :class:`TopK`).
        dtype: dtype of the returned values: float32, float16 or bfloat16
            (half the bytes on the wire for a small loss of precision).
    """

    name: str = "logits"
    transform: str = "raw"
    temperature: float = 1.0
    top_k: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"OutputSpec.name must be a non-empty string, got {self.name!r}")
        if self.transform not in _TRANSFORMS:
            raise ConfigError(
                f"OutputSpec.transform must be one of {', '.join(_TRANSFORMS)}, got {self.transform!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"OutputSpec.temperature must be a finite number > 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"OutputSpec.top_k must be an int >= 0, got {self.top_k!r}")
        if self.dtype not in _VALUE_DTYPES:
            raise ConfigError(f"OutputSpec.dtype must be one of {', '.join(_VALUE_DTYPES)}, got {self.dtype!r}")

    def to_proto(self) -> pb.OutputRequest:
        """The wire form of this spec."""
        return pb.OutputRequest(
            name=self.name,
            transform=_TRANSFORMS[self.transform],
            temperature=float(self.temperature),
            top_k=self.top_k,
            dtype=codec.dtype_from_name(self.dtype),
        )


@dataclass(frozen=True)
class TopK:
    """A sparse top-k teacher output.

    Attributes:
        values: ``(..., k)`` the k largest entries of the last dimension, after
            the transform, in descending order.
        indices: ``(..., k)`` int64 positions of ``values`` in the last dimension.
        dense_shape: the full shape ``(..., C)`` of the dense output.
        transform: the transform the values are in (``raw``/``probs``/``log_probs``).
        temperature: the temperature that was applied.
    """

    values: "torch.Tensor"
    indices: "torch.Tensor"
    dense_shape: tuple[int, ...]
    transform: str = "raw"
    temperature: float = 1.0

    @property
    def k(self) -> int:
        """Number of entries kept per row."""
        return int(self.values.shape[-1])

    @property
    def dense_size(self) -> int:
        """Size ``C`` of the last dimension of the dense output."""
        return int(self.dense_shape[-1])

    def dense(self, fill: float | None = None) -> "torch.Tensor":
        """Scatter the values into a dense ``dense_shape`` tensor.

        Args:
            fill: value of the entries that were not kept. Default: ``-inf``
                for log-probabilities, ``0.0`` otherwise (so probs stay probs
                and ``log_probs`` stay valid log-probabilities of the kept mass).
        """
        import torch

        if fill is None:
            fill = -math.inf if self.transform == "log_probs" else 0.0
        out = torch.full(self.dense_shape, fill, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(-1, self.indices, self.values)

    def to(self, device, non_blocking: bool = False) -> "TopK":
        """A copy of this TopK with values and indices on ``device``."""
        return TopK(self.values.to(device, non_blocking=non_blocking),
                    self.indices.to(device, non_blocking=non_blocking),
                    self.dense_shape, self.transform, self.temperature)

    def pin_memory(self) -> "TopK":
        """A copy in page-locked host memory (for asynchronous copies to CUDA)."""
        return TopK(self.values.pin_memory(), self.indices.pin_memory(),
                    self.dense_shape, self.transform, self.temperature)


#: What a knowledge source returns per output name.
TeacherValue = Union["torch.Tensor", TopK]


def normalize_outputs(outputs: Iterable[str | OutputSpec] | str | OutputSpec) -> tuple[OutputSpec, ...]:
    """Turn ``"logits"``, ``["logits", OutputSpec(...)]`` into a tuple of specs.

    Raises:
        ConfigError: empty, wrong types, or a name requested twice.
    """
    if isinstance(outputs, (str, OutputSpec)):
        outputs = (outputs,)
    specs: list[OutputSpec] = []
    for o in outputs:
        if isinstance(o, str):
            specs.append(OutputSpec(name=o))
        elif isinstance(o, OutputSpec):
            specs.append(o)
        else:
            raise ConfigError(f"outputs must be names or OutputSpec objects, got {type(o).__name__}: {o!r}")
    if not specs:
        raise ConfigError("outputs must name at least one teacher output, e.g. outputs=('logits',)")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"outputs requests {', '.join(dup)} more than once; use one OutputSpec per name")
    return tuple(specs)


def output_requests(specs: Sequence[OutputSpec]) -> list[pb.OutputRequest]:
    """Wire form of ``specs`` (built once per source, copied into each request)."""
    return [s.to_proto() for s in specs]


def _check_rows(name: str, shape: Sequence[int], batch_size: int | None) -> None:
    if batch_size is not None and (len(shape) == 0 or shape[0] != batch_size):
        raise codec.CodecError(
            f"output {name!r} has {shape[0] if shape else 'no'} row(s) {list(shape)} for a batch of {batch_size}")


def _check_top_k(name: str, spec: OutputSpec, values: "torch.Tensor", indices: "torch.Tensor",
                 dense_shape: tuple[int, ...]) -> None:
    """A top-k answer is consistent: shapes agree, indices are int64 within ``[0, C)``.

    Checked here, so a bad answer is a TeacherResponseError naming the teacher
    instead of a RuntimeError in the loss or a CUDA device-side assert in scatter.
    """
    import torch

    if tuple(indices.shape) != tuple(values.shape):
        raise codec.CodecError(
            f"output {name!r}: indices shape {list(indices.shape)} != values shape {list(values.shape)}")
    if indices.dtype != torch.int64:
        raise codec.CodecError(f"output {name!r}: top-k indices must be int64, got {indices.dtype}")
    if (len(dense_shape) != values.dim() or values.dim() == 0 or any(d < 0 for d in dense_shape)
            or tuple(dense_shape[:-1]) != tuple(values.shape[:-1])):
        raise codec.CodecError(
            f"output {name!r}: dense_shape {list(dense_shape)} does not match values shape {list(values.shape)} "
            "(same leading dims, last dim C >= k)")
    k, c = int(values.shape[-1]), int(dense_shape[-1])
    if k != spec.top_k or k > c:
        raise codec.CodecError(f"output {name!r}: {k} entries per row for top_k={spec.top_k} of a last "
                               f"dimension of {c}")
    if indices.numel():
        low, high = torch.aminmax(indices)
        if int(low) < 0 or int(high) >= c:
            raise codec.CodecError(
                f"output {name!r}: top-k indices must be in [0, {c}), got values in [{int(low)}, {int(high)}]")


def decode_response(resp: pb.PredictResponse, specs: Sequence[OutputSpec], *,
                    endpoint: str | None = None, batch_id=None,
                    batch_size: int | None = None) -> dict[str, TeacherValue]:
    """Decode the requested outputs of ``resp`` (zero-copy views of its bytes).

    The returned tensors share memory with the response message; treat them as
    read-only (``clone()`` before writing in place).

    Args:
        batch_size: rows of the batch that was sent; when given, every output
            must have exactly that many rows (dim 0).

    Raises:
        TeacherResponseError: a requested output is missing or malformed (a
            top-k answer whose dense_shape, indices or k disagree with its
            values, indices outside ``[0, C)``, or the wrong number of rows).
    """
    by_name = {o.name: o for o in resp.outputs}
    result: dict[str, TeacherValue] = {}
    for spec in specs:
        o = by_name.get(spec.name)
        if o is None:
            raise TeacherResponseError(
                f"teacher {endpoint} answered batch {batch_id} without the requested output "
                f"{spec.name!r} (it sent: {', '.join(sorted(by_name)) or 'nothing'}); "
                "check the output names with the teacher's Describe",
                endpoint=endpoint, batch_id=batch_id)
        try:
            values = codec.to_torch(o.values, what=f"output {spec.name!r} values")
            if spec.top_k > 0:
                if not o.HasField("indices"):
                    raise codec.CodecError(f"output {spec.name!r}: top-k answer without indices")
                indices = codec.to_torch(o.indices, what=f"output {spec.name!r} indices")
                dense_shape = tuple(int(d) for d in o.dense_shape)
                _check_top_k(spec.name, spec, values, indices, dense_shape)
                _check_rows(spec.name, dense_shape, batch_size)
                result[spec.name] = TopK(values, indices, dense_shape,
                                         _TRANSFORM_NAMES.get(o.transform, spec.transform),
                                         float(o.temperature or spec.temperature))
            else:
                _check_rows(spec.name, tuple(values.shape), batch_size)
                result[spec.name] = values
        except codec.CodecError as exc:
            raise TeacherResponseError(f"teacher {endpoint} sent a malformed answer for batch {batch_id}: {exc}",
                                       code=None, details=str(exc), endpoint=endpoint, batch_id=batch_id) from exc
    return result


def apply_spec(output: "torch.Tensor", spec: OutputSpec) -> TeacherValue:
    """Apply ``spec``'s transform, top-k and dtype to a model output, as a teacher server does.

    Args:
        output: ``(B, ..., C)`` floating-point model output.

    Raises:
        TeacherRequestError: (code ``INVALID_ARGUMENT``) ``top_k`` exceeds ``C``
            or the output has no dimension besides the batch; a served teacher
            answers such a request with INVALID_ARGUMENT and the same message.
    """
    import torch

    x = output.detach()
    if spec.top_k > 0:
        if x.dim() < 2:
            _invalid(f"output {spec.name!r} has no dimension besides the batch; top_k needs one")
        if spec.top_k > x.shape[-1]:
            _invalid(f"output {spec.name!r}: top_k={spec.top_k} exceeds its last dimension ({x.shape[-1]})")
    if spec.transform != "raw":
        x = x.float() / spec.temperature
        x = torch.softmax(x, dim=-1) if spec.transform == "probs" else torch.log_softmax(x, dim=-1)
    dtype = getattr(torch, spec.dtype)
    if spec.top_k > 0:
        values, indices = torch.topk(x, spec.top_k, dim=-1)  # (B, ..., k), sorted descending
        return TopK(values.to(dtype), indices.to(torch.int64), tuple(x.shape), spec.transform,
                    float(spec.temperature))
    return x.to(dtype)


def _invalid(details: str) -> None:
    raise TeacherRequestError(f"in-process teacher rejected the request with INVALID_ARGUMENT: {details}",
                              code="INVALID_ARGUMENT", details=details, endpoint="in-process")
