"""Training and evaluation rows: a user's dataset or a built-in task's data, and the prompt of a row.

    rows = dataset_rows(train_dataset, "train_dataset")        # list of dicts, datasets.Dataset, IterableDataset
    check_prompts(rows, task, "train_dataset")
    text = prompt_text(tokenizer, row, task)

The prompt of a row follows TRL: a ``prompt`` column that is a string is used as it is; a ``prompt`` that
is a list of chat messages (``{"role", "content"}``) is formatted with the tokenizer's chat template (a
"conversational" dataset). Rows without a ``prompt`` column are a built-in task's rows: the task builds
their chat messages (``Task.messages``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from egspo.tasks import Task, format_prompt
from egspo.tasks.data import DataError

logger = logging.getLogger(__name__)

def dataset_rows(dataset: Any, name: str) -> list[dict[str, Any]]:
    """Rows as plain dicts from a list of dicts, a ``datasets.Dataset`` or an (iterable) dataset (read once)."""
    if isinstance(dataset, (str, bytes)) or not isinstance(dataset, Iterable):
        raise DataError(f"{name} must be a list of dicts or a datasets.Dataset, got {type(dataset).__name__}; "
                        "to read a file, set train_file / eval_file in the config instead.")
    rows = []
    for i, row in enumerate(dataset):
        if not isinstance(row, dict):
            raise DataError(f"{name}: row {i} is a {type(row).__name__}, not a dict of columns.")
        rows.append(dict(row))
    if not rows:
        raise DataError(f"{name} is empty.")
    return rows


def is_conversational(row: dict[str, Any]) -> bool:
    """Whether a row's ``prompt`` is a list of chat messages."""
    return isinstance(row.get("prompt"), list)


def check_prompts(rows: Sequence[dict[str, Any]], task: Task | None, name: str) -> None:
    """Every row has a usable prompt: a ``prompt`` string or message list, or (for a task) the task's columns."""
    kinds = set()
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if prompt is None:
            if task is None or task.name == "custom" or "question" not in row:
                needs = f" or the {task.name} task's columns (question, {', '.join(task.answer_fields)})" \
                    if task is not None and task.name != "custom" else ""
                raise DataError(f"{name}: row {i} has no 'prompt' column{needs}. Columns: {sorted(row)}.")
            kinds.add("task")
            continue
        if isinstance(prompt, str):
            if not prompt:
                raise DataError(f"{name}: row {i} has an empty 'prompt'.")
            kinds.add("text")
        elif isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            kinds.add("messages")
        else:
            raise DataError(f"{name}: row {i}'s 'prompt' is neither a string nor a list of "
                            f"{{'role': ..., 'content': ...}} messages: {prompt!r:.80}.")
    if len(kinds) > 1:
        raise DataError(f"{name} mixes prompt kinds ({', '.join(sorted(kinds))}): use one kind for every row.")


def prompt_text(tokenizer: Any, row: dict[str, Any], task: Task | None, for_eval: bool = False) -> str:
    """The text the model is prompted with for ``row`` (see the module docstring)."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return format_prompt(tokenizer, prompt)
    if task is None:
        raise DataError(f"A row without a 'prompt' column needs a task to build its prompt: {sorted(row)}.")
    return format_prompt(tokenizer, task.messages(row, for_eval=for_eval))


def reward_prompt(row: dict[str, Any], text: str) -> Any:
    """What reward functions get as the row's prompt: the dataset's own (text or messages), else the text."""
    return row.get("prompt", text)
