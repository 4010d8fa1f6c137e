"""Moving teacher outputs to the training device.

On a CUDA target the host tensors are first copied into page-locked (pinned)
memory and then sent with ``non_blocking=True``, so the copy overlaps the
training step instead of stalling it. Pinning only pays (and only works) for
CUDA targets with a CUDA runtime, so it is skipped for any other device.
PyTorch's caching host allocator keeps the pinned buffer alive until the
asynchronous copy has finished, so the buffer may be dropped right away.

Answers keep what they are: a :class:`~student_client.outputs.TopK` moves its
values and indices, and a :class:`~student_client.outputs.Dense` stays a
``Dense`` with its transform and temperature (its ``pin_memory()`` and
``to()`` keep them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .outputs import TopK

if TYPE_CHECKING:
    import torch

__all__ = ["move_outputs", "should_pin"]


def should_pin(device: "torch.device") -> bool:
    """Whether host tensors bound for ``device`` should be pinned first."""
    import torch

    return device.type == "cuda" and torch.cuda.is_available()


def _move(value: Any, device: "torch.device", pin: bool) -> Any:
    import torch

    if isinstance(value, TopK):
        if pin and value.values.device.type == "cpu":
            value = value.pin_memory()
        return value.to(device, non_blocking=pin)
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if pin and value.device.type == "cpu":
            value = value.pin_memory()
        return value.to(device, non_blocking=pin)
    return value


def move_outputs(outputs: Mapping[str, Any], device: "torch.device", *, pin: bool | None = None) -> dict[str, Any]:
    """``{name: Dense | tensor | TopK}`` on ``device``; pinned + non-blocking for CUDA targets.

    Args:
        pin: force pinning on or off; default :func:`should_pin`.
    """
    if pin is None:
        pin = should_pin(device)
    return {k: _move(v, device, pin) for k, v in outputs.items()}
