"""Each optimization of issue #8 measured before/after, at the paper's shapes, on random weights.

    PYTHONPATH=src python benchmarks/optimizations.py --shape llada-8b [--cases head logprobs ...] [--out F]

One JSON line per case: seconds and peak extra memory (CUDA) of the naive way ("before", the way the
published code does it) and of ours ("after"), and a check that both give the same answer. Cases:

- ``head``: one rollout forward of B x (prompt + completion) tokens with the LM head on every position
  (B, L, V) against only the current block's positions (``logits_positions``).
- ``logprobs``: log-probabilities of the sampled tokens at the completion positions, forward and
  backward from bf16 logits: ``log_softmax(logits.float())`` then gather (a float32 (B, P, V) copy
  and its log-softmax kept for backward) against :func:`egspo.ops.token_logprobs` (row chunks,
  softmax recomputed in the backward pass).
- ``greedy``: the one-step greedy completion of the still-masked tail of B rollouts: full (B, P, V)
  logits then argmax against the sampler's chunked head (``_greedy_tokens``).
- ``per_row``: choosing the tokens to commit at one denoising step: a Python loop over rows with
  ``topk`` per row (as in the published samplers) against one batched ``topk`` + scatter; per step,
  so multiply by T for a rollout.
- ``attention``: one forward with PyTorch's math attention (``SDPBackend.MATH``, what an explicit
  softmax(QK^T)V costs) against SDPA's fused kernels.
- ``grad_ckpt``: forward + backward of full fine-tuning (every weight trainable, no optimizer) on
  B x L tokens without and with gradient checkpointing.
``torch.compile`` is measured on whole rollouts by ``benchmarks/rollout.py --compile``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import add_shape_arguments, random_llada, timed
from torch.nn.attention import SDPBackend, sdpa_kernel

from egspo.models.adapter import DiffusionLM
from egspo.models.lora import enable_gradient_checkpointing
from egspo.ops import token_logprobs
from egspo.sampling import _greedy_tokens, _top_n

logger = logging.getLogger("optimizations")
CASES = ("head", "logprobs", "greedy", "per_row", "attention", "grad_ckpt")


def measure(fn: Callable[[], Any], device: torch.device, repeat: int) -> tuple[float, float | None, Any]:
    """(best seconds, peak GB above what was allocated before (CUDA only), last output)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds, out = timed(fn, device, repeat=repeat)
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if device.type == "cuda" else None
    return seconds, peak, out


def inputs(dlm: DiffusionLM, batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = dlm.core.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), device=device, generator=torch.Generator(device).manual_seed(0))
    return ids, torch.ones_like(ids)


def case_head(dlm, args, device) -> dict:
    ids, mask = inputs(dlm, args.batch, args.prompt_len + args.gen_length, device)
    block = torch.arange(args.prompt_len, args.prompt_len + args.block, device=device)
    with torch.no_grad():
        before = measure(lambda: dlm.logits(ids, mask)[:, block], device, args.repeat)
        after = measure(lambda: dlm.logits(ids, mask, positions=block), device, args.repeat)
    same = torch.equal(before[2].argmax(-1), after[2].argmax(-1))
    return report("head", before, after, same, "full (B, L, V) logits", "head on the block's positions only")


def case_logprobs(dlm, args, device) -> dict:
    vocab = dlm.core.config.vocab_size
    gen = torch.Generator(device).manual_seed(1)
    logits = torch.randn(args.batch, args.gen_length, vocab, device=device, dtype=dlm.core.dtype, generator=gen)
    tokens = torch.randint(0, vocab, logits.shape[:2], device=device, generator=gen)

    def run(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            leaf = logits.detach().requires_grad_(True)
            out = fn(leaf)
            out.sum().backward()
            return out.detach()
        return step

    naive = run(lambda x: torch.log_softmax(x.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    before = measure(naive, device, args.repeat)
    after = measure(run(lambda x: token_logprobs(x, tokens)), device, args.repeat)
    same = torch.allclose(before[2], after[2], atol=1e-3)
    return report("logprobs", before, after, same, "log_softmax(float) + gather",
                  "chunked, softmax recomputed in backward")


def case_greedy(dlm, args, device) -> dict:
    tail = args.gen_length - args.block
    d_model = dlm.core.config.d_model
    gen = torch.Generator(device).manual_seed(2)
    features = torch.randn(args.greedy_batch, tail, d_model, device=device, dtype=dlm.core.dtype, generator=gen)
    mask_id = dlm.mask_id

    def naive() -> torch.Tensor:
        logits = dlm.head(features).float()
        logits[..., mask_id] = float("-inf")
        return logits.argmax(-1)

    with torch.no_grad():
        before = measure(naive, device, args.repeat)
        after = measure(lambda: _greedy_tokens(dlm, features), device, args.repeat)
    same = bool((before[2] == after[2]).float().mean() > 0.999)  # bf16 ties may differ
    out = report("greedy", before, after, same, "full (B, P, V) float logits", "chunked head + argmax")
    out["batch"] = args.greedy_batch
    return out


def case_per_row(dlm, args, device) -> dict:
    length = args.prompt_len + args.gen_length
    gen = torch.Generator(device).manual_seed(3)
    scores = torch.rand(args.greedy_batch, length, device=device, generator=gen)
    scores[:, : args.prompt_len] = float("-inf")
    n = max(1, args.gen_length // args.steps)

    def loop() -> torch.Tensor:
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        for row in range(scores.shape[0]):
            chosen[row, torch.topk(scores[row], n).indices] = True
        return chosen

    before = measure(loop, device, args.repeat)
    after = measure(lambda: _top_n(scores, n), device, args.repeat)
    out = report("per_row", before, after, torch.equal(before[2], after[2]), "loop over rows", "batched topk")
    out["batch"] = args.greedy_batch
    return out


def case_attention(dlm, args, device) -> dict:
    ids, mask = inputs(dlm, args.batch, args.prompt_len + args.gen_length, device)
    block = torch.arange(args.prompt_len, args.prompt_len + args.block, device=device)

    def math() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            return dlm.logits(ids, mask, positions=block)

    with torch.no_grad():
        before = measure(math, device, args.repeat)
        after = measure(lambda: dlm.logits(ids, mask, positions=block), device, args.repeat)
    # bf16 kernels accumulate differently; with random weights the logits are nearly flat, so compare
    # values (relative to their spread) rather than argmaxes
    diff = float((before[2].float() - after[2].float()).abs().max() / after[2].float().std())
    out = report("attention", before, after, diff < 0.1, "math attention", "SDPA fused kernels")
    out["max_diff_over_std"] = round(diff, 4)
    return out


def case_grad_ckpt(dlm, args, device) -> dict:
    model = dlm.core
    ids, mask = inputs(dlm, args.batch, args.prompt_len + args.gen_length, device)
    positions = torch.arange(args.prompt_len, args.prompt_len + args.gen_length, device=device)
    model.train()
    model.requires_grad_(True)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        logits = dlm.logits(ids, mask, positions=positions)
        loss = token_logprobs(logits, ids[:, positions]).mean()
        loss.backward()
        return float(loss.detach())

    try:  # both peaks include the gradients (16 GB at 8B): no gradients held when each measure starts
        before = measure(step, device, args.repeat)
        model.zero_grad(set_to_none=True)
        enable_gradient_checkpointing(model)  # what gradient_checkpointing=true does
        after = measure(step, device, args.repeat)
    finally:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        model.eval()
    same = abs(before[2] - after[2]) < 1e-2
    return report("grad_ckpt", before, after, same, "stored activations", "gradient checkpointing")


def report(case: str, before: tuple, after: tuple, same: bool, how_before: str, how_after: str) -> dict:
    return {"case": case, "before": how_before, "after": how_after,
            "before_seconds": round(before[0], 5), "after_seconds": round(after[0], 5),
            "speedup": round(before[0] / after[0], 2) if after[0] > 0 else None,
            "before_peak_gb": None if before[1] is None else round(before[1], 3),
            "after_peak_gb": None if after[1] is None else round(after[1], 3), "same_result": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--greedy-batch", type=int, default=48, help="Rollouts for the greedy and per_row cases.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="Also append each JSON line to this file.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dlm = random_llada(args.shape, device, dtype)
    meta = {"benchmark": "optimizations", "shape": args.shape, "device": torch.cuda.get_device_name()
            if device.type == "cuda" else "cpu", "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
            "prompt_len": args.prompt_len, "gen_length": args.gen_length, "block": args.block}
    for case in args.cases:
        logger.info("case %s", case)
        line = json.dumps({**meta, **globals()[f"case_{case}"](dlm, args, device)})
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if args.out:
            with Path(args.out).open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
