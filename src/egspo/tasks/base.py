"""The task interface: data rows, prompts, reward functions and the evaluation metric.

A task turns data rows (plain dicts: a question plus ground-truth columns) into prompts, and scores
completions with reward functions in the TRL signature ``fn(prompts, completions, **columns) ->
list[float | None]`` (``columns`` are the rows' fields, one list per field). Each reward function has a
weight and says whether it measures correctness (the step rewards of EGSPO-SA may use only those).

Accuracy has two protocols (:data:`PROTOCOLS`): ``default``, our own reading of answers
(:meth:`Task.metrics`), and ``reference``, the published d1 evaluation parser's decisions
(:meth:`Task.reference_metrics`, see :mod:`egspo.tasks.reference`), for comparing with published numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from egspo.tasks.data import get_field

RewardFn = Callable[..., Sequence[float | None]]

SYSTEM_PROMPT = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)


def chat(question: str, system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The two-message prompt every built-in task uses."""
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def format_completion(reasoning: str, answer: str) -> str:
    """A completion in the requested format (what the strict format reward accepts)."""
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"


#: Accuracy protocols: our own answer reading, and the published d1 evaluation parser's.
PROTOCOLS = ("default", "reference")
#: (right, out of) for one completion: (1, 1) or (0, 1) for all-or-nothing tasks, cells for Sudoku.
Parts = tuple[int, int]


def percent_full(scores: Sequence[float | None]) -> float:
    """Percent of rows whose correctness score is full (1.0): the accuracy of all-or-nothing tasks."""
    return 100.0 * sum(score is not None and score >= 1.0 - 1e-9 for score in scores) / max(len(scores), 1)


def pooled_percent(parts: Sequence[Parts]) -> float:
    """100 * total right / total out of: d1's accuracy (per problem, or per empty cell for Sudoku)."""
    return 100.0 * sum(right for right, _ in parts) / max(sum(out_of for _, out_of in parts), 1)


def reject_options(task: Task, options: dict[str, Any]) -> None:
    """TypeError naming ``options``: keywords that ``task.load`` does not take (loaders report it as a
    config error, as for any other bad task option)."""
    if options:
        names = ", ".join(repr(name) for name in sorted(options))
        raise TypeError(f"{type(task).__name__}.load() got unexpected keyword argument(s) {names}")


def check_protocol(protocol: str) -> str:
    """``protocol`` itself when it is one of :data:`PROTOCOLS`; ValueError naming them otherwise."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown scoring protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}.")
    return protocol


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
        ``ValueError`` naming the file and line; an option the task does not take raises ``TypeError``
        (:func:`reject_options`).
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
        """Evaluation metrics over completions; must include ``accuracy`` in percent (default protocol)."""

    def reference_parts(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[Parts] | None:
        """(right, out of) per completion as the published evaluation parser decides; None when the task
        has no published parser (its reference protocol is then the default one)."""
        return None

    def reference_metrics(
        self, completions: Sequence[str], rows: Sequence[dict[str, Any]]
    ) -> dict[str, float] | None:
        """Metrics under the reference protocol (``accuracy`` pooled as d1 does); None without one."""
        parts = self.reference_parts(completions, rows)
        return None if parts is None else {"accuracy": pooled_percent(parts)}


def protocol_metrics(
    task: Task, completions: Sequence[str], rows: Sequence[dict[str, Any]], protocol: str = "default"
) -> dict[str, float]:
    """The task's metrics under ``protocol`` (see :data:`PROTOCOLS`)."""
    if check_protocol(protocol) == "reference":
        reference = task.reference_metrics(completions, rows)
        if reference is not None:
            return reference
    return task.metrics(completions, rows)


def side_by_side_metrics(
    task: Task, completions: Sequence[str], rows: Sequence[dict[str, Any]], primary: str = "default"
) -> dict[str, float]:
    """Both protocols' metrics: ``primary``'s under their names (``accuracy``), the other's with its
    name appended (``accuracy_reference`` or ``accuracy_default``)."""
    default = task.metrics(completions, rows)
    reference = task.reference_metrics(completions, rows)
    by_protocol = {"default": default, "reference": default if reference is None else reference}
    (other,) = [p for p in PROTOCOLS if p != check_protocol(primary)]
    return {**by_protocol[primary], **{f"{key}_{other}": value for key, value in by_protocol[other].items()}}
