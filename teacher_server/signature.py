"""Input/output signatures: per-sample shape and dtype of each named tensor.

A signature is what the server validates requests against and what
``Describe`` reports. It travels three ways:

* embedded in model files by :func:`teacher_server.model.save_torchscript` /
  :func:`~teacher_server.model.save_exported` as JSON (:func:`signature_to_json`),
* declared on factory modules as an ``edistill_inputs`` attribute
  (a list of :class:`TensorSpec` or ``(name, dtype, shape)`` tuples),
* given on the command line as ``--input-spec NAME:DTYPE:D1,D2,...``
  (:func:`parse_input_spec`).

Shapes exclude the batch dimension; ``-1`` marks a free dimension.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from teacher_server.errors import ConfigError, SignatureError

__all__ = [
    "TORCH_OF_WIRE",
    "TensorSpec",
    "WIRE_OF_TORCH",
    "coerce_specs",
    "free_where_changed",
    "parse_input_spec",
    "signature_from_json",
    "signature_to_json",
]

# The codec's maps (protos/codec.py is their one home), under the names the teacher imports.
TORCH_OF_WIRE: dict[int, torch.dtype]
WIRE_OF_TORCH: dict[torch.dtype, int]
TORCH_OF_WIRE, WIRE_OF_TORCH = codec.torch_dtype_maps()

# Bumped if the embedded JSON layout changes; readers reject unknown versions.
_SIGNATURE_FORMAT = 1


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: dtype and per-sample shape (``-1`` = free dim)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_OF_TORCH:
            raise ConfigError(
                f"tensor {self.name!r}: dtype {self.dtype} is not supported on the wire; "
                f"use one of {', '.join(codec.DTYPE_NAMES)}"
            )
        if any((not isinstance(d, int)) or d < -1 or d == 0 for d in self.shape):
            raise ConfigError(f"tensor {self.name!r}: dims must be positive or -1, got {list(self.shape)}")

    @property
    def dtype_name(self) -> str:
        """``"float32"`` etc., as on the command line."""
        return codec.dtype_name(WIRE_OF_TORCH[self.dtype])

    def mismatch(self, sample_shape: Sequence[int]) -> str | None:
        """Why ``sample_shape`` does not fit this spec, or None if it does."""
        if len(sample_shape) != len(self.shape) or any(
            want != -1 and want != got for want, got in zip(self.shape, sample_shape)
        ):
            return f"per-sample shape {list(sample_shape)} does not match {self.describe_shape()}"
        return None

    def describe_shape(self) -> str:
        """``[B, 3, 32, 32]`` style, with free dims shown as ``*``."""
        return "[B" + "".join(f", {'*' if d == -1 else d}" for d in self.shape) + "]"

    def to_proto(self, out: pb.TensorSpec) -> pb.TensorSpec:
        """Fill a ``TensorSpec`` message in place."""
        out.name = self.name
        out.dtype = WIRE_OF_TORCH[self.dtype]
        out.shape.extend(self.shape)
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-able form, as embedded in saved model files."""
        return {"name": self.name, "dtype": self.dtype_name, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TensorSpec":
        """Inverse of :meth:`to_json`: ``{"name", "dtype", "shape"}`` -> spec.

        Raises:
            KeyError: a field is missing.
            ConfigError: the dtype name is unknown.
            ValueError: a dimension is not an integer.
        """
        return cls(str(obj["name"]), _torch_dtype(str(obj["dtype"])), tuple(int(d) for d in obj["shape"]))

    def __str__(self) -> str:
        return f"{self.name}:{self.dtype_name}:{','.join(map(str, self.shape))}"


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_OF_WIRE[codec.dtype_from_name(name)]
    except codec.CodecError as exc:
        raise ConfigError(str(exc)) from None


def parse_input_spec(text: str) -> TensorSpec:
    """Parse ``NAME:DTYPE:D1,D2,...`` (``-1`` = free dim; empty dims = scalar per sample).

    >>> parse_input_spec("image:float32:3,32,32")
    TensorSpec(name='image', dtype=torch.float32, shape=(3, 32, 32))
    """
    parts = text.split(":")
    if len(parts) != 3 or not parts[0]:
        raise ConfigError(
            f"input spec {text!r} must look like NAME:DTYPE:D1,D2,... (e.g. image:float32:3,32,32)"
        )
    name, dtype, dims = parts
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    except ValueError:
        raise ConfigError(f"input spec {text!r}: dims must be integers separated by commas, got {dims!r}") from None
    return TensorSpec(name, _torch_dtype(dtype), shape)


def coerce_specs(items: Iterable[Any], *, where: str) -> tuple[TensorSpec, ...]:
    """Accept TensorSpecs, ``(name, dtype, shape)`` tuples or ``"name:dtype:dims"`` strings."""
    out = []
    for item in items:
        if isinstance(item, TensorSpec):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_input_spec(item))
        elif isinstance(item, (tuple, list)) and len(item) == 3:
            name, dtype, shape = item
            if isinstance(dtype, str):
                dtype = _torch_dtype(dtype)
            out.append(TensorSpec(str(name), dtype, tuple(int(d) for d in shape)))
        else:
            raise SignatureError(
                f"{where}: cannot read input spec {item!r}; use TensorSpec(name, dtype, shape) "
                "or a (name, dtype, shape) tuple"
            )
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise SignatureError(f"{where}: input names must be unique, got {names}")
    return tuple(out)


def free_where_changed(specs: Sequence[TensorSpec],
                       shapes: Mapping[str, Sequence[int]]) -> tuple[TensorSpec, ...]:
    """``specs`` with -1 for each dim whose size in ``shapes`` (per-sample shapes by name) differs.

    A spec whose name is missing from ``shapes``, or whose rank differs there, is kept as it is.
    """
    out = []
    for s in specs:
        other = tuple(shapes.get(s.name, s.shape))
        if len(other) == len(s.shape):
            s = TensorSpec(s.name, s.dtype, tuple(d if d == e else -1 for d, e in zip(s.shape, other)))
        out.append(s)
    return tuple(out)


def signature_to_json(inputs: Sequence[TensorSpec]) -> str:
    """The JSON embedded in model files by our save helpers."""
    return json.dumps({"format": _SIGNATURE_FORMAT, "inputs": [s.to_json() for s in inputs]})


def signature_from_json(text: str | bytes, *, where: str) -> tuple[TensorSpec, ...]:
    """Inverse of :func:`signature_to_json`; :class:`SignatureError` if unreadable."""
    try:
        obj = json.loads(text)
        if obj.get("format") != _SIGNATURE_FORMAT:
            raise ValueError(f"unknown signature format {obj.get('format')!r}")
        return tuple(TensorSpec.from_json(s) for s in obj["inputs"])
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
        raise SignatureError(f"{where}: embedded input signature is unreadable ({exc}); "
                             "pass --input-spec to override it") from None
