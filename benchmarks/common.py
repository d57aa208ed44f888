"""Shared pieces of the benchmark scripts: model shapes, random-weight models, FLOP counts, timing."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from egspo.models.adapter import DiffusionLM
from egspo.models.llada import LLaDAConfig, LLaDAModelLM

#: LLaDA-8B-Instruct's shape (from its published config.json).
LLADA_8B = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                vocab_size=126464, embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0,
                rms_norm_eps=1e-5, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081)
SHAPES: dict[str, dict[str, Any]] = {
    "llada-8b": LLADA_8B,
    "small": dict(LLADA_8B, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1536),
    "tiny": dict(LLADA_8B, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768),
}

#: Dense bf16 peak of an H100 SXM measured by a plain matmul here (docs/benchmarks.md).
PEAK_TFLOPS = {"cuda": 797.0, "cpu": float("nan")}


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The model shape, rollout shape (the paper's settings by default) and device options."""
    parser.add_argument("--shape", default="tiny", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=6, help="Rollouts in a forward (the paper's per-device 6).")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def random_llada(shape: str, device: torch.device, dtype: torch.dtype) -> DiffusionLM:
    """A LLaDA-shaped model with random weights built directly on ``device`` in ``dtype``."""
    config = LLaDAConfig(**SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype: 8B fp32 would need 32 GB
    try:
        with torch.device(device):
            model = LLaDAModelLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return DiffusionLM(model=model, mask_id=config.mask_token_id, stop_ids=(config.eos_token_id,), native=True)


def param_counts(dlm: DiffusionLM) -> tuple[int, int]:
    """(non-embedding parameters incl. the LM head, LM head parameters)."""
    core = dlm.core
    total = sum(p.numel() for p in core.parameters())
    emb = core.get_input_embeddings().weight.numel()
    head = core.get_output_embeddings().weight.numel()
    return total - emb, head


def forward_flops(dlm: DiffusionLM, batch: int, length: int, head_positions: int | None = None) -> float:
    """FLOPs of one forward over (batch, length) tokens; ``head_positions`` per row if the head is sliced."""
    cfg = dlm.core.config
    body, head = param_counts(dlm)
    body -= head
    head_rows = length if head_positions is None else head_positions
    attention = 4 * cfg.n_layers * batch * length * length * cfg.d_model
    return 2 * body * batch * length + 2 * head * batch * head_rows + attention


def timed(fn: Callable[[], Any], device: torch.device, repeat: int = 1, warmup: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls after ``warmup`` calls, synchronising CUDA."""
    out = None
    for _ in range(warmup):
        out = fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out
