"""Group baselines and EGSPO-SA stepwise advantages (docs/algorithm.md#stepwise-advantages, #diffu-grpo).

Rows are ordered in groups: rows [g*G, (g+1)*G) are the G rollouts of prompt g. Groups may span
processes, so callers gather rewards across processes first and pass the global tensors here.

Std scaling divides by the unbiased group std plus ``eps`` (the TRL / d1 convention).

Centering of the stepwise returns is per selected *slot*: column k of ``greedy_rewards`` is the k-th
selected step of each rollout in time order (:class:`egspo.rl.selection.SelectedSteps`), and R_k is
centered over the group within that column. The published code centered per entropy rank instead (its
columns were ordered by rank), a defect this module does not reproduce.
"""

from __future__ import annotations

import torch


def _check_groups(rewards: torch.Tensor, group_size: int) -> int:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (B,), got shape {tuple(rewards.shape)}.")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards are not a whole number of groups of G={group_size}.")
    return rewards.shape[0] // group_size


def _group_center(
    values: torch.Tensor, group_size: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group and column: (values - group mean, group std), both (B, K), over rows where ``mask``.

    Masked-out entries are ignored in the statistics (their centered value is 0); a column with a single
    real row gets std 0.
    """
    batch, width = values.shape
    v = values.view(-1, group_size, width)
    m = torch.ones_like(v, dtype=torch.bool) if mask is None else mask.view(-1, group_size, width)
    v = torch.where(m, v, 0.0)
    count = m.sum(1, keepdim=True).to(v.dtype)
    mean = v.sum(1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(m, v - mean, 0.0)
    var = centered.square().sum(1, keepdim=True) / (count - 1).clamp(min=1)
    return centered.view(batch, width), var.sqrt().expand_as(v).reshape(batch, width)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """(B,) ``r - mean_group(r)``, divided by ``std_group(r) + eps`` when ``scale``."""
    _check_groups(rewards, group_size)
    centered, std = _group_center(rewards.float().view(-1, 1), group_size)
    if scale:
        centered = centered / (std + eps)
    return centered.view(-1)


def stepwise_advantages(
    rewards: torch.Tensor,
    greedy_rewards: torch.Tensor,
    group_size: int,
    lam: float,
    normalize_returns: bool = True,
    center_step_term: bool = True,
    scale_rewards: bool = False,
    *,
    weights: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """(B, K) EGSPO-SA advantages from final rewards ``r`` (B,) and greedy-completion rewards r̂ (B, K).

    With d_k = r - r̂_k and R_k = (r + λ d_k) / (1 + λ if ``normalize_returns``):

    - ``center_step_term`` (default): A_k = R_k - mean over the group of R_k, per slot k; with
      ``scale_rewards`` divided by that slot's group std + eps.
    - otherwise (the reference's "standard_grpo_returns"): A_k = ((r - mean_group r) + λ d_k) / (1 + λ if
      normalized); ``scale_rewards`` scales only the centered r part.

    ``weights`` (B, K), when given, marks padded slots (0): they are left out of the slot's group mean and
    std, their r̂ is never read (it may be NaN), and their advantage is exactly 0. Without weights every
    slot counts.
    """
    _check_groups(rewards, group_size)
    if greedy_rewards.dim() != 2 or greedy_rewards.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"greedy_rewards must be (B, K) with B={rewards.shape[0]}, got shape {tuple(greedy_rewards.shape)}."
        )
    if lam < 0:
        raise ValueError(f"lambda={lam} must be >= 0.")
    r = rewards.float().view(-1, 1)
    real = None if weights is None else weights > 0
    r_hat = greedy_rewards.float()
    if real is not None:
        r_hat = torch.where(real, r_hat, r)  # d = 0 on padding, whatever r̂ holds there
    step_term = lam * (r - r_hat)
    norm = 1.0 + lam if normalize_returns else 1.0

    if center_step_term:
        advantages, std = _group_center((r + step_term) / norm, group_size, real)
        if scale_rewards:
            advantages = advantages / (std + eps)
    else:
        sequence_term = group_advantages(rewards, group_size, scale=scale_rewards, eps=eps).view(-1, 1)
        advantages = (sequence_term + step_term) / norm
    if real is not None:
        advantages = torch.where(real, advantages, 0.0)
    return advantages


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> int:
    """Number of groups whose G rewards are all equal (no gradient from the sequence term)."""
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    return int((grouped.amax(-1) == grouped.amin(-1)).sum().item())
