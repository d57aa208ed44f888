"""The task interface: data rows, prompts, reward functions and the evaluation metric.

A task turns data rows (plain dicts: a question plus ground-truth columns) into prompts, and scores
completions with reward functions in the TRL signature ``fn(prompts, completions, **columns) ->
list[float | None]`` (``columns`` are the rows' fields, one list per field). Each reward function has a
weight and says whether it measures correctness (the step rewards of EGSPO-SA may use only those).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from egspo.tasks.data import get_field

RewardFn = Callable[..., list[float | None]]

SYSTEM_PROMPT = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)


def chat(question: str, system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The two-message prompt every built-in task uses."""
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def format_completion(reasoning: str, answer: str) -> str:
    """A completion in the requested format (what the strict format reward accepts)."""
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"


def percent_full(scores: Sequence[float | None]) -> float:
    """Percent of rows whose correctness score is full (1.0): the accuracy of all-or-nothing tasks."""
    return 100.0 * sum(score is not None and score >= 1.0 - 1e-9 for score in scores) / max(len(scores), 1)


@dataclass(frozen=True)
class RewardFunction:
    """One reward function of a task, with its weight in the total reward."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    correctness: bool = False
    #: A task's own function: always called with completion texts (user functions get the prompts' form).
    builtin: bool = True


class Task(ABC):
    """A built-in task. Subclasses set ``name`` and ``answer_fields`` and implement the methods."""

    name: str
    #: Ground-truth columns a data row must have (besides the question), e.g. ("puzzle", "solution").
    answer_fields: tuple[str, ...] = ()

    @abstractmethod
    def load(self, source: str | None, split: str, n: int, seed: int, **options: Any) -> list[dict[str, Any]]:
        """Data rows from a local file / hub name (``source``) or, when None, from the task's generator.

        ``split`` is "train" or "test" (generators use disjoint seeds for them). Malformed rows raise
        ``ValueError`` naming the file and line.
        """

    def parse_truth(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The ground-truth columns of one raw row, checked and normalised (``egspo score`` input, files).

        Raises :class:`egspo.tasks.data.FieldError` naming the missing or bad field. This default only
        checks that every ``answer_fields`` column is present.
        """
        return {name: get_field(fields, name) for name in self.answer_fields}

    def reference_completion(self, row: dict[str, Any]) -> str | None:
        """A correct completion of the row for supervised warm-up (``egspo sft``), None when unknown."""
        return None

    @abstractmethod
    def messages(self, row: dict[str, Any], for_eval: bool = False) -> list[dict[str, str]]:
        """The chat messages of the prompt for one row (see :func:`egspo.tasks.format_prompt`)."""

    @abstractmethod
    def reward_functions(self) -> list[RewardFunction]:
        """The task's reward functions with their reference weights."""

    @abstractmethod
    def metrics(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Evaluation metrics over completions; must include ``accuracy`` in percent (reference protocol)."""
