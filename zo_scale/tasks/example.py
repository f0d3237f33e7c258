"""The data type every task produces and every trainer/evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass


class TaskDataError(ValueError):
    """A data row or task definition that cannot be turned into Examples; the message says where and why."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice question: the model should give the highest mean log-likelihood to
    continuations[label] after contexts[label]."""

    contexts: tuple[str, ...]  # one per option; equal strings when the options share one prompt
    continuations: tuple[str, ...]  # the scored text of each option, WITH its leading space, e.g. " great"
    label: int  # index of the correct option

    def __post_init__(self) -> None:
        # Accept any sequence but store tuples, so Examples stay hashable and immutable.
        object.__setattr__(self, "contexts", tuple(self.contexts))
        object.__setattr__(self, "continuations", tuple(self.continuations))
        n = len(self.continuations)
        if len(self.contexts) != n:
            raise ValueError(f"Example has {len(self.contexts)} contexts but {n} continuations")
        if n < 2:
            raise ValueError(f"Example needs at least 2 options, got {n}")
        for kind, texts in (("context", self.contexts), ("continuation", self.continuations)):
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise ValueError(f"Example {kind} {i} is {type(text).__name__}, not str")
        empty = [i for i, text in enumerate(self.continuations) if not text.strip()]
        if empty:
            raise ValueError(f"Example continuation(s) {empty} are empty")
        if isinstance(self.label, bool) or not isinstance(self.label, int):
            raise ValueError(f"Example label must be an int, got {self.label!r}")
        if not 0 <= self.label < n:
            raise ValueError(f"Example label {self.label} is out of range for {n} options")
