"""Knowledge sources: anything that turns a batch of inputs into teacher outputs.

The :class:`DistillReader` only keeps a window of batches in order; where the
teacher outputs come from is a :class:`KnowledgeSource`'s business. Remote
teachers (:class:`~student_client.pool.TeacherPool`), an in-process teacher
(:class:`InProcessTeacher`, regular distillation), and later an on-disk cache,
peers or the model's own earlier predictions all implement the same two
methods, so the reader pipelines any of them unchanged.

Contract (docs/internals.md):

* ``submit(inputs, *, batch_id)`` never blocks on the teacher and returns a
  ``concurrent.futures.Future`` that resolves exactly once, to
  ``dict[output name, torch.Tensor | TopK]`` or to a
  :class:`~student_client.errors.StudentError`. Retries and failover happen
  inside the source.
* Cancelling the future tells the source the answer is no longer wanted.
* ``close()`` releases resources and resolves every pending future; it is
  idempotent. Sources are context managers.
"""

from __future__ import annotations

import abc
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .errors import ConfigError, SourceClosedError, StudentError, TeacherRequestError
from .outputs import OutputSpec, TeacherValue, apply_spec, normalize_outputs

if TYPE_CHECKING:
    import torch

__all__ = ["InProcessTeacher", "KnowledgeSource"]


class KnowledgeSource(abc.ABC):
    """Where teacher outputs come from. See the module docstring for the contract."""

    @abc.abstractmethod
    def submit(self, inputs: Mapping[str, "torch.Tensor"], *, batch_id: Any) -> "Future[dict[str, TeacherValue]]":
        """Start producing the teacher outputs for one batch.

        Args:
            inputs: named model inputs, batch first (a single unnamed input has
                the name ``""``).
            batch_id: an identifier of the batch, used in logs, errors and as
                the wire request id.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; pending futures resolve with SourceClosedError."""

    def stats(self) -> dict[str, Any]:
        """Counters describing the work done so far (empty unless a source keeps some)."""
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _name_outputs(raw: Any) -> dict[str, "torch.Tensor"]:
    """Name model outputs like a teacher server: tensor -> logits, tuple -> outputN, dict keeps keys."""
    import torch

    if isinstance(raw, torch.Tensor):
        return {"logits": raw}
    if isinstance(raw, Mapping):
        return {str(k): v for k, v in raw.items()}
    if isinstance(raw, (tuple, list)):
        return {f"output{i}": v for i, v in enumerate(raw)}
    raise StudentError(f"in-process teacher returned {type(raw).__name__}; expected a tensor, tuple or dict")


class InProcessTeacher(KnowledgeSource):
    """A torch module called in the caller's thread: regular (online) distillation.

    Useful as the baseline the service is measured against and for tests: it
    applies the same output naming and :class:`OutputSpec` transforms as a
    teacher server. ``submit`` runs the forward pass synchronously under
    ``torch.inference_mode()`` and returns an already-resolved future. A
    failure resolves the future with a :class:`StudentError`: a request a
    served teacher would refuse (``top_k`` larger than the output) is a
    :class:`TeacherRequestError` with code ``INVALID_ARGUMENT``, an exception
    from the model one with code ``INTERNAL`` and the original as ``__cause__``.

    Args:
        model: the teacher; called as ``model(x)`` for a single input (name
            ``""`` or any single name) and ``model(**inputs)`` for several.
        outputs: the outputs to return (names or :class:`OutputSpec`).
        device: where to run the model; inputs are moved there.
    """

    def __init__(self, model: Callable[..., Any], outputs: Sequence[str | OutputSpec] | str = ("logits",),
                 *, device: "str | torch.device | None" = None) -> None:
        if not callable(model):
            raise ConfigError(f"InProcessTeacher needs a callable model, got {type(model).__name__}")
        self._model = model
        self._specs = normalize_outputs(outputs)
        self._device = device
        self._closed = False
        self._lock = threading.Lock()  # the model may not be thread-safe
        self._batches = 0

    @property
    def outputs(self) -> tuple[OutputSpec, ...]:
        """The output specs this source answers with."""
        return self._specs

    def submit(self, inputs: Mapping[str, "torch.Tensor"], *, batch_id: Any) -> "Future[dict[str, TeacherValue]]":
        """Run the model on ``inputs`` now (in the caller's thread); return a done future."""
        import torch

        if self._closed:
            raise SourceClosedError("InProcessTeacher is closed; create a new one to submit more batches")
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        try:
            xs = {k: (v.to(self._device) if self._device is not None else v) for k, v in inputs.items()}
            with self._lock, torch.inference_mode():
                raw = self._model(next(iter(xs.values()))) if len(xs) == 1 else self._model(**xs)
                named = _name_outputs(raw)
                result: dict[str, TeacherValue] = {}
                for spec in self._specs:
                    if spec.name not in named:
                        raise StudentError(
                            f"in-process teacher has no output {spec.name!r} (it has {', '.join(named)})")
                    result[spec.name] = apply_spec(named[spec.name], spec)
                self._batches += 1
        except TeacherRequestError as exc:  # e.g. top_k > C: what a served teacher answers
            exc.batch_id = batch_id
            fut.set_exception(exc)
        except StudentError as exc:
            fut.set_exception(exc)
        except Exception as exc:  # resolve the future whatever went wrong, inside the StudentError tree
            # A served teacher answers a crashing forward pass with INTERNAL; the
            # torch exception stays available as __cause__.
            details = f"{type(exc).__name__}: {exc}"
            error = TeacherRequestError(
                f"in-process teacher failed on batch {batch_id}: {details}",
                code="INTERNAL", details=details, endpoint="in-process", batch_id=batch_id)
            error.__cause__ = exc
            fut.set_exception(error)
        else:
            fut.set_result(result)
        return fut

    def stats(self) -> dict[str, Any]:
        """``{"batches": n}``: batches answered so far."""
        return {"batches": self._batches}

    def close(self) -> None:
        """Refuse further batches (:class:`SourceClosedError`); nothing to release."""
        self._closed = True
