"""Prompt batches for RL: a deterministic, resumable stream of prompt groups, and prompt tokenization.

The prompts of step ``s`` depend only on (seed, s), so a resumed run sees exactly the prompts it
would have seen, and every process computes the same global batch and takes its own slice of rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from egspo.seeding import stream

logger = logging.getLogger(__name__)


@dataclass
class PromptStream:
    """Epoch-wise shuffled prompts; ``batch(step)`` returns the rows of one global step."""

    rows: Sequence[dict[str, Any]]
    prompts_per_step: int
    seed: int

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("The training data is empty.")

    def batch(self, step: int) -> list[dict[str, Any]]:
        n = len(self.rows)
        out: list[dict[str, Any]] = []
        start = step * self.prompts_per_step
        for index in range(start, start + self.prompts_per_step):
            epoch, offset = divmod(index, n)
            out.append(self.rows[int(self._order(epoch)[offset])])
        return out

    def _order(self, epoch: int) -> torch.Tensor:
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != epoch:
            generator = stream("prompt_order", self.seed, epoch)
            cached = (epoch, torch.randperm(len(self.rows), generator=generator))
            self._cache = cached
        return cached[1]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention mask); prompts over ``max_length`` tokens keep their end (warned)."""
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    too_long = sum(len(e) > max_length for e in encoded)
    if too_long:
        logger.warning("%d prompt(s) longer than max_prompt_length=%d tokens were left-truncated.",
                       too_long, max_length)
    encoded = [e[-max_length:] for e in encoded]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        if e:
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
    return ids.to(device), mask.to(device)
