"""Small tensor helpers the cache modules (and the recorder) share: dtype names as stored in shard
metadata, and picking rows of a batch's inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from protos import outputs as shared

from ..errors import ConfigError

__all__ = ["dtype_name", "index_dtype", "take_rows"]


def dtype_name(dtype: Any) -> str:
    """``torch.float16`` -> ``"float16"``: the form shard metadata stores (``getattr(torch, name)`` reads it)."""
    return str(dtype).removeprefix("torch.")


def index_dtype(classes: int) -> str:
    """The name of the smallest dtype for top-k indices into a last dimension of ``classes``.

    The same choice as the wire's compact indices (:func:`protos.outputs.index_dtype`).
    """
    return dtype_name(shared.index_dtype(classes))


def take_rows(value: Any, idx: Any) -> Any:
    """Rows ``idx`` (an int64 index tensor) of a batch-first input (tensor or ndarray)."""
    if hasattr(value, "index_select"):
        return value.index_select(0, idx.to(value.device))
    if isinstance(value, np.ndarray):
        return value[idx.numpy()]
    raise ConfigError(f"cannot pick the missing rows of an input of type {type(value).__name__}")
