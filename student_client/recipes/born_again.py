"""Born-again networks: generation g+1, the same architecture, learns from generation g.

Reference: T. Furlanello, Z. C. Lipton, M. Tschannen, L. Itti, A. Anandkumar,
"Born-Again Neural Networks", ICML 2018, arXiv:1805.04770.

Generation 0 trains on the labels; generation ``g+1`` (a fresh model of the
same architecture) minimises ``loss(student, teacher, y)``, by default
``KD_T(z_{g+1}, z_g) + CE(z_{g+1}, y)`` with T=1 (the paper's BAN trains on
the teacher's outputs; adding the labels is its common variant; pass
``loss=KDLoss(temperature=1.0)`` for the teacher alone). The teacher reaches
the student through an ordinary source, so a generation can be:

* ``teacher="in-process"``: an :class:`~student_client.sources.InProcessTeacher`
  over a frozen copy (the default);
* ``teacher="service"``: a real teacher server (a
  :class:`~teacher_server.inprocess.BackgroundTeacher` on loopback) and a
  :class:`~student_client.pool.TeacherPool`, exactly what a remote teacher is;
* ``teacher="cache"``: generation g's answers recorded once over
  ``record_loader`` (:func:`~student_client.recording.record`, by sample key)
  into ``cache_dir/generation-g``, then read back by a
  :class:`~student_client.cache.CachedTeacher` (no teacher runs while g+1 trains);
* any callable ``(model_g, g) -> KnowledgeSource``.

Usage (one loop for every generation; generation 0's source answers ``{}``)::

    with BornAgain(lambda g: mlp(), generations=3, inputs=[("x", "float32", (64,))]) as ban:
        for gen in ban:
            opt = torch.optim.SGD(gen.model.parameters(), lr=0.1)
            with DistillReader(loader, gen.source) as reader:
                for epoch in range(E):
                    for (x, y), teacher in reader:
                        loss = gen.loss(gen.model(x), teacher, y)
                        opt.zero_grad(); loss.backward(); opt.step()
        final = gen.model
"""

from __future__ import annotations

import copy
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import ConfigError
from ..losses import CELoss, KDLoss, Loss
from ..sources import InProcessTeacher, KnowledgeSource, SourceRequest, check_request

__all__ = ["BornAgain", "Generation"]


class _NoTeacher(KnowledgeSource):
    """Generation 0's source: every batch answered ``{}`` at once."""

    def submit(self, request: SourceRequest) -> "Future[dict]":
        check_request(request)
        fut: Future = Future()
        fut.set_result({})
        return fut

    def close(self) -> None:
        pass


@dataclass
class Generation:
    """One generation: its fresh ``model``, the ``source`` of its teacher's answers, and its ``loss``."""

    index: int
    model: Any
    source: KnowledgeSource
    loss: Loss
    _closers: list = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Close the teacher's source (and its server, for ``teacher="service"``)."""
        for close in self._closers:
            close()
        self._closers.clear()


class BornAgain:
    """Iterate generations of one architecture, each taught by the one before.

    Args:
        make_model: ``g -> nn.Module``, a fresh model for generation ``g``.
        generations: how many generations to train (>= 1; 1 is plain training).
        loss: the loss of generations >= 1 (a :class:`Loss`, whose ``needs``
            say what to ask the teacher for); default ``KDLoss(1.0) + CELoss()``.
        teacher: ``"in-process"``, ``"service"``, ``"cache"`` or ``callable(model, g) -> KnowledgeSource``.
        inputs: the models' input signature, for ``teacher="service"``
            (default ``model.edistill_inputs``).
        cache_dir / record_loader: for ``teacher="cache"``: where to record
            and the loader to record over (the training data: its sample keys
            must be the ones the training loader gives).

    A generation's teacher is the model the previous iteration yielded, frozen
    when the next generation is requested (so train it inside the loop body).
    """

    def __init__(self, make_model: Callable[[int], Any], generations: int, *, loss: Loss | None = None,
                 teacher: str | Callable[[Any, int], KnowledgeSource] = "in-process", inputs: Any = None,
                 cache_dir: Any = None, record_loader: Any = None) -> None:
        if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
            raise ConfigError(f"generations must be an int >= 1, got {generations!r}")
        if not (callable(teacher) or teacher in ("in-process", "service", "cache")):
            raise ConfigError(f"teacher must be 'in-process', 'service', 'cache' or a callable(model, g) -> source, "
                              f"got {teacher!r}")
        if teacher == "cache" and (cache_dir is None or record_loader is None):
            raise ConfigError("teacher='cache' records each generation's answers: pass cache_dir= (a directory) "
                              "and record_loader= (a loader over the training data)")
        self._cache_dir, self._record_loader = cache_dir, record_loader
        self._make = make_model
        self.generations = generations
        self.loss = loss if loss is not None else KDLoss(temperature=1.0) + CELoss()
        self._teacher = teacher
        self._inputs = inputs
        self._current: Generation | None = None

    def __iter__(self) -> Iterator[Generation]:
        previous = None
        for g in range(self.generations):
            if self._current is not None:
                self._current.close()
            model = self._make(g)
            if previous is None:
                self._current = Generation(0, model, _NoTeacher(), CELoss())
            else:
                self._current = self._taught_by(previous, model, g)
            yield self._current
            previous = self._current.model

    def _taught_by(self, teacher_model: Any, model: Any, g: int) -> Generation:
        frozen = copy.deepcopy(teacher_model).eval()  # the teacher stops changing here
        closers: list = []  # the server's close, for teacher="service"
        if callable(self._teacher):
            source = self._teacher(frozen, g - 1)
        elif self._teacher == "in-process":
            source = InProcessTeacher(frozen, self.loss)
        elif self._teacher == "cache":
            source = self._recorded(frozen, g - 1)
        else:
            from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig

            from ..pool import TeacherPool

            inputs = self._inputs if self._inputs is not None else getattr(frozen, "edistill_inputs", None)
            if inputs is None:
                raise ConfigError("teacher='service' serves each generation and needs the input signature: "
                                  "pass inputs=[('x', 'float32', (features,))] or set model.edistill_inputs")
            server = BackgroundTeacher(TeacherConfig(model_name=f"born-again-g{g - 1}", model_version=str(g - 1)),
                                       LoadedModel.from_module(frozen, inputs)).start()
            closers.append(server.close)
            source = TeacherPool([server.address], self.loss)
            source.wait_for_teachers(1, timeout_s=30.0)
        return Generation(g, model, source, self.loss, [source.close, *closers])

    def _recorded(self, frozen: Any, g: int) -> KnowledgeSource:
        """Record generation ``g``'s answers over ``record_loader``; the cache that holds them."""
        import pathlib

        from ..cache import CachedTeacher, TeacherInfo
        from ..recording import record

        directory = pathlib.Path(self._cache_dir) / f"generation-{g}"
        with InProcessTeacher(frozen, self.loss) as live:
            record(self._record_loader, live, directory, teacher=TeacherInfo(f"born-again-g{g}", str(g)))
        return CachedTeacher(directory, outputs=self.loss, model_version=str(g))

    def close(self) -> None:
        """Close the last generation's teacher."""
        if self._current is not None:
            self._current.close()

    def __enter__(self) -> "BornAgain":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
