"""Logit operations: the chunked log-prob gather matches autograd's log-softmax, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from egspo import ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 100, 1 << 24])  # one row, several rows, everything per chunk
def test_token_logprobs_matches_log_softmax_gather(monkeypatch, dtype, chunk_elements):
    monkeypatch.setattr(ops, "LOGPROB_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50, generator=gen)).to(dtype)
    tokens = torch.randint(0, 50, (3, 7), generator=gen)
    weights = torch.randn(3, 7, generator=gen)

    ours = logits.clone().requires_grad_(True)
    reference = logits.clone().requires_grad_(True)
    got = ops.token_logprobs(ours, tokens)
    want = torch.log_softmax(reference.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert ours.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.grad.float(), reference.grad.float(), **tol)


def test_token_logprobs_works_without_grad_and_on_views():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 11, generator=gen)
    tokens = torch.randint(0, 11, (2, 9), generator=gen)
    view, view_tokens = logits[:, ::2], tokens[:, ::2]  # non-contiguous
    want = torch.log_softmax(view, -1).gather(-1, view_tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(ops.token_logprobs(view, view_tokens), want)
