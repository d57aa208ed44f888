"""The EGSPO step loss and the diffu-GRPO (d1) token loss (docs/algorithm.md#egspo-loss, #diffu-grpo), as pure
tensor functions.

Masking convention: rows or tokens that must not contribute (padded selections, tokens after the first
EOS) are removed with ``torch.where`` on the *inputs* and on the result, never by multiplying with 0,
so inf/NaN values there give neither a NaN loss nor a NaN gradient (their gradient is exactly 0).

Denominators:
- :func:`egspo_step_loss` divides by the micro-batch's number of rows B, padded rows included ("mean
  over rollouts": padding drops a rollout's term without reweighting the others, so a rollout's
  contribution does not depend on how many other rollouts were padded at that slot).
- :func:`diffu_grpo_loss` divides by the number of valid completion tokens in the micro-batch (d1's
  token mean).

Stats are detached 0-dim tensors (no device sync here; the trainer reduces and logs them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def clipped_surrogate(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped objective as a loss: ``-min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A)``, ρ = exp(logp - logp_old).

    Returns the elementwise loss and a bool tensor marking where the clip is active (the clipped term
    is the smaller one: ρ < 1-ε_low with A < 0, or ρ > 1+ε_high with A > 0).
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    is_clipped = ((ratio < 1.0 - eps_low) & (advantages < 0)) | ((ratio > 1.0 + eps_high) & (advantages > 0))
    return -torch.minimum(unclipped, clipped), is_clipped


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref) from sampled log-probs: exp(ref-cur) - (ref-cur) - 1."""
    diff = logp_ref - logp
    return torch.exp(diff) - diff - 1.0


def kl_exact(logits: torch.Tensor, ref_logits: torch.Tensor, valid: torch.Tensor, aggregation: str = "sum"
             ) -> torch.Tensor:
    """(B,) exact KL(π_θ || π_ref) summed over the vocabulary, then summed (or, with ``aggregation="mean"``,
    averaged: the scale of mean step log-probs) over the ``valid`` (B, P) positions.

    ``logits`` / ``ref_logits`` are (B, P, V) at the committed positions only; computed in float32.
    """
    keep = valid.unsqueeze(-1)
    # Zero the logits of padded positions first: garbage there must not reach the gradient.
    logq = torch.log_softmax(torch.where(keep, logits.float(), 0.0), dim=-1)
    logr = torch.log_softmax(torch.where(keep, ref_logits.float(), 0.0), dim=-1)
    per_position = (logq.exp() * (logq - logr)).sum(-1)
    total = torch.where(valid, per_position, 0.0).sum(-1)
    return total / valid.sum(-1).clamp_min(1) if aggregation == "mean" else total


def egspo_step_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor | None,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    num_tokens: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    aggregation: str = "sum",
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of ONE selected-step slot of a micro-batch; every argument is (B,) except the options.

    ``logp`` is log π_θ(a|s) of the row's action at that step (sum over its committed tokens, or their
    mean with ``aggregation="mean"``), ``logp_old`` the value recorded at rollout time, ``logp_ref`` the
    reference policy's (may be None when ``beta == 0`` or when ``kl`` is given). ``kl``, when given, is
    the per-row exact KL (:func:`kl_exact`, aggregated like ``logp``) used instead of k3.

    Per row: term = surrogate + β·KL, divided by ``num_tokens`` (tokens committed at the step) when
    ``aggregation="sum"``. Loss = Σ_rows w·term / B, rows with weight 0 contributing exactly 0.
    Stats over weighted rows: ``clip_fraction``, ``kl`` (mean, before the token division), ``ratio``.
    """
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"aggregation={aggregation!r} must be 'sum' or 'mean'.")
    use_kl = beta != 0
    if use_kl and kl is None and logp_ref is None:
        raise ValueError("beta > 0 needs logp_ref (k3 estimator) or kl (exact KL) for the KL term.")
    real = weights > 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Sanitize padded rows before any arithmetic: their values may be inf/NaN.
    cur = torch.where(real, logp, zero)
    old = torch.where(real, logp_old.to(cur.dtype), zero)
    adv = torch.where(real, advantages.to(cur.dtype), zero)

    surrogate, is_clipped = clipped_surrogate(cur, old, adv, eps_low, eps_high)
    if kl is not None:
        kl_term = torch.where(real, kl.to(cur.dtype), zero)
    elif logp_ref is not None:
        kl_term = kl_k3(cur, torch.where(real, logp_ref.to(cur.dtype), zero))
    else:
        kl_term = torch.zeros_like(cur)
    term = surrogate + beta * kl_term if use_kl else surrogate
    if aggregation == "sum":
        term = term / torch.where(real, num_tokens.to(cur.dtype), 1.0).clamp(min=1.0)
    w = torch.where(real, weights.to(cur.dtype), zero)
    loss = torch.where(real, w * term, zero).sum() / logp.shape[0]

    with torch.no_grad():
        n_real = real.sum().clamp(min=1).to(torch.float32)
        stats = {
            "clip_fraction": (is_clipped & real).sum().float() / n_real,
            "kl": torch.where(real, kl_term.detach().float(), 0.0).sum() / n_real,
            "ratio": torch.where(real, (cur - old).detach().float().exp(), 0.0).sum() / n_real,
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------------
# diffu-GRPO (d1)


def diffu_grpo_masked_inputs(
    input_ids: torch.Tensor,
    prompt_length: int,
    *,
    mask_id: int,
    p_mask_prompt: float,
    seed: int,
    prompt_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """d1's one-pass log-prob estimator input: (B, L) ids with every completion token masked and each
    prompt token masked independently with probability ``p_mask_prompt``.

    The prompt mask comes from a fresh ``torch.Generator`` seeded with ``seed`` on the inputs' device
    (the global RNG is untouched), so old, reference and current log-probs of one iteration see the same
    mask. Prompt padding (``prompt_attention_mask`` == 0, given as (B, L_p) or (B, L)) is never masked.
    """
    batch, length = input_ids.shape
    if not 0 <= prompt_length <= length:
        raise ValueError(f"prompt_length={prompt_length} is outside [0, {length}].")
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    draws = torch.rand(batch, prompt_length, generator=generator, device=input_ids.device)
    mask_prompt = draws < p_mask_prompt
    if prompt_attention_mask is not None:
        mask_prompt = mask_prompt & prompt_attention_mask[:, :prompt_length].bool()
    mask_completion = torch.ones(batch, length - prompt_length, dtype=torch.bool, device=input_ids.device)
    is_masked = torch.cat([mask_prompt, mask_completion], dim=1)
    return torch.where(is_masked, torch.full_like(input_ids, mask_id), input_ids)


def completion_token_mask(completion_ids: torch.Tensor, stop_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(B, L_c) bool: tokens up to and including the first stop token of each row (all if none)."""
    stops = torch.as_tensor(stop_ids, dtype=completion_ids.dtype, device=completion_ids.device)
    is_stop = torch.isin(completion_ids, stops).long()
    stops_before = is_stop.cumsum(-1) - is_stop
    return stops_before == 0


def diffu_grpo_loss(
    per_token_logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    token_mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """d1 loss: per-token PPO clip to [1 - eps_low, 1 + eps_high] (d1: 0.5 both) + β·k3 KL, averaged over the
    valid tokens of the batch.

    ``per_token_logp`` / ``old_logp`` / ``ref_logp`` are (B, L_c) log-probs of the completion tokens
    under the masked estimator, ``advantages`` (B,), ``token_mask`` (B, L_c) bool
    (:func:`completion_token_mask`). ``ref_logp`` may be None when ``beta == 0``.
    """
    if beta != 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp for the k3 KL term.")
    valid = token_mask.bool()
    zero = torch.zeros((), dtype=per_token_logp.dtype, device=per_token_logp.device)
    cur = torch.where(valid, per_token_logp, zero)
    old = torch.where(valid, old_logp.to(cur.dtype), zero)
    adv = torch.where(valid, advantages.to(cur.dtype).view(-1, 1), zero)
    surrogate, is_clipped = clipped_surrogate(cur, old, adv, eps_low, eps_high)
    if ref_logp is not None:
        kl = kl_k3(cur, torch.where(valid, ref_logp.to(cur.dtype), zero))
    else:
        kl = torch.zeros_like(cur)
    term = surrogate + beta * kl if beta != 0 else surrogate
    n_valid = valid.sum().clamp(min=1)
    loss = torch.where(valid, term, zero).sum() / n_valid

    with torch.no_grad():
        n = n_valid.float()
        stats = {
            "clip_fraction": (is_clipped & valid).sum().float() / n,
            "kl": torch.where(valid, kl.float(), 0.0).sum() / n,
            "ratio": torch.where(valid, (cur - old).float().exp(), 0.0).sum() / n,
        }
    return loss, stats
