"""Which part of a loader batch is sent to the teacher.

The default picker takes the first element of a tuple/list batch
(``(images, labels)``), the ``"input"`` key of a dict batch, or the batch
itself when it is a tensor or ndarray. A custom ``teacher_input(batch)`` may
return a tensor/ndarray (the model's single input) or a dict of them (named
model inputs). Either way the knowledge source receives
``dict[name, tensor]``, with ``""`` naming a single unnamed input.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from .errors import ConfigError

__all__ = ["batch_rows", "default_teacher_input", "make_input_fn"]


_ARRAY_TYPES: tuple[type, ...] | None = None  # (torch.Tensor, np.ndarray), bound at first use (torch loads lazily)


def _is_array(x: Any) -> bool:
    global _ARRAY_TYPES
    if _ARRAY_TYPES is None:
        import torch

        _ARRAY_TYPES = (torch.Tensor, np.ndarray)
    return isinstance(x, _ARRAY_TYPES)


def default_teacher_input(batch: Any) -> Any:
    """First element of a tuple/list, ``batch["input"]`` of a dict, or the tensor itself."""
    if _is_array(batch):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ConfigError("the loader yielded an empty tuple/list; nothing to send to the teacher")
        return batch[0]
    if isinstance(batch, Mapping):
        if "input" in batch:
            return batch["input"]
        raise ConfigError(
            f"the loader yields dict batches without an 'input' key (keys: {', '.join(map(str, batch))}); "
            "pass teacher_input=lambda b: b['your_key'] (or a dict of named model inputs)")
    raise ConfigError(
        f"cannot tell what to send to the teacher from a {type(batch).__name__} batch; "
        "pass teacher_input=callable returning a tensor or a dict of named tensors")


def make_input_fn(teacher_input: Callable[[Any], Any] | None) -> Callable[[Any], dict[str, Any]]:
    """A function ``batch -> dict[name, tensor]`` built from a user picker (or the default)."""
    if teacher_input is not None and not callable(teacher_input):
        raise ConfigError(f"teacher_input must be a callable batch -> tensor, got {type(teacher_input).__name__}")
    pick = teacher_input or default_teacher_input

    def inputs_of(batch: Any) -> dict[str, Any]:
        x = pick(batch)
        if _is_array(x):
            return {"": x}
        if isinstance(x, Mapping) and x and all(isinstance(k, str) and _is_array(v) for k, v in x.items()):
            return dict(x)
        raise ConfigError(
            f"teacher_input returned {type(x).__name__}; expected a tensor/ndarray or a non-empty dict "
            "of named tensors")

    return inputs_of


def batch_rows(inputs: Any) -> int | None:
    """Samples in one batch: the first dimension of its (first) teacher input; None if it has none."""
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()), None)
    shape = getattr(inputs, "shape", None)
    return int(shape[0]) if shape else None
