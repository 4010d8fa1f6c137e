"""Per-token answers of language-model teachers in a shard: only the answered positions, compactly.

A per-token answer (``OutputSpec`` with ``mask``, ``tail`` or ``sample``; a
:class:`~student_client.outputs.TopK` or :class:`~student_client.outputs.Sampled`
of dense shape ``(B, L, V)``) is stored ragged, one row per *answered
position* (the mask's True positions; every position without a mask):

* ``name.count`` ``(rows,)`` int32 answered positions per sample, ``name.pos``
  ``(P,)`` uint16 their positions (0, 1, 2, ... for right padding: zstd makes
  that almost free), ``name.length`` ``(rows,)`` int32 the sequence length
  the sample was recorded at;
* ``codec="exact"``: ``name.values`` ``(P, k)`` as sent (fp16 for
  ``dtype="float16"``) and ``name.indices`` ``(P, k)`` in the smallest
  unsigned dtype for V, ``name.tail`` ``(P,)``; read back bit for bit;
* ``codec="compact"`` (log_probs top-k): each position's k entries sorted by
  token id, the ids stored as gaps (``name.gaps``, uint16; zstd entropy-codes
  the small numbers), the log-probabilities as ``name.top`` (the largest,
  float32) and ``name.q`` uint8 steps of ``1/16`` nat below it (clamped at 255
  steps = 15.9 nats), ``name.tail`` float16. Lossy by at most 1/32 nat per
  entry, and the order of the k entries comes back by value (ties in any
  order); its fidelity is measured by ``bench/lm_cache.py``.
* sampled answers: ``name.indices`` ``(P, S)`` draws in the compact dtype.

Reading builds the answer for the batch being asked: its length ``L`` and
mask from the request's inputs (the ``mask`` input when the spec names one).
A sample whose recorded positions differ from the positions asked now (its
mask changed, or it is longer than recorded) is a clear error, not a silent
mismatch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import CacheMismatchError
from ..outputs import Sampled, TopK
from ._tensors import dtype_name, index_dtype

__all__ = ["QUANT_STEP", "token_columns", "token_gather", "token_layout"]

QUANT_STEP = 1.0 / 16  # nats per uint8 step in the compact codec
_CODECS = ("exact", "compact")


def token_layout(answer: Any, codec: str) -> dict:
    """The layout of a per-token answer (no per-batch sizes)."""
    if codec not in _CODECS:
        raise ValueError(f"token codec must be one of {_CODECS}, got {codec!r}")
    V = int(answer.dense_shape[-1])
    base = {"kind": "tokens", "vocab": V, "index_dtype": index_dtype(V), "masked": answer.mask is not None}
    if isinstance(answer, Sampled):
        return {**base, "sampled": answer.num_samples, "temperature": float(answer.temperature), "codec": "exact"}
    if codec == "compact" and answer.transform != "log_probs":
        codec = "exact"  # the quantizer is for log-probabilities
    return {**base, "sampled": 0, "k": answer.k, "transform": answer.transform,
            "temperature": float(answer.temperature), "dtype": dtype_name(answer.values.dtype),
            "tail": answer.tail is not None, "codec": codec}


def token_columns(name: str, answer: Any, layout: dict) -> dict[str, Any]:
    """The shard columns of one batch's per-token answer (answered positions only)."""
    import torch

    B, L = int(answer.dense_shape[0]), int(answer.dense_shape[1])
    mask = answer.mask if answer.mask is not None else torch.ones(B, L, dtype=torch.bool)
    mask = mask.cpu()
    pos = torch.arange(L).expand(B, L)[mask]  # (P,) positions in row order
    cols = {f"{name}.count": mask.sum(1).to(torch.int32), f"{name}.pos": pos.to(torch.uint16),
            f"{name}.length": torch.full((B,), L, dtype=torch.int32)}
    idx_dtype = getattr(torch, layout["index_dtype"])
    indices = answer.indices.cpu()[mask]  # (P, k or S)
    if layout["sampled"]:
        cols[f"{name}.indices"] = indices.to(idx_dtype)
        return cols
    values = answer.values.cpu()[mask]  # (P, k)
    if layout["tail"]:
        cols[f"{name}.tail"] = answer.tail.cpu()[mask].to(torch.float16 if layout["codec"] == "compact"
                                                           else answer.tail.dtype)
    if layout["codec"] == "exact":
        cols[f"{name}.values"], cols[f"{name}.indices"] = values, indices.to(idx_dtype)
        return cols
    order = indices.argsort(dim=1)  # by token id: the gaps are small numbers
    ids = indices.gather(1, order)
    lp = values.float().gather(1, order)
    top = values.float().max(1).values  # (P,)
    gaps = torch.cat([ids[:, :1], ids[:, 1:] - ids[:, :-1]], 1)
    cols[f"{name}.gaps"] = gaps.to(torch.uint16 if layout["vocab"] <= 1 << 16 else torch.int32)
    cols[f"{name}.top"] = top
    cols[f"{name}.q"] = ((top[:, None] - lp) / QUANT_STEP).round().clamp(0, 255).to(torch.uint8)
    return cols


def _decoded(name: str, t: Mapping[str, Any], layout: dict, lo: int, hi: int) -> dict[str, Any]:
    """One sample's answered rows ``[lo, hi)`` as (positions, values, int64 indices, tail)."""
    import torch

    out = {"pos": t[f"{name}.pos"][lo:hi].to(torch.int64)}
    if layout["codec"] == "exact":
        out["indices"] = t[f"{name}.indices"][lo:hi].to(torch.int64)
        if not layout["sampled"]:
            out["values"] = t[f"{name}.values"][lo:hi]
    else:
        ids = t[f"{name}.gaps"][lo:hi].to(torch.int64).cumsum(1)
        lp = t[f"{name}.top"][lo:hi, None] - t[f"{name}.q"][lo:hi].float() * QUANT_STEP
        lp, order = lp.sort(dim=1, descending=True)  # TopK order: by value
        out["values"] = lp.to(getattr(torch, layout["dtype"]))
        out["indices"] = ids.gather(1, order)
    if layout.get("tail"):
        out["tail"] = t[f"{name}.tail"][lo:hi].to(getattr(torch, layout["dtype"]))
    return out


def token_gather(name: str, layout: dict, samples: Sequence[tuple[Mapping[str, Any], int]], keys: Sequence[Any],
                 length: int | None, asked_mask: Any) -> Any:
    """The batch's answer from each sample's recorded rows.

    Args:
        samples: ``(shard tensors, row in that shard)`` per sample, in batch order.
        length: the batch's sequence length L (None: the longest recorded).
        asked_mask: ``(B, L)`` bool positions asked for now (the spec's mask input), or None.
    """
    import torch

    rows = []
    for tensors, r in samples:
        offsets = tensors.get(f"{name}.offsets")
        if offsets is None:  # computed once per loaded shard
            offsets = tensors[f"{name}.offsets"] = torch.cat(
                [torch.zeros(1, dtype=torch.int64), tensors[f"{name}.count"].to(torch.int64).cumsum(0)])
        rows.append((_decoded(name, tensors, layout, int(offsets[r]), int(offsets[r + 1])),
                     int(tensors[f"{name}.length"][r])))
    B = len(samples)
    L = length if length is not None else max(n for _, n in rows)
    width = layout["sampled"] or layout["k"]
    dtype = getattr(torch, layout["dtype"]) if not layout["sampled"] else None
    indices = torch.zeros(B, L, width, dtype=torch.int64)
    values = torch.zeros(B, L, width, dtype=dtype) if dtype is not None else None
    tail = torch.zeros(B, L, dtype=dtype) if layout.get("tail") else None
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, (d, recorded_len) in enumerate(rows):
        pos = d["pos"]
        want = asked_mask[i] if asked_mask is not None else torch.arange(L) < min(L, recorded_len)
        if layout["masked"] or asked_mask is not None:
            ok = pos.numel() == int(want.sum()) and (pos.numel() == 0 or bool(want[pos[pos < L]].all())) \
                and bool((pos < L).all())
        else:
            ok = L <= recorded_len
            keep = pos < L
            pos, d = pos[keep], {k: v[keep] for k, v in d.items() if k != "pos"}
        if not ok:
            raise CacheMismatchError(
                f"sample {keys[i]!r} of output {name!r} was recorded with answers at {pos.numel()} position(s) of a "
                f"length-{recorded_len} sequence; this batch asks for {int(want.sum())} of length {L}. The sample "
                "or its mask changed since recording: record it again")
        mask[i, pos] = True
        indices[i, pos] = d["indices"]
        if values is not None:
            values[i, pos] = d["values"]
        if tail is not None:
            tail[i, pos] = d["tail"]
    shape = (B, L, layout["vocab"])
    out_mask = mask if layout["masked"] else None
    if layout["sampled"]:
        return Sampled(indices, shape, layout["temperature"], out_mask)
    return TopK(values, indices, shape, layout["transform"], layout["temperature"], tail, out_mask)
