"""``custom``: a user's prompts with the user's own reward functions.

Rows come from ``train_file`` (jsonl/json/csv/parquet or a hub dataset) and need a ``prompt`` field
(a string, used as it is, or a list of chat messages); every other field is passed to the reward
functions as a column (TRL signature). Rewards come from ``reward_funcs`` (``module:function``).
There is no accuracy protocol: the metrics report rewards only.

    task: custom
    train_file: prompts.jsonl
    reward_funcs: ["my_rewards:exact_match"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from egspo.tasks.base import RewardFunction, Task
from egspo.tasks.data import FieldError, load_rows


def _row(fields: dict[str, Any]) -> dict[str, Any]:
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise FieldError("prompt", "is missing or not a non-empty string")
    return dict(fields)


class CustomTask(Task):
    name = "custom"
    answer_fields = ()

    def load(self, source: str | None, split: str, n: int, seed: int, **options: Any) -> list[dict[str, Any]]:
        if source is None:
            raise ValueError("task=custom needs train_file (rows with a 'prompt' field), or pass train_dataset= "
                             "to EGSPOTrainer.")
        if options:
            raise ValueError(f"task_options {sorted(options)} are not used by the custom task: set task_options={{}} "
                             "(on the command line: task_options={}).")
        return load_rows(source, split, _row)

    def messages(self, row: dict[str, Any], for_eval: bool = False) -> list[dict[str, str]]:
        return [{"role": "user", "content": row["prompt"]}]

    def reward_functions(self) -> list[RewardFunction]:
        return []  # all rewards come from reward_funcs

    def metrics(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        return {"accuracy": float("nan")}
