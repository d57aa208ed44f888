"""Scoring finished completions with a task, outside training (``egspo score``).

Rewards are computed exactly as in training (:class:`egspo.rl.rewards.RewardScorer`: the task's reward
functions and weights); accuracy comes from the task's metrics under a scoring protocol:
``default`` (our answer reading, :meth:`Task.metrics`) or ``reference`` (the published d1 evaluation
parser's decisions, :mod:`egspo.tasks.reference`), see :data:`egspo.tasks.base.PROTOCOLS`.

    scores = score_completions(get_task("sudoku"), completions, rows, protocol="reference")
    scores.summary()
    # {"accuracy": ..., "puzzle_accuracy": ..., "protocol": ..., "n": ..., "rewards": {...}, "total": ...}

A completion counts as ``correct`` under ``default`` when every correctness reward function gives its
full value 1 (never for a task without correctness functions), under ``reference`` when d1's parser
counts it right (Sudoku: every empty cell). Input files are our JSONL (or JSON list) of ``completion``
plus the task's fields, or d1's own generations files (:mod:`egspo.d1_generations`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from egspo.d1_generations import is_d1_generations, read_d1_generations
from egspo.rl.rewards import RewardScorer
from egspo.tasks.base import Task, check_protocol, protocol_metrics
from egspo.tasks.data import DataError, FieldError, convert_records, read_records

#: Completions scored per reward-function call; the progress bar advances by these.
CHUNK = 64


@dataclass(frozen=True)
class Scores:
    """Rewards of a list of completions."""

    rewards: dict[str, list[float | None]]  # per reward function (unweighted), per completion; None: no reward
    total: list[float]  # weighted sum per completion
    correct: list[bool]
    metrics: dict[str, float]  # the protocol's task metrics: accuracy in percent, ...
    protocol: str = "default"

    def summary(self) -> dict[str, Any]:
        """Task metrics, the protocol, ``n``, mean reward per function and the mean weighted total."""
        return {
            **self.metrics,
            "protocol": self.protocol,
            "n": len(self.total),
            "rewards": {name: _mean([v for v in values if v is not None]) for name, values in self.rewards.items()},
            "total": _mean(self.total),
        }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_completions(
    task: Task,
    completions: Sequence[str],
    rows: Sequence[dict[str, Any]],
    prompts: Sequence[str] | None = None,
    *,
    protocol: str = "default",
    progress: bool = False,
) -> Scores:
    """Score ``completions`` against their ground-truth ``rows`` (the task's row fields).

    ``protocol`` decides ``correct`` and the metrics (see the module docstring). ``progress`` shows a
    bar on stderr (rows/s, percent correct so far) when it is a terminal and there is more than a chunk.
    """
    check_protocol(protocol)
    prompts = list(prompts) if prompts is not None else [""] * len(completions)
    scorer = RewardScorer.for_task(task)
    rewards: dict[str, list[float | None]] = {function.name: [] for function in scorer.functions}
    total: list[float] = []
    correct: list[bool] = []
    bar = tqdm(total=len(completions), desc=f"egspo score {task.name}", unit="row", dynamic_ncols=True,
               disable=None if progress and len(completions) > CHUNK else True)
    with bar:
        for start in range(0, len(completions), CHUNK):
            span = slice(start, start + CHUNK)
            chunk_total, per_function = scorer.score(prompts[span], completions[span], rows[span])
            chunk_rewards = {function.name: [None if math.isnan(v) else v for v in per_function[:, j].tolist()]
                             for j, function in enumerate(scorer.functions)}
            for name, values in chunk_rewards.items():
                rewards[name].extend(values)
            total.extend(chunk_total.tolist())
            correct.extend(_correct(task, scorer, completions[span], rows[span], chunk_rewards, protocol))
            bar.update(len(chunk_total))
            bar.set_postfix(correct=f"{100.0 * sum(correct) / len(correct):.1f}%")
    return Scores(rewards, total, correct, protocol_metrics(task, completions, rows, protocol), protocol)


def _correct(
    task: Task, scorer: RewardScorer, completions: Sequence[str], rows: Sequence[dict[str, Any]],
    rewards: dict[str, list[float | None]], protocol: str,
) -> list[bool]:
    """Per completion: right under ``protocol`` (default: every correctness reward full)."""
    if protocol == "reference":
        parts = task.reference_parts(completions, rows)
        if parts is not None:
            return [out_of > 0 and right == out_of for right, out_of in parts]
    correctness = [rewards[f.name] for f in scorer.functions if f.correctness]
    return [bool(correctness) and all((v := values[i]) is not None and v >= 1.0 - 1e-9 for values in correctness)
            for i in range(len(completions))]


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


def score_file(
    task: Task,
    input_path: str | Path | Sequence[str | Path],
    output_path: str | Path | None = None,
    *,
    protocol: str = "default",
    progress: bool = False,
) -> dict[str, Any]:
    """Score one or several input files together (our jsonl, see :func:`read_scoring_input`, or d1
    generations files, e.g. the per-process files of one d1 run); write per-line results to
    ``output_path``. Returns :meth:`Scores.summary`."""
    paths = [input_path] if isinstance(input_path, (str, Path)) else list(input_path)
    inputs: list[dict[str, Any]] = []
    completions: list[str] = []
    rows: list[dict[str, Any]] = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"Input file {path} does not exist.")
        read = read_d1_generations if is_d1_generations(path) else read_scoring_input
        file_inputs, file_completions, file_rows = read(task, path)
        inputs += file_inputs
        completions += file_completions
        rows += file_rows
    if not completions:
        raise DataError(f"{', '.join(map(str, paths))}: nothing to score.")
    scores = score_completions(task, completions, rows, protocol=protocol, progress=progress)
    if output_path is not None:
        with Path(output_path).open("w", encoding="utf-8") as handle:
            for i, fields in enumerate(inputs):
                rewards = {name: values[i] for name, values in scores.rewards.items()}
                result = {**fields, "rewards": rewards, "total": scores.total[i], "correct": scores.correct[i]}
                handle.write(json.dumps(result) + "\n")
    return scores.summary()
