"""Step selection (docs/algorithm.md#step-selection): which K of a rollout's T denoising steps the update trains on.

    selected = select_steps(traj.step_entropy, k=8, method="high_entropy", valid_steps=traj.valid_steps)
    selected.steps    # (B, K) step indices, ascending in time
    selected.weights  # (B, K) 1.0 real selection, 0.0 padding

Every method works on the whole batch at once (sort / gather / masking); rows differ. A step is a
*candidate* when ``valid_steps`` allows it and, with ``stop_at_last_content``, it is at or before the
row's ``last_content_step``. A row with fewer candidates than slots takes all of them and pads the rest
with weight 0; padded slots repeat the row's last real step (or step 0 for a row without candidates), so
``steps`` stays non-decreasing and always indexes inside [0, T).

Ties in entropy are broken towards the earlier step (stable sort), for ``high_entropy`` and ``adaptive``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SELECTION_METHODS = ("high_entropy", "random", "uniform", "adaptive")


@dataclass
class SelectedSteps:
    """The selected steps of a rollout batch; slot k of every row feeds micro-batch k."""

    steps: torch.Tensor  # (B, K) long, ascending in time; padding repeats the last real step
    weights: torch.Tensor  # (B, K) float, 1 = real selection, 0 = padding


def _candidate_steps(
    num_steps: int,
    valid_steps: torch.Tensor | None,
    last_content_step: torch.Tensor | None,
    stop_at_last_content: bool,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """(B, T) bool: steps that may be selected."""
    cand = torch.ones(batch_size, num_steps, dtype=torch.bool, device=device)
    if valid_steps is not None:
        cand = cand & valid_steps.to(device=device, dtype=torch.bool)
    if stop_at_last_content:
        if last_content_step is None:
            raise ValueError("stop_at_last_content=True needs last_content_step (B,) from the trajectory.")
        t = torch.arange(num_steps, device=device)
        cand = cand & (t[None, :] <= last_content_step.to(device).view(-1, 1))
    return cand


def select_steps(
    step_entropy: torch.Tensor,
    k: int,
    method: str = "high_entropy",
    *,
    valid_steps: torch.Tensor | None = None,
    last_content_step: torch.Tensor | None = None,
    stop_at_last_content: bool = False,
    alpha: float = 0.7,
    generator: torch.Generator | None = None,
    k_max_reduce: Callable[[int], int] | None = None,
    as_published: bool = False,
) -> SelectedSteps:
    """Pick K steps per rollout from ``step_entropy`` (B, T).

    Methods: ``high_entropy`` (the K largest entropies), ``random`` (K distinct candidates drawn with
    ``generator``, required: the global RNG is never used), ``uniform`` (K candidates evenly spaced
    over the row's candidate list, first and last included), ``adaptive`` (per row the smallest K_i whose
    top-K_i entropies reach ``alpha`` times the row's total candidate entropy, capped at ``k``; the
    output width is max_i K_i, or ``k_max_reduce(max_i K_i)`` when given so that every process runs the
    same number of micro-batches).

    ``as_published`` gives ``random`` and ``uniform`` the published code's behaviour (an ablation of the
    ablation, docs/algorithm.md#deliberate-differences-from-the-published-code): the same steps for every
    row, always including the last step T-1; ``random`` draws the other K-1 with replacement from
    [0, T-1), ``uniform`` spaces K steps evenly over [0, T-1]. Candidates (``valid_steps``,
    ``stop_at_last_content``) are ignored there, as they were.
    """
    if step_entropy.dim() != 2:
        raise ValueError(f"step_entropy must be (B, T), got shape {tuple(step_entropy.shape)}.")
    if method not in SELECTION_METHODS:
        raise ValueError(f"Unknown step selection {method!r}; choose one of {', '.join(SELECTION_METHODS)}.")
    batch, num_steps = step_entropy.shape
    if not 1 <= k <= num_steps:
        raise ValueError(f"k={k} selected steps must be in [1, T={num_steps}].")
    device = step_entropy.device
    cand = _candidate_steps(num_steps, valid_steps, last_content_step, stop_at_last_content, batch, device)
    num_cand = cand.sum(-1)

    # Candidates first, by entropy descending; stable so equal entropies keep time order.
    masked_entropy = torch.where(cand, step_entropy.float(), float("-inf"))
    by_entropy = torch.sort(masked_entropy, dim=-1, descending=True, stable=True).indices

    if as_published and method in ("random", "uniform"):
        chosen = _as_published(method, num_steps, k, batch, generator, device)
        num_real = torch.full((batch,), k, dtype=torch.long, device=device)
    elif method == "high_entropy":
        chosen = by_entropy[:, :k]
        num_real = num_cand.clamp(max=k)
    elif method == "random":
        if generator is None:
            raise ValueError("step selection 'random' needs a torch.Generator (the global RNG is never used).")
        noise = torch.rand(batch, num_steps, generator=generator, device=generator.device).to(device)
        chosen = torch.sort(torch.where(cand, noise, -1.0), dim=-1, descending=True).indices[:, :k]
        num_real = num_cand.clamp(max=k)
    elif method == "uniform":
        chosen, num_real = _uniform(cand, num_cand, k)
    else:
        chosen, num_real = _adaptive(masked_entropy, by_entropy, cand, num_cand, k, alpha, k_max_reduce)

    return _to_time_order(chosen, num_real, num_steps)


def _as_published(method: str, num_steps: int, k: int, batch: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """(B, K) the published code's random/uniform steps: one set for the whole batch, ending at T-1."""
    if method == "uniform":
        steps = torch.linspace(0, num_steps - 1, k, device=device).round().long()
    else:
        if generator is None:
            raise ValueError("step selection 'random' needs a torch.Generator (the global RNG is never used).")
        draws = torch.randint(0, max(num_steps - 1, 1), (k - 1,), generator=generator, device=generator.device)
        steps = torch.cat([draws.to(device), torch.tensor([num_steps - 1], device=device)])
    return steps.expand(batch, -1).contiguous()


def _uniform(cand: torch.Tensor, num_cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K evenly spaced entries of each row's candidate list (linspace over list positions, rounded)."""
    batch, num_steps = cand.shape
    t = torch.arange(num_steps, device=cand.device)
    # Candidate step indices in time order first, non-candidates after.
    cand_in_time = torch.sort(torch.where(cand, t, t + num_steps), dim=-1).indices
    i = torch.arange(k, device=cand.device, dtype=torch.float64)
    span = (num_cand.double() - 1).clamp(min=0).view(-1, 1)
    # When there are at least K candidates the spacing (n-1)/(K-1) >= 1, so rounded positions are distinct.
    spaced = torch.floor(i * span / max(k - 1, 1) + 0.5).long()
    take_all = torch.arange(k, device=cand.device).expand(batch, -1)
    pos = torch.where((num_cand >= k).view(-1, 1), spaced, take_all).clamp(max=num_steps - 1)
    return cand_in_time.gather(-1, pos), num_cand.clamp(max=k)


def _adaptive(
    masked_entropy: torch.Tensor,
    by_entropy: torch.Tensor,
    cand: torch.Tensor,
    num_cand: torch.Tensor,
    k_max: int,
    alpha: float,
    k_max_reduce: Callable[[int], int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row smallest K_i reaching ``alpha`` of the entropy mass; width agreed across processes."""
    if not 0 < alpha <= 1:
        raise ValueError(f"adaptive alpha={alpha} must be in (0, 1].")
    sorted_entropy = masked_entropy.gather(-1, by_entropy)
    sorted_entropy = torch.where(cand.gather(-1, by_entropy), sorted_entropy, 0.0).double()
    mass = sorted_entropy.cumsum(-1)
    total = mass[:, -1:]
    # A relative slack so that rounding in the cumsum cannot push an exact hit to the next step.
    threshold = alpha * total * (1 - 1e-9)
    k_row = (mass < threshold).sum(-1) + 1
    num_real = torch.minimum(k_row.clamp(max=k_max), num_cand)
    # At least one slot, so a batch without candidates still has a (fully padded) micro-batch shape.
    width = max(int(num_real.max().item()) if num_real.numel() else 0, 1)
    if k_max_reduce is not None:
        agreed = int(k_max_reduce(width))
        if not width <= agreed <= k_max:
            raise ValueError(
                f"k_max_reduce returned {agreed}, outside [{width}, {k_max}]: it must be the max over processes "
                "of the local adaptive K (an all-reduce max)."
            )
        width = agreed
    logger.debug("adaptive selection: K_i mean %.2f, width %d", num_real.float().mean().item(), width)
    return by_entropy[:, :width], num_real


def _to_time_order(chosen: torch.Tensor, num_real: torch.Tensor, num_steps: int) -> SelectedSteps:
    """Sort each row's real selections by time, pad the tail with the last real step, weight 0."""
    width = chosen.shape[1]
    slot = torch.arange(width, device=chosen.device)
    real = slot[None, :] < num_real.view(-1, 1)
    steps = torch.sort(torch.where(real, chosen, num_steps), dim=-1).values
    last_real = steps.gather(-1, (num_real - 1).clamp(min=0).view(-1, 1))
    # A row with no candidate has no real step: repeat step 0, always in range.
    last_real = torch.where(last_real < num_steps, last_real, 0)
    steps = torch.where(real, steps, last_real)
    return SelectedSteps(steps=steps, weights=real.float())
