"""Small tensor operations on logits shared by the sampler and the losses.

They take logits of any float dtype and compute in float32 without keeping a float32 copy of the
full-vocabulary tensor alive longer than one expression.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for logits (..., V) and tokens (...): gather minus logsumexp."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both :func:`token_logprobs` and :func:`entropy` from one float32 log-softmax."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return picked, ent


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(logits / temperature) by Gumbel-max; temperature 0 gives argmax.

    Uses the exponential-race form argmax(p / E), E ~ Exp(1), which equals Gumbel-max on logits / T.
    """
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    noise = torch.empty_like(scaled).exponential_(generator=generator)
    # log p - log E is Gumbel-max up to a shared constant per row
    return (scaled - noise.log()).argmax(-1)
