"""Small tensor helpers the cache modules share: dtype names as stored in shard metadata."""

from __future__ import annotations

from typing import Any

from protos import outputs as shared

__all__ = ["dtype_name", "index_dtype"]


def dtype_name(dtype: Any) -> str:
    """``torch.float16`` -> ``"float16"``: the form shard metadata stores (``getattr(torch, name)`` reads it)."""
    return str(dtype).removeprefix("torch.")


def index_dtype(classes: int) -> str:
    """The name of the smallest dtype for top-k indices into a last dimension of ``classes``.

    The same choice as the wire's compact indices (:func:`protos.outputs.index_dtype`).
    """
    return dtype_name(shared.index_dtype(classes))
