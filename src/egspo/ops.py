"""Small tensor operations on logits shared by the sampler and the losses.

They take logits of any float dtype and compute in float32 without keeping a float32 copy of the
full-vocabulary tensor alive longer than one expression.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

#: Float32 elements of one row chunk in :func:`token_logprobs` (64 MB).
LOGPROB_CHUNK_ELEMENTS = 1 << 24


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[token], computed and differentiated in row chunks.

    Forward keeps only the logits (no copy) and the per-row logsumexp; backward recomputes each
    chunk's softmax in float32 and writes the gradient in the logits' dtype. Peak extra memory is one
    chunk, instead of the float32 (N, V) copy and log-softmax that autograd would keep."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        flat, picks = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        chunk = max(1, LOGPROB_CHUNK_ELEMENTS // flat.shape[1])
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, flat.shape[0], chunk):
            rows = slice(start, start + chunk)
            x = flat[rows].float()
            lse[rows] = torch.logsumexp(x, dim=1)
            out[rows] = x.gather(1, picks[rows]).squeeze(1) - lse[rows]
        ctx.save_for_backward(logits, tokens, lse)
        return out.view(tokens.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, tokens, lse = ctx.saved_tensors
        flat, picks = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        g = grad.reshape(-1, 1).float()
        chunk = max(1, LOGPROB_CHUNK_ELEMENTS // flat.shape[1])
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], chunk):
            rows = slice(start, start + chunk)
            # d/dx [x_t - lse(x)] = onehot(t) - softmax(x)
            part = (flat[rows].float() - lse[rows, None]).exp_().mul_(-g[rows])
            out[rows] = part.scatter_add_(1, picks[rows], g[rows])
        return out.view_as(logits), None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in float32 for logits (..., V) and tokens (...).

    Computed in row chunks (see :class:`_TokenLogprobs`), so no float32 (..., V) tensor is made or
    kept for the backward pass."""
    return _TokenLogprobs.apply(logits, tokens)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both :func:`token_logprobs` and the entropy in nats of softmax(logits) over the last dimension, from one
    float32 log-softmax."""
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
