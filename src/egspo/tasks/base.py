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

RewardFn = Callable[..., list[float | None]]

SYSTEM_PROMPT = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)


@dataclass(frozen=True)
class RewardFunction:
    """One reward function of a task, with its weight in the total reward."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    correctness: bool = False


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

    @abstractmethod
    def messages(self, row: dict[str, Any], for_eval: bool = False) -> list[dict[str, str]]:
        """The chat messages of the prompt for one row (see :func:`egspo.tasks.format_prompt`)."""

    @abstractmethod
    def reward_functions(self) -> list[RewardFunction]:
        """The task's reward functions with their reference weights."""

    @abstractmethod
    def metrics(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Evaluation metrics over completions; must include ``accuracy`` in percent (reference protocol)."""
