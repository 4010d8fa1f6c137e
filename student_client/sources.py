"""Knowledge sources: anything that turns a batch of inputs into teacher outputs.

The :class:`~student_client.reader.DistillReader` only keeps a window of
batches in order; where the teacher outputs come from is a
:class:`KnowledgeSource`'s business. Remote teachers
(:class:`~student_client.pool.TeacherPool`), an in-process teacher
(:class:`InProcessTeacher`, regular distillation), sources made of other
sources (:mod:`student_client.compose`), and later an on-disk cache, peers
or the model's own earlier predictions all implement the same contract, so
the reader pipelines any of them unchanged.

Contract (docs/internals.md):

* ``submit(request)`` takes a :class:`SourceRequest` (the batch's inputs, the
  per-sample ``keys`` and the ``batch_id``), never blocks on the teacher, and
  returns a ``concurrent.futures.Future`` that resolves exactly once, to
  ``dict[output name, answer]`` (a ``torch.Tensor`` or a
  :class:`~student_client.outputs.TopK`) or to a
  :class:`~student_client.errors.StudentError`. Retries and failover happen
  inside the source. A future resolves whether or not anyone waits on it
  (its done-callbacks run when it does), so a source may wrap another by
  chaining callbacks.
* Cancelling the future tells the source the answer is no longer wanted.
* ``observe(keys, student_outputs)`` (optional; the default ignores it)
  receives the student's own predictions for the samples ``keys`` after a
  training step, for sources that learn from them (self-distillation).
* ``stats()`` returns a :class:`~student_client.stats.SourceStats`.
* ``close()`` releases resources and resolves every pending future; it is
  idempotent. Sources are context managers.

Keys identify samples across epochs and shuffling (by default the dataset
index, see :mod:`student_client.keys`); ``keys`` is None when the loader
cannot say which samples a batch holds, and a source that needs keys then
raises :class:`~student_client.errors.ConfigError` from ``submit``.
"""

from __future__ import annotations

import abc
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

from protos.outputs import name_outputs

from .errors import ConfigError, SourceClosedError, StudentError, TeacherRequestError
from .outputs import OutputSpec, TeacherValue, apply_spec, normalize_outputs
from .stats import SourceStats

if TYPE_CHECKING:
    import torch

__all__ = ["InProcessTeacher", "KnowledgeSource", "SourceRequest"]


class SourceRequest(NamedTuple):
    """One batch for a :class:`KnowledgeSource`.

    Attributes:
        inputs: named model inputs, batch first (a single unnamed input has
            the name ``""``).
        batch_id: identifies the batch in logs, errors and as the wire request id.
        keys: one key per sample (row) of the batch, stable under shuffling
            (ints or strings), or None when unknown.
    """

    inputs: Mapping[str, Any]
    batch_id: Any = None
    keys: Sequence[Any] | None = None


class KnowledgeSource(abc.ABC):
    """Where teacher outputs come from. See the module docstring for the contract."""

    @abc.abstractmethod
    def submit(self, request: SourceRequest) -> "Future[dict[str, TeacherValue]]":
        """Start producing the teacher outputs for one batch (never blocks on the teacher)."""

    def observe(self, keys: Sequence[Any], student_outputs: Any) -> None:
        """Receive the student's predictions for the samples ``keys`` (default: ignored)."""

    def stats(self) -> SourceStats:
        """Counters describing the work done so far."""
        return SourceStats(kind=type(self).__name__)

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; pending futures resolve with SourceClosedError."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def require_keys(keys: Sequence[Any] | None, who: str) -> Sequence[Any]:
    """``keys``, or a ConfigError saying that ``who`` (e.g. "PS-KD answers each sample ...") needs them."""
    if keys is None:
        raise ConfigError(f"{who} and this batch has no sample keys; use a DataLoader over a map-style dataset "
                          "(its dataset indices are the default keys) or pass DistillReader(..., "
                          "sample_keys=callable(batch) -> keys)")
    return keys


def check_request(request: Any) -> SourceRequest:
    """``request`` if it is a :class:`SourceRequest`, else a ConfigError saying how to build one."""
    if isinstance(request, SourceRequest):
        return request
    raise ConfigError(f"submit() takes a SourceRequest(inputs, batch_id=..., keys=...), got "
                      f"{type(request).__name__}; e.g. source.submit(SourceRequest({{'': x}}, batch_id=1))")


class InProcessTeacher(KnowledgeSource):
    """A torch module called in the caller's thread: regular distillation ("the same classroom").

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
        outputs: the outputs to return (names, :class:`OutputSpec`, or a loss
            that says what it needs).
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
        self._n = {"submitted": 0, "completed": 0, "failed": 0}

    @property
    def outputs(self) -> tuple[OutputSpec, ...]:
        """The output specs this source answers with."""
        return self._specs

    def submit(self, request: SourceRequest) -> "Future[dict[str, TeacherValue]]":
        """Run the model on the request's inputs now (in the caller's thread); return a done future."""
        import torch

        inputs, batch_id = check_request(request)[:2]
        if self._closed:
            raise SourceClosedError("InProcessTeacher is closed; create a new one to submit more batches")
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        self._n["submitted"] += 1
        try:
            xs = {k: (v.to(self._device) if self._device is not None else v) for k, v in inputs.items()}
            with self._lock, torch.inference_mode():
                raw = self._model(next(iter(xs.values()))) if len(xs) == 1 else self._model(**xs)
                named = name_outputs(raw)
                result: dict[str, TeacherValue] = {}
                for spec in self._specs:
                    if spec.name not in named:
                        raise StudentError(
                            f"in-process teacher has no output {spec.name!r} (it has {', '.join(named)})")
                    result[spec.name] = apply_spec(named[spec.name], spec, xs)
        except TeacherRequestError as exc:  # e.g. top_k > C: what a served teacher answers
            exc.batch_id = batch_id
            self._fail(fut, exc)
        except StudentError as exc:
            self._fail(fut, exc)
        except Exception as exc:  # resolve the future whatever went wrong, inside the StudentError tree
            # A served teacher answers a crashing forward pass with INTERNAL; the
            # torch exception stays available as __cause__.
            details = f"{type(exc).__name__}: {exc}"
            error = TeacherRequestError(
                f"in-process teacher failed on batch {batch_id}: {details}",
                code="INTERNAL", details=details, endpoint="in-process", batch_id=batch_id)
            error.__cause__ = exc
            self._fail(fut, error)
        else:
            self._n["completed"] += 1
            fut.set_result(result)
        return fut

    def _fail(self, fut: Future, exc: BaseException) -> None:
        self._n["failed"] += 1
        fut.set_exception(exc)

    def stats(self) -> SourceStats:
        """Batches submitted, answered and failed so far."""
        return SourceStats(kind="in-process", **self._n)

    def close(self) -> None:
        """Refuse further batches (:class:`SourceClosedError`); nothing to release."""
        self._closed = True
