"""Log-probabilities of actions under a model: the forward passes of the two objectives.

- :func:`action_logps` (EGSPO): log π(a_t | s_t) for one selected step per row, one batched forward
  over the rebuilt states with the LM head only at the committed positions.
- :func:`masked_completion_logps` (diffu-GRPO): per-token log-probs of the completion with every
  completion token and a seeded random share of the prompt masked.
"""

from __future__ import annotations

from typing import Any

import torch

from egspo.models.adapter import DiffusionLM, gather_positions
from egspo.ops import token_logprobs
from egspo.rl.losses import diffu_grpo_masked_inputs
from egspo.sampling import greedy_tokens
from egspo.trajectory import Trajectory


def action_logps(
    dlm: DiffusionLM,
    traj: Trajectory,
    steps: torch.Tensor,
    *,
    aggregation: str = "sum",
    model: Any = None,
    with_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp (N,), tokens committed (N,), valid (N, P), logits (N, P, V) or None) at ``steps`` (N,)."""
    states = traj.states(steps)
    positions, tokens, valid = traj.actions(steps)
    logits = dlm.logits(states, traj.attention_mask, positions, model=model)
    per_token = token_logprobs(logits, tokens)
    logp = torch.where(valid, per_token, torch.zeros_like(per_token)).sum(1)
    num_tokens = valid.sum(1).clamp_min(1)
    if aggregation == "mean":
        logp = logp / num_tokens
    return logp, num_tokens, valid, logits if with_logits else None


def exact_step_outputs(
    dlm: DiffusionLM, traj: Trajectory, steps: torch.Tensor, model: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One exact forward per state s_t, ``steps`` (N,): the step log-prob (sum over the committed tokens,
    (N,)) and the one-step greedy completion x0|t (N, L_c): argmax (mask excluded) at every position still
    masked in s_t, committed tokens kept (docs/algorithm.md#approximate-rollouts)."""
    states = traj.states(steps)
    features = dlm.encode(states, traj.attention_mask, model=model)
    positions, tokens, valid = traj.actions(steps)
    per_token = token_logprobs(dlm.head(gather_positions(features, positions)), tokens)
    logp = torch.where(valid, per_token, torch.zeros_like(per_token)).sum(1)
    completion = states[:, traj.prompt_length:]
    greedy = greedy_tokens(dlm, features[:, traj.prompt_length:])
    return logp, torch.where(completion == dlm.mask_id, greedy, completion)


def masked_completion_logps(
    dlm: DiffusionLM, traj: Trajectory, seed: int, p_mask_prompt: float, model: Any = None
) -> torch.Tensor:
    """(B, L_c) log-probs of the completion tokens under the diffu-GRPO masking of ``seed``."""
    masked = diffu_grpo_masked_inputs(
        traj.sequences, traj.prompt_length, mask_id=dlm.mask_id, p_mask_prompt=p_mask_prompt, seed=seed,
        prompt_attention_mask=traj.attention_mask[:, : traj.prompt_length],
    )
    positions = torch.arange(traj.prompt_length, traj.sequences.shape[1], device=traj.sequences.device)
    logits = dlm.logits(masked, traj.attention_mask, positions, model=model)
    return token_logprobs(logits, traj.completions)
