"""Every random stream of a run, derived from (seed, purpose, index, process) in one place.

    generator = stream("rollout", seed, step, process, device=device)

A resumed run repeats an uninterrupted one because each stream depends only on these four numbers,
never on how many random numbers were drawn before. The coefficients are those the runs documented in
docs/results.md were made with, so those runs stay reproducible. Three purposes (prompt_order, eval,
sft_noise) share coefficients, so equal indices give equal seeds; each still gets its own generator.
"""

from __future__ import annotations

import torch

#: purpose -> (seed coefficient, index coefficient): the stream's seed is seed*a + index*b + process.
_STREAMS: dict[str, tuple[int, int]] = {
    "rollout": (1_000_003, 1009),     # the sampler of training rollout `index` (a step, or d1's slot)
    "selection": (7919, 31),          # random/uniform step selection of step `index`
    "mask_seeds": (104_729, 1),       # diffu-GRPO's mask seeds of generation cycle `index`
    "prompt_order": (1_000_003, 1),   # the shuffled prompt order of epoch `index`
    "eval": (1_000_003, 1),           # evaluation sampling of the batch starting at item `index`
    "sft_noise": (1_000_003, 1),      # SFT's mask ratios and masks of example offset `index`
    "sft_order": (1, 1),              # SFT's example order of epoch `index`
}


def stream_seed(purpose: str, seed: int, index: int, process: int = 0) -> int:
    """The seed of the ``purpose`` stream for ``index`` (a step, epoch or item) on ``process``."""
    a, b = _STREAMS[purpose]
    return seed * a + index * b + process


def stream(purpose: str, seed: int, index: int, process: int = 0,
           device: torch.device | str | None = None) -> torch.Generator:
    """A fresh generator for the ``purpose`` stream (see :func:`stream_seed`)."""
    return torch.Generator(device=device or "cpu").manual_seed(stream_seed(purpose, seed, index, process))
