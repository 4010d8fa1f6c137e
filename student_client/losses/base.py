"""The loss protocol and weighted sums of losses.

A :class:`Loss` is an ``nn.Module`` that says which teacher outputs it needs
and is called on a batch::

    loss.needs                        # tuple[OutputSpec, ...]
    loss(student, teacher, labels=None)

``student`` is the student's logits tensor or a dict of named student
outputs; ``teacher`` is the reader's ``{name: answer}`` dict (a
:class:`~student_client.outputs.Dense` or :class:`~student_client.outputs.TopK`
per name). Losses add and scale into a :class:`WeightedLoss`, whose ``needs``
is the union of its terms' needs, so the reader can be told what to request
by the loss itself and each output is stated once::

    criterion = 0.9 * KDLoss(temperature=4.0) + 0.1 * CELoss()
    with DistillReader(loader, teachers=[...], outputs=criterion) as reader:
        for (x, y), teacher in reader:
            loss = criterion(student(x), teacher, labels=y)

Two terms that need the same output name with different specs cannot both be
served (one name is requested once): that is a :class:`ConfigError` when the
sum is built.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..outputs import OutputSpec, TeacherValue

__all__ = ["Loss", "OneOutputLoss", "WeightedLoss", "merge_needs", "student_output", "teacher_answer"]

class Loss(nn.Module):
    """Base class of the losses: ``needs`` plus ``forward(student, teacher, labels=None)``.

    Subclasses set what they need (a tuple of :class:`OutputSpec`; the
    default is nothing) and implement :meth:`forward`. ``w * loss``,
    ``loss * w`` and ``loss_a + loss_b`` build a :class:`WeightedLoss`;
    ``sum(losses)`` works too.
    """

    @property
    def needs(self) -> tuple[OutputSpec, ...]:
        """The teacher outputs this loss reads (what the reader must request)."""
        return ()

    def forward(self, student: Any, teacher: Mapping[str, TeacherValue] | None,
                labels: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        """The loss of one batch (a scalar unless a reduction says otherwise)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward()")

    def __mul__(self, weight: Any) -> "WeightedLoss":
        if not _is_number(weight):
            return NotImplemented
        return WeightedLoss([(weight * w, term) for w, term in _terms(self)])

    __rmul__ = __mul__

    def __add__(self, other: Any) -> "WeightedLoss":
        if not isinstance(other, Loss):
            return NotImplemented
        return WeightedLoss([*_terms(self), *_terms(other)])

    def __radd__(self, other: Any) -> "Loss":
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return self  # sum([a, b]) starts from 0
        return NotImplemented


class OneOutputLoss(Loss):
    """A loss that reads one teacher output, ``spec``, against one student output.

    ``student_output`` is the key of the student's output when the student
    returns a dict (default: the teacher output's name); ``needs`` is ``(spec,)``.
    """

    def __init__(self, spec: OutputSpec, student_output: str | None = None) -> None:
        super().__init__()
        self._spec = spec
        self.student_output = spec.name if student_output is None else student_output

    @property
    def needs(self) -> tuple[OutputSpec, ...]:
        """``(spec,)``: the one teacher output this loss reads."""
        return (self._spec,)


class WeightedLoss(Loss):
    """``Σ_i w_i · L_i``: a weighted sum of losses, which needs what its terms need.

    Args:
        terms: ``(weight, loss)`` pairs; weights are finite real numbers, the
            losses :class:`Loss` instances (sums are flattened).

    Raises:
        ConfigError: no terms, a bad weight or term, or two terms that need
            the same output name with different specs.
    """

    def __init__(self, terms: Iterable[tuple[float, Loss]]) -> None:
        super().__init__()
        flat: list[tuple[float, Loss]] = []
        for pair in terms:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ConfigError(f"WeightedLoss takes (weight, loss) pairs, got {pair!r}")
            weight, loss = pair
            if not _is_number(weight) or not math.isfinite(weight):
                raise ConfigError(f"a loss weight must be a finite real number, got {weight!r}")
            if not isinstance(loss, Loss):
                raise ConfigError(f"WeightedLoss terms must be student_client.losses.Loss instances, got "
                                  f"{type(loss).__name__}; subclass Loss (needs + forward)")
            flat.extend((float(weight) * w, term) for w, term in _terms(loss))
        if not flat:
            raise ConfigError("WeightedLoss needs at least one (weight, loss) term")
        self.weights = tuple(w for w, _ in flat)
        self.terms = nn.ModuleList(term for _, term in flat)
        self._needs = merge_needs(self.terms)  # validated now, not at the first batch

    @property
    def needs(self) -> tuple[OutputSpec, ...]:
        """The union of the terms' needs, in the order they first appear."""
        return self._needs

    def forward(self, student: Any, teacher: Mapping[str, TeacherValue] | None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_i w_i · L_i(student, teacher, labels)``."""
        total = None
        for w, term in zip(self.weights, self.terms):
            value = term(student, teacher, labels)
            total = w * value if total is None else total + w * value
        return total

    def extra_repr(self) -> str:
        """The weights, beside the terms ``nn.Module`` lists."""
        return f"weights={list(self.weights)}"


def merge_needs(losses: Sequence[Loss]) -> tuple[OutputSpec, ...]:
    """The union of ``losses``' needs; the same spec twice is requested once.

    Raises:
        ConfigError: two losses need one output name with different specs.
    """
    by_name: dict[str, tuple[OutputSpec, Loss]] = {}
    for loss in losses:
        for spec in loss.needs:
            seen = by_name.get(spec.name)
            if seen is None:
                by_name[spec.name] = (spec, loss)
            elif seen[0] != spec:
                raise ConfigError(
                    f"two losses need teacher output {spec.name!r} differently: {_short(seen[1])} needs "
                    f"{seen[0]} and {_short(loss)} needs {spec}; a name is requested once, so give both the "
                    "same transform, temperature, top_k and dtype")
    return tuple(spec for spec, _ in by_name.values())


def student_output(student: Any, name: str, loss: Loss) -> torch.Tensor:
    """The student tensor a loss reads: ``student`` itself, or ``student[name]`` from a dict."""
    if isinstance(student, Mapping):
        try:
            return student[name]
        except KeyError:
            raise ConfigError(f"{_short(loss)} reads student output {name!r}, but the student outputs are "
                              f"{', '.join(map(repr, student)) or 'empty'}; set student_output=") from None
    return student


def teacher_answer(teacher: Any, name: str, loss: Loss) -> Any:
    """The answer a loss reads: ``teacher[name]`` from the reader's dict, or ``teacher`` itself."""
    if isinstance(teacher, Mapping):
        try:
            return teacher[name]
        except KeyError:
            raise ConfigError(f"{_short(loss)} needs teacher output {name!r}, but the answers hold "
                              f"{', '.join(map(repr, teacher)) or 'nothing'}; pass outputs=<the loss> to the "
                              "reader so it requests what the loss needs") from None
    if teacher is None:
        raise ConfigError(f"{_short(loss)} needs teacher output {name!r}, got teacher=None")
    return teacher


def _terms(loss: Loss) -> list[tuple[float, Loss]]:
    if isinstance(loss, WeightedLoss):
        return list(zip(loss.weights, loss.terms))
    return [(1.0, loss)]


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _short(loss: Loss) -> str:
    return f"{type(loss).__name__}({loss.extra_repr()})"
