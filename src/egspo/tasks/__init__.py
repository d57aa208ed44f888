"""Built-in tasks by name, and prompt formatting.

    task = get_task("sudoku")
    rows = task.load(None, "train", n=100, seed=0, blanks=8)
    prompt = format_prompt(tokenizer, task.messages(rows[0]))

A task is registered with one line in ``_TASKS``: its name and the ``module:Class`` that implements
:class:`~egspo.tasks.base.Task`. Modules are imported on first use, so a task's optional dependencies
(math-verify, the code sandbox) load only when that task is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from egspo.tasks.base import SYSTEM_PROMPT, RewardFunction, Task

_TASKS: dict[str, str] = {
    "gsm8k": "egspo.tasks.math:GSM8KTask",
    "math500": "egspo.tasks.math:Math500Task",
    "countdown": "egspo.tasks.countdown:CountdownTask",
    "sudoku": "egspo.tasks.sudoku:SudokuTask",
    "humaneval": "egspo.tasks.code:HumanEvalTask",
    "mbpp": "egspo.tasks.code:MBPPTask",
    "kodcode": "egspo.tasks.code:KodCodeTask",
    "custom": "egspo.tasks.custom:CustomTask",
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)

__all__ = ["SYSTEM_PROMPT", "TASK_NAMES", "RewardFunction", "Task", "format_prompt", "get_task"]


def get_task(name: str) -> Task:
    """A new instance of the built-in task ``name`` (one of :data:`TASK_NAMES`)."""
    if name not in _TASKS:
        raise ValueError(f"Unknown task {name!r}; built-in tasks: {', '.join(TASK_NAMES)}.")
    module, _, cls = _TASKS[name].partition(":")
    task: Task = getattr(importlib.import_module(module), cls)()
    return task


def format_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text: the tokenizer's chat template with the generation prompt when it has one,
    else the message contents joined by blank lines ("system\\n\\nuser\\n")."""
    if getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text
    return "\n\n".join(message["content"] for message in messages) + "\n"
