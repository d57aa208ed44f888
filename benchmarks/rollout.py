"""Rollout throughput of the block sampler (docs/algorithm.md#diffusion-mdp) on a random-weight LLaDA-shaped model.

    PYTHONPATH=src python benchmarks/rollout.py --shape llada-8b --batch 6 --prompt-len 200 \
        --gen-length 256 --block 32 --steps 128 [--cache prefix|dual] [--compile]

Prints one JSON object: seconds per rollout batch, sequences/s, forward passes/s, achieved TFLOP/s
counting the work as T full forwards (the issue's convention) and as actually computed (LM head only
where needed), model FLOP utilisation against the bf16 matmul peak, and peak extra memory.
``--cache prefix|dual`` times the APPROXIMATE KV-cached rollout (``SamplerConfig.cache``, a run's
``rollout_cache``); its "as T full forwards" figures still count T full forwards, so they read as an
effective rate, and "computed" counts the windows actually run. ``--compile`` sets
``SamplerConfig.compile`` (a run's ``compile_rollout``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import PEAK_TFLOPS, add_shape_arguments, forward_flops, param_counts, random_llada, timed  # noqa: E402

from egspo.config import SamplerConfig  # noqa: E402
from egspo.models.adapter import DiffusionLM  # noqa: E402
from egspo.sampling import sample  # noqa: E402


def computed_flops(dlm: DiffusionLM, batch: int, prompt_len: int, gen_length: int, block: int, steps: int,
                   cache: str) -> float:
    """FLOPs the sampler runs: the body over the positions each step forwards (the whole sequence, or a
    window against the cache: queries x all keys in attention), the LM head on the block and on the
    still-masked tail for the greedy completions (once per block in dual mode)."""
    cfg = dlm.core.config
    body, head = param_counts(dlm)
    body -= head
    length = prompt_len + gen_length
    per_block = steps // (gen_length // block)
    total = 0.0
    for t in range(steps):
        lo = prompt_len + (t // per_block) * block
        first = t % per_block == 0
        window = length if cache == "none" or first else (length - lo if cache == "prefix" else block)
        tail = length - lo - block if cache != "dual" or first else 0
        total += 2 * body * batch * window + 4 * cfg.n_layers * batch * window * length * cfg.d_model
        total += 2 * head * batch * (block + tail)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model forward (fixed shapes).")
    parser.add_argument("--cache", default="none", choices=["none", "prefix", "dual"],
                        help="rollout KV cache (prefix/dual are approximate)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dlm = random_llada(args.shape, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    vocab = dlm.core.config.vocab_size
    prompts = torch.randint(0, 120000 if vocab > 120000 else vocab - 10, (args.batch, args.prompt_len), device=device)
    cfg = SamplerConfig(gen_length=args.gen_length, block_length=args.block, steps=args.steps,
                        temperature=args.temperature, cache=args.cache, compile=args.compile)
    generator = torch.Generator(device=device).manual_seed(0)
    if args.compile:
        # one untimed full rollout compiles every shape the timed one meets (a prefix window per block)
        sample(dlm, prompts, cfg, generator=generator)
    else:
        # warm up kernels and the allocator on one block, then time the full rollout
        warm = SamplerConfig(gen_length=args.block, block_length=args.block, steps=cfg.steps_per_block,
                             temperature=args.temperature, cache=args.cache)
        sample(dlm, prompts, warm, generator=generator)
    seconds, traj = timed(lambda: sample(dlm, prompts, cfg, generator=generator), device, repeat=args.repeat,
                          warmup=0)
    length = args.prompt_len + args.gen_length
    nominal = args.steps * forward_flops(dlm, args.batch, length)
    actual = computed_flops(dlm, args.batch, args.prompt_len, args.gen_length, args.block, args.steps, args.cache)
    result = {
        "benchmark": "rollout",
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch, "prompt_len": args.prompt_len, "gen_length": args.gen_length,
        "block": args.block, "steps": args.steps, "compile": args.compile, "cache": args.cache,
        "seconds": round(seconds, 4),
        "sequences_per_s": round(args.batch / seconds, 3),
        "forwards_per_s": round(args.steps / seconds, 3),
        "tflops_as_T_full_forwards": round(nominal / seconds / 1e12, 2),
        "tflops_computed": round(actual / seconds / 1e12, 2),
        "mfu_as_T_full_forwards": round(nominal / seconds / 1e12 / PEAK_TFLOPS[device.type], 4),
        "trajectory_bytes": sum(v.numel() * v.element_size() for v in vars(traj).values()
                                if isinstance(v, torch.Tensor)),
    }
    if device.type == "cuda":
        result["peak_extra_memory_gb"] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**30, 3)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
