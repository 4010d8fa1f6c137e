"""How one output's answers are laid out in a shard, and put back together.

Per output ``name`` (rows = samples, in the shard's key order):

* dense answer (:class:`~student_client.outputs.Dense`): tensor ``name`` of
  shape ``(rows, *shape)`` in the answer's dtype, bytes exactly as the
  teacher sent them;
* top-k answer (:class:`~student_client.outputs.TopK`): ``name.values``
  ``(rows, ..., k)`` in the answer's dtype and ``name.indices`` in the
  smallest unsigned dtype that holds the last dimension ``C`` (uint8 up to
  256 classes, uint16 up to 65,536, else int32), widened back to int64 on read.

* per-token answers of language models (a spec with ``mask``, ``tail`` or
  ``sample``): ragged rows of answered positions, :mod:`._tokens`.

The layout (``kind``, ``transform``, ``temperature``, ``dtype``, per-sample
shapes) is in the shard's metadata, so an answer read back carries the
metadata it was recorded with, and equals the live answer bit for bit.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import CacheError, ConfigError
from ..outputs import OutputSpec, Sampled, TopK, dense_answer
from ._tensors import dtype_name, index_dtype
from ._tokens import token_columns, token_gather, token_layout

__all__ = ["ColumnBuffer", "columns", "gather", "layout_of"]


def _is_tokens(answer: Any, spec: OutputSpec | None) -> bool:
    return isinstance(answer, Sampled) or (isinstance(answer, TopK) and (
        answer.mask is not None or answer.tail is not None or (spec is not None and spec.token_level)))


def layout_of(name: str, answer: Any, spec: OutputSpec | None = None, token_codec: str = "exact") -> dict:
    """The layout of one batch's answer for output ``name`` (per-sample shapes, no row count)."""
    import torch

    if _is_tokens(answer, spec):
        return token_layout(answer, token_codec)
    if isinstance(answer, TopK):
        return {"kind": "topk", "transform": answer.transform, "temperature": float(answer.temperature),
                "dtype": dtype_name(answer.values.dtype), "k": answer.k, "dense_shape": list(answer.dense_shape[1:]),
                "index_dtype": index_dtype(answer.dense_size)}
    if isinstance(answer, torch.Tensor):
        return {"kind": "dense", "transform": getattr(answer, "transform", "raw"),
                "temperature": float(getattr(answer, "temperature", 1.0)), "dtype": dtype_name(answer.dtype),
                "shape": list(answer.shape[1:])}
    raise CacheError(f"cannot record output {name!r}: the source answered with a {type(answer).__name__}, "
                     "not a tensor, Dense or TopK")


def columns(name: str, answer: Any, layout: dict) -> dict[str, Any]:
    """The shard tensors of one answer (row-major, CPU, indices in the compact dtype)."""
    import torch

    if layout["kind"] == "tokens":
        return token_columns(name, answer, layout)
    if layout["kind"] == "topk":
        return {f"{name}.values": answer.values.detach().cpu(),
                f"{name}.indices": answer.indices.to(getattr(torch, layout["index_dtype"])).cpu()}
    return {name: torch.Tensor.as_subclass(answer.detach().cpu(), torch.Tensor)}


class ColumnBuffer:
    """The rows of one shard being filled: keys and each output's tensors, batch by batch."""

    def __init__(self, specs: Sequence[OutputSpec], token_codec: str = "exact") -> None:
        self.specs = tuple(specs)
        self.token_codec = token_codec
        self.keys: list = []
        self.layouts: dict[str, dict] = {}
        self._parts: dict[str, list] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: Sequence[Any], answers: Mapping[str, Any],
            prepared: Mapping[str, tuple[dict, dict[str, Any]]] | None = None) -> None:
        """Append one batch (its keys, in row order, and its answers by output name).

        Args:
            prepared: ``name -> (layout, columns)`` the caller already built
                for some outputs (the write-back, which merged them), so they
                are not built twice; the others are built here.
        """
        for spec in self.specs:
            if spec.name not in answers:
                raise CacheError(f"the source answered without output {spec.name!r} "
                                 f"(it sent: {', '.join(answers) or 'nothing'})")
            answer = answers[spec.name]
            layout, cols = (prepared or {}).get(spec.name) or (layout_of(spec.name, answer, spec, self.token_codec),
                                                                None)
            rows = answer.dense_shape[0] if isinstance(answer, (TopK, Sampled)) else answer.shape[0]
            if rows != len(keys):
                raise CacheError(f"output {spec.name!r} has {rows} rows for {len(keys)} sample keys")
            seen = self.layouts.setdefault(spec.name, layout)
            if seen != layout:
                raise CacheError(f"output {spec.name!r} changed its layout within a shard: {seen} then {layout}; "
                                 "a cache holds one shape, dtype and transform per output")
            for tname, t in (cols if cols is not None else columns(spec.name, answer, layout)).items():
                self._parts.setdefault(tname, []).append(t)
                self.nbytes += t.numel() * t.element_size()
        self.keys.extend(keys)

    def take(self) -> tuple[list, dict[str, dict], dict[str, Any]]:
        """``(keys, layouts, tensors)`` of the rows so far; the buffer is empty afterwards."""
        import torch

        tensors = {n: torch.cat(p) if len(p) > 1 else p[0] for n, p in self._parts.items()}
        out = (self.keys, self.layouts, tensors)
        self.keys, self.layouts, self._parts, self.nbytes = [], {}, {}, 0
        return out


def gather(name: str, layout: dict, parts: Sequence[tuple[Mapping[str, Any], Any, Any]], batch: int,
           request: tuple | None = None) -> Any:
    """One output's answer for a batch of ``batch`` rows, from rows of several shards.

    Args:
        parts: ``(shard tensors, rows in that shard, positions in the batch)``
            per shard (int64 index tensors; positions None: rows are in batch order).
        request: ``(spec, inputs, keys)`` of the batch (per-token answers take
            their length and mask from the inputs).
    """
    import torch

    if layout["kind"] == "tokens":
        return _gather_tokens(name, layout, parts, batch, request)

    def assemble(tname: str, per_sample: Sequence[int], dtype) -> "torch.Tensor":
        out = torch.empty((batch, *per_sample), dtype=dtype)
        if len(parts) == 1 and parts[0][2] is None:  # one shard, rows already in batch order
            return parts[0][0][tname].index_select(0, parts[0][1]).to(dtype)
        for tensors, rows, where in parts:
            out.index_copy_(0, where, tensors[tname].index_select(0, rows).to(dtype))
        return out

    dtype = getattr(torch, layout["dtype"])
    if layout["kind"] == "topk":
        k_shape = [*layout["dense_shape"][:-1], layout["k"]]
        values = assemble(f"{name}.values", k_shape, dtype)
        indices = assemble(f"{name}.indices", k_shape, torch.int64)
        return TopK(values, indices, (batch, *layout["dense_shape"]), layout["transform"], layout["temperature"])
    if layout["kind"] == "dense":
        return dense_answer(assemble(name, layout["shape"], dtype), layout["transform"], layout["temperature"])
    raise ConfigError(f"output {name!r} is stored as {layout['kind']!r}, which this version cannot read")


def _gather_tokens(name: str, layout: dict, parts, batch: int, request: tuple | None) -> Any:
    samples: list = [None] * batch
    for tensors, rows, where in parts:
        for j, r in enumerate(rows.tolist()):
            samples[j if where is None else int(where[j])] = (tensors, r)
    spec, inputs, keys = request if request is not None else (None, {}, list(range(batch)))
    length, asked = None, None
    if spec is not None and spec.mask and spec.mask in inputs:
        asked = inputs[spec.mask] != 0  # (B, L): the positions a live teacher would answer now
        length = int(asked.shape[1])
    else:
        length = next((int(v.shape[1]) for v in inputs.values() if getattr(v, "dim", lambda: 0)() >= 2), None)
    return token_gather(name, layout, samples, keys, length, asked)
