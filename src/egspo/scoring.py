"""Scoring finished completions with a task, outside training (``egspo score``).

Rewards are computed exactly as in training (:class:`egspo.rl.rewards.RewardScorer`: the task's reward
functions and weights); accuracy comes from ``task.metrics`` (the reference protocol of each task).

    scores = score_completions(get_task("sudoku"), completions, rows)
    scores.summary()   # {"accuracy": ..., "puzzle_accuracy": ..., "n": ..., "rewards": {...}, "total": ...}

A completion counts as ``correct`` when every correctness reward function gives its full value 1 (never
for a task without correctness functions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egspo.rl.rewards import RewardScorer
from egspo.tasks.base import Task
from egspo.tasks.data import DataError, FieldError, convert_records, read_records


@dataclass(frozen=True)
class Scores:
    """Rewards of a list of completions."""

    rewards: dict[str, list[float | None]]  # per reward function (unweighted), per completion; None: no reward
    total: list[float]  # weighted sum per completion
    correct: list[bool]
    metrics: dict[str, float]  # task.metrics: accuracy in percent, ...

    def summary(self) -> dict[str, Any]:
        """Task metrics, ``n``, mean reward per function and the mean weighted total."""
        return {
            **self.metrics,
            "n": len(self.total),
            "rewards": {name: _mean([v for v in values if v is not None]) for name, values in self.rewards.items()},
            "total": _mean(self.total),
        }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_completions(
    task: Task, completions: Sequence[str], rows: Sequence[dict[str, Any]], prompts: Sequence[str] | None = None
) -> Scores:
    """Score ``completions`` against their ground-truth ``rows`` (the task's row fields)."""
    scorer = RewardScorer.for_task(task)
    total, per_function = scorer.score(prompts if prompts is not None else [""] * len(completions), completions, rows)
    rewards: dict[str, list[float | None]] = {
        function.name: [None if math.isnan(v) else v for v in per_function[:, j].tolist()]
        for j, function in enumerate(scorer.functions)
    }
    correctness = [rewards[f.name] for f in scorer.functions if f.correctness]
    correct = [bool(correctness) and all(values[i] is not None and values[i] >= 1.0 - 1e-9 for values in correctness)
               for i in range(len(completions))]
    return Scores(rewards, total.tolist(), correct, task.metrics(completions, rows))


def read_scoring_input(task: Task, path: str | Path) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """(input lines, completions, ground-truth rows) of a jsonl file of ``completion`` + the task's fields."""

    def convert(fields: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any]]:
        completion = fields.get("completion")
        if completion is None:
            raise FieldError("completion", "is missing")
        if not isinstance(completion, str):
            raise FieldError("completion", f"must be a string, got {completion!r}")
        return fields, completion, task.parse_truth(fields)

    lines = convert_records(read_records(str(path)), convert)
    if not lines:
        raise DataError(f"{path} has no lines to score.")
    return [line[0] for line in lines], [line[1] for line in lines], [line[2] for line in lines]


def score_file(task: Task, input_path: str | Path, output_path: str | Path | None = None) -> dict[str, Any]:
    """Score a jsonl file (see :func:`read_scoring_input`); write per-line results to ``output_path``."""
    if not Path(input_path).is_file():
        raise DataError(f"Input file {input_path} does not exist.")
    inputs, completions, rows = read_scoring_input(task, input_path)
    scores = score_completions(task, completions, rows)
    if output_path is not None:
        with Path(output_path).open("w", encoding="utf-8") as handle:
            for i, fields in enumerate(inputs):
                rewards = {name: values[i] for name, values in scores.rewards.items()}
                result = {**fields, "rewards": rewards, "total": scores.total[i], "correct": scores.correct[i]}
                handle.write(json.dumps(result) + "\n")
    return scores.summary()
