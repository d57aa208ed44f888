"""Phases of one EGSPO-SA training step on a random-weight LLaDA-shaped model
(docs/algorithm.md#diffusion-mdp, #step-selection, #stepwise-advantages, #egspo-loss).

    PYTHONPATH=src python benchmarks/train_step.py --shape llada-8b --batch 6 --k 8 --lora-r 128
    PYTHONPATH=src python benchmarks/train_step.py --shape llada-8b --batch 48 --k 8 --lora-r 128 --grad-ckpt
    PYTHONPATH=src python benchmarks/train_step.py --shape llada-8b --batch 6 --k 8 --lora-r 128 --cache dual --compile

Runs the library's own pieces in the trainer's order: rollout (sampler with greedy completions),
step selection + greedy-completion scoring (a vectorised stand-in reward: the real cost of a task's
reward function is the task's), reference log-probs (adapter disabled), K micro-batch updates
(forward + backward of one selected step for all rows, LM head only at the committed positions) and
the AdamW steps. Prints JSON: seconds, TFLOP/s and MFU per phase, tokens/s and peak memory.
``--cache prefix|dual`` rolls out with the APPROXIMATE KV-cached sampler and adds the phase
"old_logps": the exact recompute of the selected steps' old log-probs that the trainer then runs
(K no-grad forwards), whose results the updates use. ``--compile`` compiles the rollout forward
(``SamplerConfig.compile``, a run's ``compile_rollout``; the peft-wrapped model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import PEAK_TFLOPS, add_shape_arguments, forward_flops, random_llada  # noqa: E402

from egspo.config import ModelConfig, SamplerConfig  # noqa: E402
from egspo.models.lora import prepare_for_training  # noqa: E402
from egspo.rl.advantages import stepwise_advantages  # noqa: E402
from egspo.rl.estimators import action_logps  # noqa: E402
from egspo.rl.losses import egspo_step_loss  # noqa: E402
from egspo.rl.selection import select_steps  # noqa: E402
from egspo.sampling import sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--group", type=int, default=8, help="G; a batch smaller than G is one partial group")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--cache", default="none", choices=["none", "prefix", "dual"],
                        help="rollout KV cache (prefix/dual are approximate)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the rollout forward")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dlm = random_llada(args.shape, device, dtype)
    model_cfg = ModelConfig(name_or_path="random", lora=True, lora_r=args.lora_r, lora_alpha=64,
                            lora_dropout=0.05, gradient_checkpointing=args.grad_ckpt)
    dlm = prepare_for_training(dlm, model_cfg, need_reference=False)
    params = [p for p in dlm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-5, betas=(0.9, 0.99), weight_decay=0.1)
    vocab = dlm.core.config.vocab_size
    prompts = torch.randint(0, min(vocab - 1000, 120000), (args.batch, args.prompt_len), device=device)
    cfg = SamplerConfig(gen_length=args.gen_length, block_length=args.block, steps=args.steps, temperature=0.9,
                        cache=args.cache, compile=args.compile)
    gen = torch.Generator(device=device).manual_seed(0)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # warm-up: one block of sampling and one update, so kernels and the allocator are ready
    warm = SamplerConfig(gen_length=args.block, block_length=args.block, steps=cfg.steps_per_block, temperature=0.9,
                         cache=args.cache)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        wtraj = sample(dlm, prompts, warm, generator=gen)
        if args.compile:  # compile every rollout shape outside the timed phase
            sample(dlm, prompts, cfg, generator=gen, record_greedy=False)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        logp, *_ = action_logps(dlm, wtraj, torch.zeros(args.batch, dtype=torch.long, device=device))
        logp.sum().backward()
    optimizer.zero_grad(set_to_none=True)
    sync()
    base_mem = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        traj = sample(dlm, prompts, cfg, generator=gen)
    sync()
    timings["rollout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    selected = select_steps(traj.step_entropy, args.k, "high_entropy", valid_steps=traj.valid_steps)
    greedy = traj.greedy_completions(selected.steps)  # (B, K, L_c)
    # stand-in reward: share of even token ids (vectorised); a task's reward costs what the task costs
    rewards = (traj.completions % 2 == 0).float().mean(1)
    greedy_rewards = (greedy % 2 == 0).float().mean(2)
    group = min(args.group, args.batch)
    usable = args.batch - args.batch % group
    adv = torch.zeros(args.batch, selected.steps.shape[1], device=device)
    adv[:usable] = stepwise_advantages(rewards[:usable], greedy_rewards[:usable], group, 0.5,
                                       weights=selected.weights[:usable].to(device)).to(device)
    sync()
    timings["score"] = time.perf_counter() - t0

    old_logps = traj.step_logps.gather(1, selected.steps.to(device))
    if args.cache != "none":
        # the trainer's exact recompute of the approximate rollout's old log-probs (eval mode, no grad)
        t0 = time.perf_counter()
        was_training = dlm.model.training
        dlm.model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            old_logps = torch.stack([action_logps(dlm, traj, selected.steps[:, k])[0].float()
                                     for k in range(selected.steps.shape[1])], dim=1)
        dlm.model.train(was_training)
        sync()
        timings["old_logps"] = time.perf_counter() - t0
        old_logp_gap = float((traj.step_logps.gather(1, selected.steps.to(device)) - old_logps).abs().mean())

    t0 = time.perf_counter()
    refs = []
    with torch.no_grad(), dlm.reference_model() as ref, torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for k in range(selected.steps.shape[1]):
            refs.append(action_logps(dlm, traj, selected.steps[:, k], model=ref)[0])
    sync()
    timings["reference"] = time.perf_counter() - t0

    t_update, t_opt = 0.0, 0.0
    dlm.model.train()
    for k in range(selected.steps.shape[1]):
        t0 = time.perf_counter()
        steps = selected.steps[:, k]
        old = old_logps[:, k]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logp, ntok, _, _ = action_logps(dlm, traj, steps)
            loss, _ = egspo_step_loss(logp, old, refs[k], adv[:, k], selected.weights[:, k].to(device), ntok,
                                      eps_low=0.2, eps_high=0.5, beta=0.04)
            (loss / args.grad_accum).backward()
        sync()
        t_update += time.perf_counter() - t0
        if (k + 1) % args.grad_accum == 0:
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 0.2)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            t_opt += time.perf_counter() - t0
    timings["updates"] = t_update
    timings["optimizer"] = t_opt
    total = sum(timings.values())

    length = args.prompt_len + args.gen_length
    k = selected.steps.shape[1]
    per_forward = forward_flops(dlm, args.batch, length, head_positions=0)
    flops = {
        "rollout": args.steps * per_forward,
        "reference": k * per_forward,
        "updates": 3 * k * per_forward,  # forward + backward counted as 3 forwards (the convention)
    }
    if "old_logps" in timings:
        flops["old_logps"] = k * per_forward
    peak = PEAK_TFLOPS[device.type]
    result = {
        "benchmark": "train_step",
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "batch": args.batch, "k": k, "lora_r": args.lora_r, "grad_ckpt": args.grad_ckpt,
        "cache": args.cache, "compile": args.compile,
        "prompt_len": args.prompt_len, "gen_length": args.gen_length, "block": args.block, "steps": args.steps,
        "seconds": {name: round(v, 4) for name, v in timings.items()},
        "seconds_total": round(total, 3),
        "tflops": {name: round(flops[name] / timings[name] / 1e12, 1) for name in flops},
        "mfu": {name: round(flops[name] / timings[name] / 1e12 / peak, 4) for name in flops},
        "updates_vs_60pct_peak": round(timings["updates"] / (flops["updates"] / (0.6 * peak * 1e12)), 3),
        "tokens_per_s": round(args.batch * length / total, 1),
    }
    if args.cache != "none":
        result["old_logp_gap"] = round(old_logp_gap, 5)
    if cuda:
        result["peak_extra_memory_gb"] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**30, 3)
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
