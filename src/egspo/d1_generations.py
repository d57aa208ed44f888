"""Reading the generations files written by d1's evaluation script, for ``egspo score``.

d1 (dllm-reasoning/d1, ``eval/eval.py``) saves one JSON file per process, named
``{dataset}_{model}_{gen_length}_{steps}_{rank}_generations.json``:

    {"generations": [{"question": ..., "prompt_input": ..., "generations": "<completion>",
                      "ground_truth": ...}, ...],
     "metrics": {"wall_time": ..., "total_processed": ...}, "model_path": ..., "checkpoint_path": ...,
     "gen_length": 256, "diffusion_steps": 128, "block_length": 32}

``ground_truth`` is, per dataset: ``gsm8k`` a float (null where d1 could not read the answer: its
``#### N`` pattern has no minus sign), ``math`` the MATH-500 answer string, ``countdown``
``[numbers, target]``, ``sudoku`` the solution string (the puzzle is in the question,
``"Solve the following Sudoku puzzle: <16 digits>"``). Completions were decoded with special tokens.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from egspo.tasks.base import Task
from egspo.tasks.data import DataError, FieldError, get_field

logger = logging.getLogger(__name__)

#: d1's dataset names (file name prefixes) -> our task names.
D1_DATASETS = {"gsm8k": "gsm8k", "math": "math500", "countdown": "countdown", "sudoku": "sudoku"}
#: The GSM8K answer of an item whose ground truth d1 lost: a number nothing equals, under both protocols.
UNKNOWN_ANSWER = "nan"


def is_d1_generations(path: str | Path) -> bool:
    """Whether ``path`` is a d1 generations file: a ``.json`` object with a ``generations`` list."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with path.open(encoding="utf-8") as handle:
        if handle.read(64).lstrip()[:1] != "{":  # a JSON list is one of our own data files
            return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and isinstance(data.get("generations"), list)


def read_d1_generations(
    task: Task, path: str | Path
) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """(input fields, completions, ground-truth rows) of a d1 generations file, for ``task``.

    The input fields are the item's own (``question``, ``ground_truth``, ...) with ``completion`` in place
    of ``generations``. Raises :class:`DataError` naming the item and field when one is malformed.
    """
    path = Path(path)
    prefix = path.name.split("_", 1)[0]
    if D1_DATASETS.get(prefix, task.name) != task.name:
        raise DataError(f"{path} is a d1 {prefix!r} generations file: score it with --task {D1_DATASETS[prefix]}.")
    items = json.loads(path.read_text(encoding="utf-8"))["generations"]
    inputs, completions, rows = [], [], []
    unknown = 0
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise FieldError("generations", f"items must be JSON objects, got {type(item).__name__}")
            completion = get_field(item, "generations")
            if not isinstance(completion, str):
                raise FieldError("generations", f"must be a string, got {completion!r}")
            row = _truth(task, item)
        except FieldError as exc:
            raise DataError(f"{path} item {index}: {exc}") from None
        unknown += row.get("answer") == UNKNOWN_ANSWER
        fields = {key: value for key, value in item.items() if key != "generations"}
        inputs.append({**fields, "completion": completion})
        completions.append(completion)
        rows.append(row)
    if unknown:
        logger.warning("%s: %d item(s) have no ground truth (d1 reads GSM8K's '#### N' without a minus sign, so "
                       "negative answers are lost); they count as wrong under both protocols, as in d1.", path, unknown)
    return inputs, completions, rows


def _truth(task: Task, item: dict[str, Any]) -> dict[str, Any]:
    """The task's ground-truth row of one d1 item."""
    truth = item.get("ground_truth")
    if task.name == "gsm8k":
        if truth is None:
            return {"answer": UNKNOWN_ANSWER}
        if isinstance(truth, bool) or not isinstance(truth, (int, float)):
            raise FieldError("ground_truth", f"must be a number or null for gsm8k, got {truth!r}")
        # integral floats as integers; others as their shortest round-tripping text
        return {"answer": str(int(truth)) if float(truth).is_integer() else repr(float(truth))}
    if task.name == "math500":
        if not isinstance(truth, str) or not truth.strip():
            raise FieldError("ground_truth", f"must be the answer string for math500, got {truth!r}")
        return {"answer": truth}  # verbatim: d1 compares the unstripped string when normalising fails
    if task.name == "countdown":
        if isinstance(truth, list) and len(truth) == 2:
            return task.parse_truth({"numbers": truth[0], "target": truth[1]})
        return task.parse_truth(_countdown_from_question(str(item.get("question", ""))))
    if task.name == "sudoku":
        return task.parse_truth({"puzzle": _sudoku_puzzle(str(item.get("question", ""))), "solution": truth})
    raise DataError(f"d1 generations files hold {', '.join(sorted(D1_DATASETS))} items; task {task.name!r} has none.")


def _countdown_from_question(question: str) -> dict[str, Any]:
    """d1's fallback when ``ground_truth`` is not ``[numbers, target]``: "Numbers: [a, b]" and "Target: t"."""
    numbers = re.search(r"Numbers: \[([\d, ]+)\]", question, re.IGNORECASE)
    target = re.search(r"Target: (\d+)", question, re.IGNORECASE)
    if numbers is None or target is None:
        raise FieldError("ground_truth", "must be [numbers, target] (or the question must state them)")
    return {"numbers": numbers.group(1), "target": target.group(1)}


def _sudoku_puzzle(question: str) -> str:
    """The puzzle as d1 reads it: the question's first 16 characters when they are digits, else the 16
    digits after "Sudoku puzzle: "."""
    if len(question) >= 16 and question[:16].isdigit():
        return question[:16]
    match = re.search(r"Sudoku puzzle: ([0-9]{16})", question)
    if match is None:
        raise FieldError("question", "has no 16-digit Sudoku puzzle")
    return match.group(1)
