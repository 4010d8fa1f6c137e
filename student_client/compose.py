"""Sources made of other sources: a fallback chain and a weighted ensemble.

::

    # answers recorded on disk, else the live teachers (cache misses go to the pool)
    source = FallbackSource([cached, TeacherPool.from_registry(url, "r101", outputs)])
    # the mean of two teachers' probabilities, 2:1
    source = EnsembleSource([(pool_a, 2.0), (pool_b, 1.0)])

Both chain the futures of their parts with done-callbacks, so an answer is
ready as soon as its parts' are, whichever thread waits (a
:class:`~student_client.pool.TeacherPool` future with a callback is read by
the pool's dispatcher as soon as the teacher answers). A composite source
owns its parts: ``close()`` closes them, ``observe()`` is passed to each, and
``stats()`` has theirs under ``parts`` (and their teachers merged).
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Future
from functools import partial
from typing import Any, Callable, Sequence

from .errors import AnswerMissingError, ConfigError, NoTeacherAvailableError, StudentError
from .futures import settle
from .outputs import TopK, TeacherValue
from .sources import KnowledgeSource, SourceRequest, check_request
from .stats import SourceStats

__all__ = ["EnsembleSource", "FallbackSource"]

logger = logging.getLogger(__name__)

#: Failures after which a FallbackSource asks its next source (and an EnsembleSource
#: goes on with the members that answered): "this source has no answer", not "this
#: request is wrong".
FALL_THROUGH = (AnswerMissingError, NoTeacherAvailableError)


class _Chained(Future):
    """A composite's future: cancelling it cancels the part futures it waits for."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[Future] = []

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        for p in list(self.parts):
            p.cancel()
        return True

    def settle(self, result: Any = None, exc: BaseException | None = None) -> bool:
        """Resolve once; False if it was cancelled or resolved already."""
        return settle(self, result, exc)


def when_all(futures: Sequence[Future], callback: Callable[[], None]) -> None:
    """Call ``callback()`` once, when the last of ``futures`` is done (at once if there are none).

    It runs in the thread that completed that last future.
    """
    if not futures:
        callback()
        return
    left = [len(futures)]
    lock = threading.Lock()  # done-callbacks run in the threads that resolve the futures

    def done(_f: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        callback()

    for f in futures:
        f.add_done_callback(done)


def mean_answers(answers: Sequence[dict[str, TeacherValue]], weights: Sequence[float]) -> dict[str, TeacherValue]:
    """``{name: mean_answer(...)}`` over every output name of the first answer; ``{}`` for no answers."""
    return {name: mean_answer([a[name] for a in answers], weights, name=name) for name in answers[0]} if answers else {}


class _Composite(KnowledgeSource):
    """What both composites share: parts, counters, observe, stats, close."""

    kind = "composite"

    def __init__(self, sources: Sequence[KnowledgeSource]) -> None:
        for s in sources:
            if not isinstance(s, KnowledgeSource):
                raise ConfigError(f"{type(self).__name__} takes KnowledgeSource objects, got {type(s).__name__}")
        if not sources:
            raise ConfigError(f"{type(self).__name__} needs at least one source")
        self._sources = list(sources)
        self._lock = threading.Lock()
        self._n = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0}
        self._closed = False

    def _count(self, what: str) -> None:
        with self._lock:
            self._n[what] += 1

    def _finish(self, out: _Chained, result: Any = None, exc: BaseException | None = None) -> None:
        if out.settle(result, exc):
            self._count("failed" if exc is not None else "completed")
        elif out.cancelled():
            self._count("cancelled")

    def observe(self, keys: Sequence[Any], student_outputs: Any) -> None:
        for s in self._sources:
            s.observe(keys, student_outputs)

    def stats(self) -> SourceStats:
        parts = {f"{i}:{type(s).__name__}": s.stats() for i, s in enumerate(self._sources)}
        teachers: dict = {}
        for name, p in parts.items():
            for endpoint, t in p.teachers.items():
                teachers[endpoint if endpoint not in teachers else f"{endpoint}@{name}"] = t
        with self._lock:
            n = dict(self._n)
        return SourceStats(kind=self.kind, teachers=teachers, parts=parts,
                           retries=sum(p.retries for p in parts.values()),
                           late_answers_dropped=sum(p.late_answers_dropped for p in parts.values()),
                           hedges=sum(p.hedges for p in parts.values()), **n)

    def close(self) -> None:
        """Close every part (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for s in self._sources:
            s.close()


class FallbackSource(_Composite):
    """The first source that has the answer: a cache, else live teachers, else a second service.

    Each batch goes to the first source; when it answers with "no answer here"
    (:class:`AnswerMissingError`, e.g. a cache miss, or
    :class:`NoTeacherAvailableError`) it goes to the next one, and so on. Any
    other error (a request the teacher rejects) is the batch's answer.
    """

    kind = "fallback"

    def submit(self, request: SourceRequest) -> "Future[dict[str, TeacherValue]]":
        check_request(request)
        self._count("submitted")
        out = _Chained()
        self._ask(request, 0, out)
        return out

    def _ask(self, request: SourceRequest, i: int, out: _Chained) -> None:
        if out.cancelled():
            return
        try:
            f = self._sources[i].submit(request)
        except FALL_THROUGH as exc:
            self._next(request, i, out, exc)
            return
        except StudentError as exc:
            self._finish(out, exc=exc)
            return
        out.parts.append(f)
        f.add_done_callback(partial(self._answered, request, i, out))

    def _answered(self, request: SourceRequest, i: int, out: _Chained, f: Future) -> None:
        if f.cancelled():
            self._finish(out, exc=StudentError(f"source {i} cancelled batch {request.batch_id}"))
            return
        exc = f.exception()
        if exc is None:
            self._finish(out, f.result())
        elif isinstance(exc, FALL_THROUGH):
            self._next(request, i, out, exc)
        else:
            self._finish(out, exc=exc)

    def _next(self, request: SourceRequest, i: int, out: _Chained, exc: BaseException) -> None:
        if i + 1 >= len(self._sources):
            self._finish(out, exc=exc)
            return
        logger.debug("batch %s: source %d has no answer (%s); asking source %d", request.batch_id, i, exc, i + 1)
        self._ask(request, i + 1, out)


class EnsembleSource(_Composite):
    """The weighted mean of several sources' answers (e.g. several teachers, or codistilling peers).

    Every batch goes to every member. Answers are combined per output as the
    weighted mean of probabilities for ``probs``, its log for ``log_probs``
    (a log-sum-exp, exact in float32), and of the values for ``raw`` outputs;
    top-k answers (probs/log_probs only) are densified, averaged and cut back
    to the largest k. Members must answer with the same transform and
    temperature. A member with no answer (:class:`NoTeacherAvailableError`,
    :class:`AnswerMissingError`) is left out of that batch's mean and the
    others' weights renormalised; any other failure fails the batch.

    Args:
        sources: members, each a :class:`KnowledgeSource` (weight 1) or a
            ``(source, weight)`` pair with weight > 0.
    """

    kind = "ensemble"

    def __init__(self, sources: Sequence[KnowledgeSource | tuple[KnowledgeSource, float]]) -> None:
        members, weights = [], []
        for item in sources:
            src, w = item if isinstance(item, tuple) else (item, 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"ensemble weights must be finite numbers > 0, got {w!r}")
            members.append(src)
            weights.append(float(w))
        super().__init__(members)
        self._weights = weights

    def submit(self, request: SourceRequest) -> "Future[dict[str, TeacherValue]]":
        check_request(request)
        self._count("submitted")
        out = _Chained()
        try:
            out.parts.extend(s.submit(request) for s in self._sources)
        except StudentError as exc:
            for f in out.parts:
                f.cancel()
            self._finish(out, exc=exc)
            return out
        when_all(out.parts, partial(self._answered, request, out))
        return out

    def _answered(self, request: SourceRequest, out: _Chained) -> None:
        if out.cancelled():
            return
        answers, weights, missing = [], [], None
        for f, w in zip(out.parts, self._weights):
            exc = StudentError(f"a member cancelled batch {request.batch_id}") if f.cancelled() else f.exception()
            if exc is None:
                answers.append(f.result())
                weights.append(w)
            elif isinstance(exc, FALL_THROUGH):
                missing = exc
            else:
                self._finish(out, exc=exc)
                return
        if not answers:
            self._finish(out, exc=missing)
            return
        try:
            self._finish(out, mean_answers(answers, weights))
        except StudentError as exc:
            self._finish(out, exc=exc)


def mean_answer(values: Sequence[TeacherValue], weights: Sequence[float], *, name: str = "") -> TeacherValue:
    """The weighted mean of several answers for one output (see :class:`EnsembleSource`)."""
    import torch

    from .outputs import dense_answer

    transforms = {getattr(v, "transform", "raw") for v in values}
    temps = {float(getattr(v, "temperature", 1.0)) for v in values}
    if len(transforms) != 1 or (transforms != {"raw"} and len(temps) != 1):
        raise ConfigError(f"cannot average output {name!r}: members answered with transforms {sorted(transforms)} "
                          f"and temperatures {sorted(temps)}; ask every member for the same OutputSpec")
    transform, temperature = transforms.pop(), temps.pop()
    top_k = max((v.k for v in values if isinstance(v, TopK)), default=0)
    if top_k and transform == "raw":
        raise ConfigError(f"cannot average raw top-k logits of output {name!r}; request probs or log_probs")
    dense = [v.dense() if isinstance(v, TopK) else v for v in values]
    shapes = {tuple(d.shape) for d in dense}
    if len(shapes) != 1:
        raise ConfigError(f"cannot average output {name!r}: members answered with shapes {sorted(shapes)}")
    x = torch.stack([d.float() for d in dense])  # (M, ...)
    w = torch.tensor(weights, dtype=torch.float32)
    w = (w / w.sum()).reshape(-1, *([1] * (x.dim() - 1)))  # (M, 1, ..., 1)
    if transform == "log_probs":
        mean = torch.logsumexp(x + w.log(), dim=0)
    else:
        mean = (w * x).sum(0)
    mean = mean.to(dense[0].dtype)
    if top_k:
        v, i = torch.topk(mean, top_k, dim=-1)
        return TopK(v, i, tuple(mean.shape), transform, temperature)
    return dense_answer(mean, transform, temperature)
