"""What the student asks a teacher for, and what it gets back.

:class:`OutputSpec` describes one requested output (name, transform,
temperature, top-k, returned dtype) and is validated at construction.
Every answer says what it is, so a loss never has to be told twice:

* a dense answer is a :class:`Dense`, a ``torch.Tensor`` subclass carrying
  ``.transform`` and ``.temperature`` (everything a tensor does works on it;
  the result of an operation is a plain tensor, see :class:`Dense`);
* a top-k answer is a :class:`TopK` (values + int64 indices + the dense
  shape, and the same two attributes), which :meth:`TopK.dense` turns back
  into a dense tensor;
* per-token answers of sequence models (``(B, L, V)`` logits) are a
  :class:`TopK` with an optional ``tail`` (log of the mass outside the top-k)
  and a position ``mask`` (B, L), or a :class:`Sampled` (tokens drawn from the
  teacher's distribution, Random-Sampling KD) when ``OutputSpec.sample`` is
  set. Positions where ``OutputSpec.mask`` names an input that is 0 travel
  not at all; decoding puts the sent rows back at their (B, L) positions.

The transform semantics are those of ``protos/edistill/v1/teacher.proto``:
``raw`` returns the output unchanged (temperature ignored: an answer's
temperature is then 1.0), ``probs``/``log_probs`` apply
``(log_)softmax(x / T)`` over the last dimension, and ``top_k > 0`` keeps the
k largest entries after the transform. :func:`apply_spec` calls the teacher
server's own implementation (:func:`protos.outputs.apply_transform`), so an
in-process teacher answers bit for bit what a served one does.

A loss (anything with a ``needs`` tuple of :class:`OutputSpec`, such as
:class:`~student_client.losses.KDLoss`) may stand wherever outputs are asked
for: :func:`normalize_outputs` requests what it needs.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

import numpy as np

from protos import codec
from protos import outputs as shared
from protos.edistill.v1 import teacher_pb2 as pb

from . import _token_outputs as _tokens
from ._token_outputs import Sampled
from .errors import ConfigError, TeacherRequestError, TeacherResponseError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Dense",
    "OutputSpec",
    "Sampled",
    "TeacherValue",
    "TopK",
    "apply_spec",
    "decode_response",
    "dense_answer",
    "normalize_outputs",
    "output_requests",
]

_TRANSFORMS = shared.TRANSFORMS
_TRANSFORM_NAMES = shared.TRANSFORM_NAMES
_VALUE_DTYPES = ("float32", "float16", "bfloat16")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class OutputSpec:
    """One teacher output the student wants, and how.

    Attributes:
        name: model output name (``"logits"`` for a model returning one tensor,
            ``"output0"``... for a tuple, the keys of a dict).
        transform: ``"raw"``, ``"probs"`` or ``"log_probs"``.
        temperature: softening temperature T > 0 for probs/log_probs; 1.0 means
            no softening. Sent as a float32; ignored for ``raw`` (a raw answer
            reports 1.0, and a loss softens raw logits at its own T).
        top_k: 0 for a dense answer; k > 0 for only the k largest entries of the
            last dimension (a :class:`TopK`).
        dtype: dtype of the returned values: float32, float16 or bfloat16
            (half the bytes on the wire for a small loss of precision).
        sample: per-token answers: k > 0 draws per position from
            ``softmax(x / T)`` instead of top-k (Random-Sampling KD, arXiv
            2503.16870; each draw weighs 1/k), a :class:`Sampled`.
        seed: seed of the draws (mixed with the batch's input bytes on the
            teacher, so a batch draws the same tokens on any teacher).
        tail: with ``top_k`` and probs/log_probs: also the log of the mass the
            top-k leaves out, per position (``TopK.tail``).
        mask: name of the input (B, L) whose 0 entries are positions not sent
            (e.g. ``"attention_mask"``); with ``top_k`` or ``sample``.
    """

    name: str = "logits"
    transform: str = "raw"
    temperature: float = 1.0
    top_k: int = 0
    dtype: str = "float32"
    sample: int = 0
    seed: int = 0
    tail: bool = False
    mask: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"OutputSpec.name must be a non-empty string, got {self.name!r}")
        if self.transform not in _TRANSFORMS:
            raise ConfigError(
                f"OutputSpec.transform must be one of {', '.join(_TRANSFORMS)}, got {self.transform!r}")
        t = self.temperature
        # The wire carries a float32: T must stay finite and > 0 there too (a 0 would mean 1.0).
        if (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0
                or t > _FLOAT32_MAX or np.float32(t) == 0):
            raise ConfigError(f"OutputSpec.temperature must be a finite number > 0 (as a float32), got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"OutputSpec.top_k must be an int >= 0, got {self.top_k!r}")
        if self.dtype not in _VALUE_DTYPES:
            raise ConfigError(f"OutputSpec.dtype must be one of {', '.join(_VALUE_DTYPES)}, got {self.dtype!r}")
        _tokens.check_spec(self)

    @property
    def token_level(self) -> bool:
        """A per-token answer of a sequence model (sample, tail or mask set)."""
        return bool(self.sample or self.tail or self.mask)

    def to_proto(self) -> pb.OutputRequest:
        """The wire form of this spec (per-token indices asked for in their compact dtype)."""
        return pb.OutputRequest(
            name=self.name,
            transform=_TRANSFORMS[self.transform],
            temperature=float(self.temperature),
            top_k=self.top_k,
            dtype=codec.dtype_from_name(self.dtype),
            sample=self.sample,
            seed=self.seed,
            tail=self.tail,
            mask=self.mask,
            # per-token answers only: a classification top-k keeps int64 (no widening copy per batch)
            compact_indices=self.token_level,
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
    #: per-token answers: ``(B, L)`` log of the teacher mass outside the top-k (OutputSpec.tail), else None.
    tail: "torch.Tensor | None" = None
    #: ``(B, L)`` bool, True where the teacher answered (OutputSpec.mask); values, indices and tail
    #: hold zeros elsewhere. None: every position.
    mask: "torch.Tensor | None" = None

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
        move = (lambda t: None if t is None else t.to(device, non_blocking=non_blocking))
        return TopK(move(self.values), move(self.indices), self.dense_shape, self.transform, self.temperature,
                    move(self.tail), move(self.mask))

    def pin_memory(self) -> "TopK":
        """A copy in page-locked host memory (for asynchronous copies to CUDA)."""
        pin = (lambda t: None if t is None else t.pin_memory())
        return TopK(pin(self.values), pin(self.indices), self.dense_shape, self.transform, self.temperature,
                    pin(self.tail), pin(self.mask))


# --- Dense answers ------------------------------------------------------------
# The class derives from torch.Tensor, so it is defined on first use: this
# module is imported without torch (``import student_client`` stays cheap).
_DENSE: Any = None
_DENSE_LOCK = threading.Lock()  # two threads decoding the first answers must build one class


def _define_dense() -> type:
    import torch
    from torch._C import DisableTorchFunctionSubclass

    # Copies and moves of the same values: the answer (and so its metadata) is
    # unchanged. Dtype casts are here too, so ``answer.float()`` is not silently
    # taken for raw logits by a loss.
    T = torch.Tensor
    keep = frozenset({T.to, T.pin_memory, T.cpu, T.cuda, T.float, T.double, T.half, T.bfloat16,
                      T.detach, T.clone, T.contiguous})

    class Dense(torch.Tensor):
        """A dense teacher answer: a ``torch.Tensor`` that knows its transform and temperature.

        Everything a tensor does works on it (``.shape``, ``.argmax()``,
        arithmetic, ``F.*``); ``isinstance(answer, torch.Tensor)`` is true. The
        metadata describes *this exact answer*: the result of any operation is
        a plain ``torch.Tensor`` (``answer / 2`` or ``answer[0]`` is no longer
        the answer), except copies and moves of the same values, which keep
        it: ``.to()``, ``.cpu()``, ``.cuda()``, ``.pin_memory()``, ``.float()``,
        ``.double()``, ``.half()``, ``.bfloat16()``, ``.detach()``,
        ``.clone()``, ``.contiguous()``. (In-place operations return the same
        object with its metadata; answers are read-only views, don't.)
        Picklable and deep-copyable; build one with :func:`dense_answer`.

        Attributes:
            transform: ``"raw"``, ``"probs"`` or ``"log_probs"``.
            temperature: the temperature applied (1.0 for ``raw``).
        """

        transform: str = "raw"  # class defaults, for a Dense made by hand with as_subclass
        temperature: float = 1.0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            # Run the op as on a plain tensor: the result is a torch.Tensor,
            # not re-wrapped (torch's default would make it a Dense).
            with DisableTorchFunctionSubclass():
                out = func(*args, **(kwargs or {}))
            if func in keep and out is not args[0] and isinstance(args[0], cls):
                out = dense_answer(out, args[0].transform, args[0].temperature)
            return out

        def __deepcopy__(self, memo):
            with DisableTorchFunctionSubclass():
                plain = torch.Tensor.as_subclass(self, torch.Tensor)
            copied = dense_answer(copy.deepcopy(plain, memo), self.transform, self.temperature)
            memo[id(self)] = copied
            return copied

        def __repr__(self, *, tensor_contents=None) -> str:
            with DisableTorchFunctionSubclass():
                text = torch.Tensor.__repr__(self, tensor_contents=tensor_contents)  # "Dense(...)"
            return f"{text[:-1]}, transform={self.transform!r}, temperature={self.temperature})"

    # pickle finds it as student_client.outputs.Dense (through the module's __getattr__)
    Dense.__module__, Dense.__qualname__ = __name__, "Dense"
    return Dense


def _dense_class() -> type:
    global _DENSE
    with _DENSE_LOCK:
        if _DENSE is None:
            _DENSE = _define_dense()
    return _DENSE


def dense_answer(values: "torch.Tensor", transform: str = "raw", temperature: float = 1.0) -> "Dense":
    """``values`` (any shape, shared, not copied) as a :class:`Dense` answer with this metadata.

    On the per-batch path: ``as_subclass`` and two attribute sets.
    """
    d = values.as_subclass(_DENSE or _dense_class())
    d.transform = transform
    d.temperature = temperature
    return d


def __getattr__(name: str) -> Any:
    if name == "Dense":
        return _dense_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    import torch

    class Dense(torch.Tensor):
        transform: str
        temperature: float


#: What a knowledge source returns per output name.
TeacherValue = Union["Dense", TopK, Sampled]


def normalize_outputs(outputs: Iterable[str | OutputSpec] | str | OutputSpec | Any) -> tuple[OutputSpec, ...]:
    """Turn ``"logits"``, ``["logits", OutputSpec(...)]`` or a loss into a tuple of specs.

    A loss is anything with a ``needs`` attribute (a sequence of
    :class:`OutputSpec`, as :class:`~student_client.losses.Loss` has): the
    outputs are then exactly what it needs, so each one is stated once.

    Raises:
        ConfigError: empty, wrong types, or a name requested twice.
    """
    if isinstance(outputs, (str, OutputSpec)):
        outputs = (outputs,)
    elif hasattr(outputs, "needs"):
        needs = outputs.needs
        if isinstance(needs, (str, OutputSpec)) or not needs:
            raise ConfigError(f"outputs={type(outputs).__name__}(...) needs no teacher output ({needs!r}); "
                              "pass a loss with a teacher term, e.g. KDLoss(...) + CELoss(), or OutputSpecs")
        outputs = needs
    specs: list[OutputSpec] = []
    for o in outputs:
        if isinstance(o, str):
            specs.append(OutputSpec(name=o))
        elif isinstance(o, OutputSpec):
            specs.append(o)
        elif hasattr(o, "needs"):
            raise ConfigError(f"outputs=[...] holds a loss ({type(o).__name__}); pass one loss, summing several "
                              "(outputs=kd + ce), or OutputSpecs")
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


def _applied(o: pb.Output, spec: OutputSpec) -> tuple[str, float]:
    """The transform and temperature the teacher says it applied (its echo; the request's where it sent none)."""
    transform = _TRANSFORM_NAMES.get(o.transform, spec.transform)
    return transform, shared.answer_temperature(_TRANSFORMS[transform], o.temperature or spec.temperature)


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
            if spec.token_level:
                result[spec.name] = _tokens.decode(o, spec, batch_size, _applied(o, spec))
                continue
            values = codec.to_torch(o.values, what=f"output {spec.name!r} values")
            if spec.top_k > 0:
                if not o.HasField("indices"):
                    raise codec.CodecError(f"output {spec.name!r}: top-k answer without indices")
                indices = codec.to_torch(o.indices, what=f"output {spec.name!r} indices")
                dense_shape = tuple(int(d) for d in o.dense_shape)
                _check_top_k(spec.name, spec, values, indices, dense_shape)
                _check_rows(spec.name, dense_shape, batch_size)
                result[spec.name] = TopK(values, indices, dense_shape, *_applied(o, spec))
            else:
                _check_rows(spec.name, tuple(values.shape), batch_size)
                result[spec.name] = dense_answer(values, *_applied(o, spec))
        except codec.CodecError as exc:
            raise TeacherResponseError(f"teacher {endpoint} sent a malformed answer for batch {batch_id}: {exc}",
                                       code=None, details=str(exc), endpoint=endpoint, batch_id=batch_id) from exc
    return result


def apply_spec(output: "torch.Tensor", spec: OutputSpec, inputs: "Mapping[str, torch.Tensor] | None" = None
               ) -> TeacherValue:
    """Apply ``spec``'s transform, top-k and dtype to a model output, as a teacher server does.

    The same code as the server's (:func:`protos.outputs.apply_transform`,
    with the temperature rounded to float32 as on the wire), so the answer is
    identical bit for bit, metadata included.

    Args:
        output: ``(B, ..., C)`` floating-point model output.
        inputs: the batch's named inputs; needed by per-token specs (``mask``
            names one, and sampled draws are seeded from their bytes).

    Returns:
        a :class:`Dense`, for ``top_k > 0`` a :class:`TopK`, for ``sample > 0`` a :class:`Sampled`.

    Raises:
        TeacherRequestError: (code ``INVALID_ARGUMENT``) ``top_k`` exceeds ``C``
            or the output has no dimension besides the batch; a served teacher
            answers such a request with INVALID_ARGUMENT and the same message.
    """
    import torch

    wire = _TRANSFORMS[spec.transform]
    temperature = shared.answer_temperature(wire, spec.temperature)
    if spec.token_level:
        return _tokens.apply(output.detach(), spec, wire, temperature, inputs or {})
    try:
        values, indices = shared.apply_transform(output.detach(), spec.name, wire, temperature, spec.top_k,
                                                 getattr(torch, spec.dtype))
    except shared.TransformError as exc:
        _invalid(str(exc))
    if indices is None:
        return dense_answer(values, spec.transform, temperature)
    return TopK(values, indices, tuple(output.shape), spec.transform, temperature)


def _invalid(details: str) -> None:
    raise TeacherRequestError(f"in-process teacher rejected the request with INVALID_ARGUMENT: {details}",
                              code="INVALID_ARGUMENT", details=details, endpoint="in-process")
