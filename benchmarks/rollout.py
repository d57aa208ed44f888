"""Rollout throughput of the block sampler (SPEC §1) on a random-weight LLaDA-shaped model.

    PYTHONPATH=src python benchmarks/rollout.py --shape llada-8b --batch 6 --prompt-len 200 \
        --gen-length 256 --block 32 --steps 128

Prints one JSON object: seconds per rollout batch, sequences/s, forward passes/s, achieved TFLOP/s
counting the work as T full forwards (the issue's convention) and as actually computed (LM head only
where needed), model FLOP utilisation against the bf16 matmul peak, and peak extra memory.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import PEAK_TFLOPS, forward_flops, random_llada, timed  # noqa: E402

from egspo.config import SamplerConfig  # noqa: E402
from egspo.sampling import sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "small", "llada-8b"])
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model forward (fixed shapes).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dlm = random_llada(args.shape, device, dtype)
    if args.compile:
        dlm.model = torch.compile(dlm.model, dynamic=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    vocab = dlm.core.config.vocab_size
    prompts = torch.randint(0, 120000 if vocab > 120000 else vocab - 10, (args.batch, args.prompt_len), device=device)
    cfg = SamplerConfig(gen_length=args.gen_length, block_length=args.block, steps=args.steps,
                        temperature=args.temperature)
    generator = torch.Generator(device=device).manual_seed(0)
    # warm up kernels and the allocator on one block, then time the full rollout
    warm = SamplerConfig(gen_length=args.block, block_length=args.block, steps=cfg.steps_per_block,
                         temperature=args.temperature)
    sample(dlm, prompts, warm, generator=generator)
    with torch.no_grad():  # the full-length shape too (compiles it when --compile)
        full = torch.cat([prompts, torch.full((args.batch, args.gen_length), dlm.mask_id, device=device)], 1)
        dlm.encode(full)
    seconds, traj = timed(lambda: sample(dlm, prompts, cfg, generator=generator), device, repeat=args.repeat,
                          warmup=0)
    length = args.prompt_len + args.gen_length
    nominal = args.steps * forward_flops(dlm, args.batch, length)
    # what the sampler computes: the body every step, the head on the block + the still-masked tail
    head_rows = sum(args.block + (args.gen_length - (t * args.gen_length) // args.steps) for t in range(args.steps))
    actual = args.steps * forward_flops(dlm, args.batch, length, head_positions=0) + 2 * dlm.core.config.d_model * \
        vocab * args.batch * head_rows
    result = {
        "benchmark": "rollout",
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch, "prompt_len": args.prompt_len, "gen_length": args.gen_length,
        "block": args.block, "steps": args.steps, "compile": args.compile,
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
